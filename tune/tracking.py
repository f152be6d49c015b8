"""MLflow records: one experiment per dataset x IPC, a parent run per search, a nested run per trial.

Runs are found again by tags (search id, trial id), so a resumed search or a retried
trial logs into the run it already has instead of creating a duplicate.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from dsdm.errors import DsdmError

SEARCH_TAG = "dsdm.search_id"
TRIAL_TAG = "dsdm.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting in the UI


def default_uri(storage: Path) -> str:
    """A sqlite file under the storage path (never the current directory)."""
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def experiment_name(dataset: str, ipc: int) -> str:
    return f"dsdm-{dataset}-ipc{ipc}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with one line instead of MLflow's long retry loop on a dead server."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.parse
    import urllib.request

    host = urllib.parse.urlsplit(uri).hostname or ""
    loopback = host == "localhost" or host.startswith("127.") or host == "::1"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if loopback else urllib.request.build_opener()
    try:
        opener.open(uri.rstrip("/") + "/health", timeout=timeout_s)  # a local server is never behind a proxy
    except (urllib.error.URLError, OSError) as exc:
        raise DsdmError(f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}); "
                        "start it (`mlflow server ...`) or drop --mlflow-uri to use the sqlite file") from None


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
    return client.create_experiment(name, artifact_location=location)


def find_or_create_run(uri: str, experiment_id: str, tags: dict[str, str], key: str, name: str) -> str:
    """The run carrying tag `key` = tags[key]; created if absent (idempotent across resumes)."""
    client = _client(uri)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{key}` = '{tags[key]}'", max_results=1)
    if found:
        return found[0].info.run_id
    return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    client = _client(uri)
    existing = client.get_run(run_id).data.params
    todo = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    for start in range(0, len(todo), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=todo[start:start + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if batch:
        _client(uri).log_batch(run_id, metrics=batch)


def log_artifacts(uri: str, run_id: str, paths: list[Path]) -> None:
    client = _client(uri)
    for path in paths:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))


def finish(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def eval_metrics(results: dict[str, dict]) -> dict[str, float]:
    """acc_mean/<arch>, acc_std/<arch>, acc_run<i>/<arch> and val_acc_mean/<arch>."""
    out: dict[str, float] = {}
    for arch, r in results.items():
        out[f"acc_mean/{arch}"] = r["mean"]
        out[f"acc_std/{arch}"] = r["std"]
        out[f"val_acc_mean/{arch}"] = r["val_mean"]
        for i, acc in enumerate(r["runs"]):
            out[f"acc_run{i}/{arch}"] = acc
    return out


def cross_arch_results(uri: str, experiment_id: str, search_id: str,
                       archs: tuple[str, ...]) -> dict[str, dict[str, tuple[float, float]]]:
    """{trial_id: {arch: (mean, std)}} for this search's trials that already have every arch."""
    runs = _client(uri).search_runs([experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{search_id}'")
    out = {}
    for run in runs:
        m, trial = run.data.metrics, run.data.tags.get(TRIAL_TAG)
        if trial and all(f"acc_mean/{a}" in m for a in archs):
            out[trial] = {a: (m[f"acc_mean/{a}"], m[f"acc_std/{a}"]) for a in archs}
    return out


def quiet_mlflow() -> None:
    """No retries against a dead server from inside trials, no git lookups."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
