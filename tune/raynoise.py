"""Ray and Tune messages a user of this project cannot act on, filtered by logger and text.

Each filter names the message it drops and why the project's own output covers it; every other
record of those loggers (real errors included) passes unchanged.
"""
from __future__ import annotations

import logging

# (logger, start of the message, how many to let through): the project says this better itself
NOISE = (
    # a local instance gets token auth, Ray's secure default, and says so on every run; nothing to do
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray", 0),
    # Tune's "Resume experiment with: Tuner.restore(...)": the command prints the --resume advice
    ("ray.tune.tune", "Experiment has been interrupted, but the most recent state was saved", 0),
    # a trial stopped before its first report has no result file; the trial table shows it as STOPPED
    ("ray.tune.analysis.experiment_analysis", "Failed to fetch metrics", 0),
    # a trial that ended at a deterministic error reports a NaN objective; the table and last line say why
    ("ray.tune.search.optuna.optuna_search", "The value nan is not acceptable", 0),
    # with a short checkpoint interval Tune repeats this three-line warning at every snapshot: once is enough
    ("ray.tune.execution.experiment_state", "Experiment state snapshotting has been triggered", 1),
)


class _Drop(logging.Filter):
    def __init__(self, start: str, keep: int):
        super().__init__()
        self.start, self.keep, self.seen = start, keep, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.start):
            return True
        self.seen += 1
        return self.seen <= self.keep


def quiet_ray() -> None:
    """Install the filters (once per logger and message)."""
    for name, start, keep in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.start == start for f in logger.filters):
            logger.addFilter(_Drop(start, keep))
