"""Fault injection at named points (tests only; inert unless DSDM_FAULT_* is set).

`fault_point(name, where)` is the switch the fault-injection tests flip (docs/reliability.md):
trials, zoo actors and the driver call it at named places; `fault_env` forwards the variables
to Ray's workers; `FaultPoints` is the driver-side Tune callback.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

from ray import tune

FAULT_ENV_PREFIX = "DSDM_FAULT_"
FAULT_BLOCK_S = 300  # a blocked process gives up (exits) after this long, so no test hangs for ever


def fault_env() -> dict[str, str]:
    """The DSDM_FAULT_* variables of this process (the driver forwards them to Ray workers), plus
    DSDM_FAULT_DRIVER_PID: where a trial's `SIGINT`/`SIGTERM` action is sent."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FAULT_ENV_PREFIX)}
    if env:
        env.setdefault(FAULT_ENV_PREFIX + "DRIVER_PID", str(os.getpid()))
    return env


def fault_point(name: str, where, **context) -> None:
    """Fire the fault DSDM_FAULT_<NAME>="<where>[@<actions>]" when `where` matches; else nothing.

    Actions, comma-separated, run in order (default `exit`):
      exit     os._exit(1): the process dies without cleanup, like an OOM kill;
      raise    a RuntimeError naming the fault (an error inside the trial);
      enospc   an OSError(ENOSPC) for the path in context["path"], as a full disk raises it;
      fill     fill the disk for real: write zeros to $DSDM_FAULT_FILL (a file) until it is full;
      SIGINT / SIGTERM / SIGKILL   that signal to the driver (DSDM_FAULT_DRIVER_PID, else this process);
      block    wait until killed (the driver is stopping; gives up after FAULT_BLOCK_S);
      await    wait until <dir>/<name>.released exists, then go on (something outside acts meanwhile:
               a node removed, a server restarted; gives up after FAULT_BLOCK_S);
      rmtree   delete the folders in context["paths"] (a node's local files lost).
    Fires once per DSDM_FAULT_DIR: the first process to get here creates <dir>/<name>.fired
    (O_EXCL) with `context` in it; later processes, including a restarted one, go on.
    """
    spec = os.environ.get(FAULT_ENV_PREFIX + name.upper())
    folder = os.environ.get(FAULT_ENV_PREFIX + "DIR")
    if spec is None or folder is None:
        return
    target, _, actions = spec.partition("@")
    if target.strip() != str(where):
        return
    try:
        fd = os.open(Path(folder) / f"{name}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"fault": name, "value": where, "pid": os.getpid(), "time": time.time(), **context},
                            default=str))
    for action in (actions or "exit").split(","):
        if action == "exit":
            os._exit(1)
        elif action == "raise":
            raise RuntimeError(f"fault injected at {name}={where}")
        elif action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(context.get("path", "")))
        elif action == "fill":
            fill_disk(Path(os.environ[FAULT_ENV_PREFIX + "FILL"]))
        elif action in ("SIGINT", "SIGTERM", "SIGKILL"):
            os.kill(int(os.environ.get(FAULT_ENV_PREFIX + "DRIVER_PID", os.getpid())), getattr(signal, action))
        elif action == "rmtree":
            for path in context.get("paths", ()):
                shutil.rmtree(path, ignore_errors=True)
        elif action == "block":
            time.sleep(FAULT_BLOCK_S)
            os._exit(1)
        elif action == "await":
            released, deadline = Path(folder) / f"{name}.released", time.time() + FAULT_BLOCK_S
            while not released.exists() and time.time() < deadline:
                time.sleep(0.1)
        else:
            raise ValueError(f"unknown fault action '{action}' in {FAULT_ENV_PREFIX}{name.upper()}={spec}")


def fill_disk(path: Path) -> None:
    """Append zeros to `path` until its file system has no byte left (the fault `fill`): 64 KiB
    blocks, then 512-byte ones for the last partial block."""
    with open(path, "ab", buffering=0) as fh:
        for block in (bytes(64 * 1024), bytes(512)):
            try:
                while True:
                    fh.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise


class FaultPoints(tune.Callback):
    """Driver-side fault point DSDM_FAULT_DRIVER_CHECKPOINT="<trial number>:<iteration>[@actions]":
    fires once Tune has registered that trial's checkpoint of that iteration (so a stop that
    follows keeps it, and the resumed trial continues right after it). Inert unless set."""

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        it = (trial.last_result or {}).get("iteration")
        number = trial.experiment_tag.split("_")[0]  # the n of the trial's folder name
        fault_point("driver_checkpoint", f"{number}:{it}", trial=trial.trial_id)
