"""One search or sweep per experiment folder at a time: a lock file holding {pid, host, since}."""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from dsdm.errors import DsdmError


@contextmanager
def search_lock(lock: Path, prog: str = "tune.search"):
    """One search per experiment folder: `lock` holds {pid, host}. A second search on the folder
    stops with one line naming the holder; a lock left by a dead process on this host is taken over."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    lock.parent.mkdir(parents=True, exist_ok=True)
    unreadable = 0
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):  # being written (or gone) this instant; empty for good: stale
                unreadable += 1
                if unreadable < 50:
                    time.sleep(0.1)
                    continue
                holder = {"pid": 0, "host": me["host"]}
            if holder.get("host") != me["host"] or _alive(int(holder.get("pid", 0))):
                raise DsdmError(f"'{lock.with_suffix('')}' is in use by another search (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or pass "
                                f"--name NEW (if that process is gone, delete '{lock}')") from None
            print(f"{prog}: taking over the stale lock '{lock}' of pid {holder.get('pid')} on {holder.get('host')} "
                  "(that process has ended)", file=sys.stderr)
            stale = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
            try:
                os.replace(lock, stale)  # one taker wins; the others see the winner's lock next round
                stale.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        break
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
