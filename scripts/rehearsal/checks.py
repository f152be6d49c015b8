"""What the rehearsal counts after each scenario, from the bucket and the MLflow server only.

`records(...)` counts one search's or sweep's MLflow runs (by its search id, as tune/recorder.py
finds them): statuses, trial runs not nested under the parent, and duplicates (a second parent,
a second run for one trial, a final metric logged twice, an iteration step logged twice).
`finished(...)` reads the trial table the experiment wrote beside its Tune run in the bucket.
"""
from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field

from tune.recorder import FINAL_TAG, PARENT_TAG, SEARCH_TAG, TRIAL_TAG


@dataclass
class Records:
    statuses: Counter = field(default_factory=Counter)
    trials: dict = field(default_factory=dict)  # trial id -> its run (the first, if duplicated)
    parent_id: str = ""
    not_nested: int = 0
    duplicates: int = 0
    finals: int = 0  # trial runs with their final marker

    def status_text(self) -> str:
        return "/".join(str(self.statuses.get(s, 0)) for s in ("FINISHED", "RUNNING", "FAILED"))


def records(mlflow_url: str, experiment: str, search_id: str) -> Records:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_url)
    exp = client.get_experiment_by_name(experiment)
    out = Records()
    if exp is None:
        return out
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{search_id}'",
                              max_results=5000)
    parents = [r for r in runs if TRIAL_TAG not in r.data.tags]
    out.parent_id = parents[0].info.run_id if parents else ""
    out.duplicates += max(0, len(parents) - 1)
    for run in runs:
        out.statuses[run.info.status] += 1
        trial = run.data.tags.get(TRIAL_TAG)
        if trial is None:
            continue
        if trial in out.trials:
            out.duplicates += 1
            continue
        out.trials[trial] = run
        out.not_nested += run.data.tags.get(PARENT_TAG) != out.parent_id
        if FINAL_TAG in run.data.tags:
            out.finals += 1
            out.duplicates += max(0, len(client.get_metric_history(run.info.run_id, "test_acc")) - 1)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "iteration")]  # each step once
        out.duplicates += len(steps) - len(set(steps))
    return out


def trial_table(storage_root: str, name: str):
    """NAME/trials.parquet beside the Tune run, read through the storage URI (pandas frame) or None."""
    import pyarrow.parquet as pq

    from tune.storage import Storage

    store = Storage(storage_root, None)
    if not store.exists(name, "trials.parquet"):
        return None
    return pq.read_table(io.BytesIO(store.read_bytes(name, "trials.parquet"))).to_pandas()


def finished(storage_root: str, name: str) -> int:
    table = trial_table(storage_root, name)
    return 0 if table is None else int((table["status"] == "DONE").sum())
