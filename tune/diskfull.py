"""A full disk during an experiment: a reserve file freed first, a log filter that turns Ray's
and MLflow's thousand lines into the driver's one, and that one line (`disk_full`)."""
from __future__ import annotations

import errno
import logging
import os
import traceback
from pathlib import Path

from dsdm.errors import DsdmError
from tune.signals import STOP


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


FULL_DISK = ("No space left on device", "database or disk is full")  # OSError's, sqlite's (MLflow) words


def disk_full(exc: BaseException, storage: Path) -> DsdmError | None:
    """The one-line error for a full disk, wherever it surfaced (here, or inside a trial); else None.
    A full disk also breaks Tune in other words (an empty error pickle: `EOFError: Ran out of input`),
    so an error while the storage has under 1 MB free counts as one too."""
    import shutil

    try:
        free = shutil.disk_usage(storage).free
    except OSError:
        free = None
    said = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or any(m in str(exc) for m in FULL_DISK)
    if not (said or (free is not None and free < 2**20)):
        return None
    where = getattr(exc, "filename", None) or storage
    return DsdmError(f"no space left on device writing '{where}' ({mb(free or 0)} free under '{storage}'); free "
                     "space there (or pass --storage on a larger disk), then rerun the same command with --resume")


RESERVE_BYTES = 1024 * 1024  # room for Tune's last state save and MLflow's FAILED marks on a disk that filled


class SpaceReserve:
    """A file of RESERVE_BYTES under the storage while a search runs: when the disk fills, the
    driver deletes it first, so that Tune can still save its state and MLflow's sqlite file (on the
    same disk) can still mark the runs FAILED. Written again by the next start or --resume."""

    def __init__(self, storage: Path, name: str):
        self.path = storage / f".{name}.reserve"

    def __enter__(self) -> "SpaceReserve":
        with open(self.path, "wb") as fh:  # zeros, not a sparse file: the blocks must be taken
            fh.write(bytes(RESERVE_BYTES))
        return self

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self.release()


class FullDiskWatch(logging.Filter):
    """Ray Tune and MLflow report a full disk again and again, each time with a traceback (every
    failed trial attempt, every ~10 s experiment-state save, every MLflow write): about a thousand
    lines before the driver's one line. On the first record that names a full disk this filter
    frees the reserve (room for Tune's last save of its state, a complete file that --resume can
    read, and for MLflow's sqlite), asks Tune to stop (as a signal does, without retrying trials)
    and from then on drops every warning and error of Ray's and MLflow's loggers; the driver then
    prints its one line (`error`)."""

    LOGGERS = ("ray", "mlflow")  # their handlers: Tune and Train log through "ray", MLflow through "mlflow"

    def __init__(self, storage: Path, reserve: SpaceReserve):
        super().__init__()
        self.storage, self.reserve = storage, reserve
        self.error: DsdmError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.error is None:
            text = record.getMessage() + ("".join(traceback.format_exception(*record.exc_info))
                                          if record.exc_info else "")
            if not any(m in text for m in FULL_DISK):
                return True
            self.error = disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), self.storage)
            self.reserve.release()
            STOP.stop_tune()
        return record.levelno < logging.WARNING

    def attach(self) -> None:
        """On the loggers' current handlers (ray.init may set up new ones: attach again after it)."""
        for name in self.LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(self)  # once per handler, however often called

    def detach(self) -> None:
        for name in self.LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.removeFilter(self)


def no_trial_done(storage, name: str) -> DsdmError:
    """Every trial errored: one line quoting the first trial's error (Tune's error.txt, read
    through the storage's filesystem)."""
    errors = sorted(storage.find("error.txt", name), key=lambda f: int(f.split("/")[0].split("_")[3]))  # <name>_<id>_<n>_
    text = storage.read_text(name, errors[0]) if errors else ""
    if any(m in text for m in FULL_DISK):
        return disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), storage.local)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), "no error recorded")
    return DsdmError(f"no trial finished; the first trial's error: {first[:300]} "
                     f"(all errors: {storage.uri(name)}/*/error.txt)")
