"""What `--resume` may change: the search's record, its comparison with the command, more samples.

A search keeps `<name>.search.json` beside its Tune folder under --storage: its id (the MLflow
runs carry it as `dsdm.search_id`, so a moved or copied storage folder resumes the same runs) and
the flags that define it. A resume compares the command with that record: a flag that defines
what the search computes (`IDENTITY`) must be unchanged, else one line names the difference;
`--num-samples` may grow (Tune's saved searcher is told the new total); other flags (where it
runs, `--cross-arch`) apply as given.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from dsdm.errors import DsdmError

# flags that decide what the trials compute: a resume under other values would mix two searches
IDENTITY = ("dataset", "ipc", "budget", "fix", "set", "seed", "scheduler", "proxy_every")


def record_name(name: str) -> str:
    return f"{name}.search.json"


def search_id_of(storage, name: str) -> str:
    """The `dsdm.search_id` of the experiment NAME under `storage` (its MLflow runs carry it)."""
    return SearchRecord.of(storage, name).search_id


@dataclass
class SearchRecord:
    search_id: str
    command: dict  # flag (argparse dest) -> value, normalised (see `command_of`)

    @classmethod
    def load(cls, storage, name: str) -> "SearchRecord | None":
        if not storage.exists(record_name(name)):
            return None
        data = json.loads(storage.read_text(record_name(name)))
        return cls(data["search_id"], data["command"])

    @classmethod
    def of(cls, storage, name: str) -> "SearchRecord":
        """The saved record; for a sweep, or a search from before records, one whose id is its Tune
        path (which stays its id from then on) and whose command is unknown."""
        return cls.load(storage, name) or cls(storage.uri(name), {})

    @classmethod
    def new(cls, command: dict) -> "SearchRecord":
        return cls(uuid.uuid4().hex, command)

    def save(self, storage, name: str) -> None:
        storage.write_text(json.dumps({"search_id": self.search_id, "command": self.command}, indent=1),
                           record_name(name))


def command_of(spec, fixed: dict, sets: dict) -> dict:
    """The flags a record keeps: IDENTITY (with --fix and --set as parsed, so order and aliases do
    not count as differences) and --num-samples."""
    values = {k: getattr(spec, k) for k in IDENTITY if k not in ("fix", "set")}
    return {**values, "fix": {k: str(v) for k, v in sorted(fixed.items())},
            "set": {k: str(v) for k, v in sorted(sets.items())}, "num_samples": spec.num_samples}


def flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_resume(recorded: dict, current: dict) -> int | None:
    """Refuse (one line naming the first difference) a resume whose command changes what the search
    computes; returns the new --num-samples when it grows, else None."""
    for key in IDENTITY:
        if key in recorded and recorded[key] != current[key]:
            was, now = (_shown(key, recorded[key]), _shown(key, current[key]))
            raise DsdmError(f"--resume: {flag(key)} is {now} here but {was} in the search being resumed; rerun "
                            f"with {flag(key)} {was} to resume it, or pass --name NEW for a new search")
    before, now = int(recorded.get("num_samples", current["num_samples"])), int(current["num_samples"])
    if now < before:
        raise DsdmError(f"--resume: --num-samples {now} is fewer than the {before} trials of the search being "
                        f"resumed; pass --num-samples {before} (or more, to add trials)")
    return now if now > before else None


def _shown(key: str, value) -> str:
    if key in ("fix", "set"):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


def grow_samples(storage, name: str, num_samples: int) -> None:
    """Tell the Tune run saved at storage/name to draw `num_samples` trials in all: its searcher's
    saved state keeps the total it was started with, and `Tuner.restore` takes no new one."""
    import ray.cloudpickle as cloudpickle

    states = [f for f in storage.files(name) if f.startswith("search_gen_state-") and f.endswith(".json")]
    if not states:
        raise DsdmError(f"--resume --num-samples {num_samples}: the search at '{storage.uri(name)}' has no saved "
                        "searcher state to add trials to; rerun with the --num-samples it was started with")
    newest = max(states)  # Tune reads the newest by name (its session's timestamp)
    state = cloudpickle.loads(storage.read_bytes(name, newest))
    state["total_samples"], state["finished"] = num_samples, False
    _point_at(state["experiment"], storage)
    storage.write_bytes(cloudpickle.dumps(state), name, newest)



def _point_at(experiment, storage) -> None:
    """New trials are made from the saved experiment, whose storage context still names the folder
    where the search started: point it at the storage it is resumed from (a moved folder)."""
    from pathlib import PurePosixPath

    from ray.train._internal.storage import get_fs_and_path  # Ray's own resolution of a path or URI

    filesystem, path = get_fs_and_path(storage.root, None)
    for context in {id(c): c for c in (experiment.storage, experiment.spec.get("storage")) if c is not None}.values():
        context.storage_filesystem, context.storage_fs_path = filesystem, PurePosixPath(path).as_posix()
