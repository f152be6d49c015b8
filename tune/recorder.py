"""MLflow records: one experiment per dataset x IPC, a parent run per search, a nested run per trial.

`Recorder` holds one MLflow client for one search or sweep (its `search_id`); `RunLog` is one of
its runs (the parent, a trial). Both are plain to pickle (the client is made again where they land).

Runs are found again by tags, always scoped by the search id (the parent: the search's run
without a trial tag; a trial: search id + trial id), so a resumed search or a retried trial
logs into the run it already has, under its own parent. A trial's final metrics and the
`dsdm.final` marker go in one atomic batch: a trial that finds the marker re-reports those
values instead of evaluating and logging again (exactly once, whatever was interrupted).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from dsdm.errors import DsdmError

SEARCH_TAG = "dsdm.search_id"
TRIAL_TAG = "dsdm.trial_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nesting in the UI
FINAL_TAG = "dsdm.final"  # JSON of a trial's final metrics, written in the same batch as them
REUSED_TAG = "dsdm.reused_from"  # run id of the identical finished trial whose results a trial copied
COMPUTE_TAG = "dsdm.compute"  # where a trial ran ("cpu x1"): identical configs give identical bits only there
ERROR_TAG = "dsdm.error"  # a trial's deterministic error (not retried)
# when the cross-architecture phase ran (UTC, ISO 8601), on the parent and on each trial it evaluated:
# its metrics (xarch/*) arrive after the trial run's own end
XARCH_STARTED_TAG, XARCH_ENDED_TAG = "dsdm.xarch_started", "dsdm.xarch_ended"
XARCH_NODES_TAG = "dsdm.xarch_nodes"  # JSON {arch: [node ids]}: where the cross-architecture networks trained
XARCH = "xarch/"  # prefix of the cross-architecture evaluation's keys (the trial's own are unprefixed)
# MLflow 3 opens an experiment by its kind; untagged ones may open on the GenAI "Traces" page
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
# A runs-table view stored on the experiment, the way MLflow's own "Share" button stores one: the
# URL's `viewStateShareKey=<key>` loads the tag `mlflow.sharedViewState.<key>` (plain JSON is read)
VIEW_KEY = "dsdm-trials"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
RUNS_VIEW = {
    # the search facets (all of them, else MLflow 3.17 ignores the sort): best validation accuracy first
    "searchFilter": "", "orderByKey": "metrics.`val_acc`", "orderByAsc": False, "startTime": "ALL",
    "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
    # the objective, the reported test accuracy and the searched hyper-parameters as columns
    "selectedColumns": ["metrics.`val_acc`", "metrics.`test_acc`", "metrics.`test_std`",
                        "params.`distill.lambda1`", "params.`distill.lambda2`",
                        "params.`distill.num_models`", "params.`distill.pretrain_epochs`"],
}


def default_uri(storage: Path) -> str:
    """A sqlite file under the storage path (never the current directory)."""
    return f"sqlite:///{Path(storage).resolve() / 'mlflow.db'}"


def runs_table_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table in MLflow 3's UI: every trial a row, best validation accuracy
    first, objective, test accuracy and λ1/λ2/M/E as columns (the view `RUNS_VIEW`, stored on the
    experiment by `Recorder.open`).

    Checked in headless Chromium against MLflow 3.17: `#/experiments/<id>` opens the GenAI overview
    whatever the experiment's tags; `/runs?workflowType=machine_learning` opens the runs table, and
    `viewStateShareKey` applies the stored view (docs/figures/mlflow-experiment-landing.png)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def mlflow_advice(uri: str, experiment_id: str, port: int = 5000) -> str:
    """The line that opens this experiment's runs: the venv's `mlflow` (on PATH or not) and the URL."""
    if uri.startswith(("http://", "https://")):
        return f"MLflow: open {runs_table_url(uri, experiment_id)}"
    venv_mlflow = Path(sys.executable).with_name("mlflow")  # beside this python, unresolved: the venv's bin/
    exe = str(venv_mlflow) if venv_mlflow.exists() else "mlflow"
    return (f"MLflow: {exe} ui --backend-store-uri {uri} --port {port}\n"
            f"        then open {runs_table_url(f'http://127.0.0.1:{port}', experiment_id)}")


def experiment_name(dataset: str, ipc: int) -> str:
    return f"dsdm-{dataset}-ipc{ipc}"


def is_server(uri: str) -> bool:
    """A tracking server (every node reaches it), not a file on this machine."""
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast with one line instead of MLflow's long retry loop on a dead server."""
    if not is_server(uri):
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

@contextlib.contextmanager
def store_lock(uri: str):
    """Serialise MLflow store creation on a sqlite file: two searches starting together on a new
    storage folder would otherwise race on the schema migration ("duplicate column name")."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

class Recorder:
    """The MLflow records of one search or sweep: its experiment, its parent run, its trials."""

    def __init__(self, uri: str, experiment_id: str, search_id: str):
        self.uri, self.experiment_id, self.search_id = uri, experiment_id, search_id
        self._client = None

    @classmethod
    def open(cls, uri: str, experiment: str, artifact_root: Path | None, search_id: str) -> "Recorder":
        """The experiment `experiment` (created with its artifact root when new), for `search_id`."""
        with store_lock(uri):
            recorder = cls(uri, "", search_id)
            exp = recorder.client.get_experiment_by_name(experiment)
            if exp is None:
                # a tracking server stores artifacts where its --artifacts-destination says; a local
                # root would be a path on whichever node logs (the driver's folder, on a cluster)
                local = artifact_root is not None and not is_server(uri)
                location = Path(artifact_root).resolve().as_uri() if local else None
                recorder.experiment_id = recorder.client.create_experiment(experiment, artifact_location=location)
            else:
                recorder.experiment_id = exp.experiment_id
            tags = {} if exp is None else exp.tags
            for key, value in ((KIND_TAG, KIND), (VIEW_TAG, json.dumps(RUNS_VIEW))):
                if tags.get(key) != value:
                    recorder.client.set_experiment_tag(recorder.experiment_id, key, value)
        return recorder

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def __getstate__(self) -> dict:  # into Ray workers: the client is made again there
        return {**self.__dict__, "_client": None}

    def run(self, run_id: str) -> "RunLog":
        return RunLog(self, run_id)

    def _search(self, tags: dict[str, str], where: str = "") -> list:
        clauses = [f"tags.`{k}` = '{v}'" for k, v in {SEARCH_TAG: self.search_id, **tags}.items()]
        return self.client.search_runs([self.experiment_id], filter_string=" and ".join(clauses + ([where] if where else [])))

    def parent(self, name: str, tags: dict[str, str] | None = None) -> "RunLog":
        """The search's parent run: the one with its search id and no trial id (trial runs carry the
        search id too); reopened (RUNNING) when a resumed search finds it ended."""
        found = [r for r in self._search({}) if TRIAL_TAG not in r.data.tags]
        if not found:
            run = self.client.create_run(self.experiment_id, tags={SEARCH_TAG: self.search_id, **(tags or {})},
                                         run_name=name)
            return self.run(run.info.run_id)
        first = min(found, key=lambda r: r.info.start_time)
        self._reopen(first)
        return self.run(first.info.run_id)

    def trial(self, trial_id: str, parent_id: str) -> tuple["RunLog", dict | None]:
        """(run, final metrics or None) of a trial of this search, nested under `parent_id`."""
        found = self._search({TRIAL_TAG: trial_id})
        if not found:
            tags = {SEARCH_TAG: self.search_id, TRIAL_TAG: trial_id, PARENT_TAG: parent_id}
            return self.run(self.client.create_run(self.experiment_id, tags=tags,
                                                   run_name=f"trial-{trial_id}").info.run_id), None
        run = found[0]
        final = run.data.tags.get(FINAL_TAG)
        if final is None:
            self._reopen(run)
        return self.run(run.info.run_id), (json.loads(final) if final else None)

    def finished_twin(self, params: dict[str, Any], compute: str):
        """The earliest finished trial of ANOTHER search with exactly these params (the whole config,
        seeds included) that ran on the same compute, or None. A trial is bit-deterministic given its
        config, the zoo (whose config is in the params) and the compute, so the twin's results are the
        ones this trial would compute. Runs from before COMPUTE_TAG existed count as any compute."""
        wanted = {k: str(v) for k, v in params.items()}
        where = f"params.`distill.seed` = '{wanted.get('distill.seed')}' and attributes.status = 'FINISHED'"
        runs = [r for r in self.client.search_runs([self.experiment_id], filter_string=where)
                if FINAL_TAG in r.data.tags and TRIAL_TAG in r.data.tags
                and r.data.tags.get(SEARCH_TAG) != self.search_id
                and r.data.tags.get(COMPUTE_TAG, compute) == compute and r.data.params == wanted]
        return min(runs, key=lambda r: r.info.start_time) if runs else None

    def close_open_runs(self, status: str, keep: str | None = None) -> int:
        """End every run of this search still RUNNING (the parent, trials a stopped Tune never let
        finish), except `keep`, as `status` (KILLED or FAILED); returns how many."""
        open_runs = [r for r in self._search({}) if r.info.status == "RUNNING" and r.info.run_id != keep]
        for run in open_runs:
            self.run(run.info.run_id).finish(status)
        return len(open_runs)

    def cross_arch_results(self, archs: tuple[str, ...], prefix: str = "") -> dict[str, dict[str, tuple[float, float]]]:
        """{trial_id: {arch: (mean, std)}} for this search's trials that already have every arch."""
        out = {}
        for run in self._search({}):
            m, trial = run.data.metrics, run.data.tags.get(TRIAL_TAG)
            if trial and all(f"{prefix}acc_mean/{a}" in m for a in archs):
                out[trial] = {a: (m[f"{prefix}acc_mean/{a}"], m[f"{prefix}acc_std/{a}"]) for a in archs}
        return out

    def _reopen(self, run) -> None:
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")


class RunLog:
    """One MLflow run of a Recorder: params once, metrics by step, the final batch, artifacts."""

    def __init__(self, recorder: Recorder, run_id: str):
        self.recorder, self.run_id = recorder, run_id

    @property
    def client(self):
        return self.recorder.client

    def __eq__(self, other) -> bool:
        return isinstance(other, RunLog) and other.run_id == self.run_id

    def __hash__(self) -> int:
        return hash(self.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for start in range(0, len(todo), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=todo[start:start + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        batch = _metrics(metrics, step)
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_metrics_once(self, metrics: dict[str, float], step: int) -> None:
        """`log_metrics` of the keys that have no value at `step` yet."""
        logged = self.client.get_run(self.run_id).data.metrics
        todo = {k: v for k, v in metrics.items()
                if k not in logged or all(m.step != step for m in self.client.get_metric_history(self.run_id, k))}
        self.log_metrics(todo, step)

    def last_step(self, key: str) -> int:
        """The highest step at which `key` is logged (-1 if never): a retried or resumed trial
        replays its iterations bit-exactly from a checkpoint and skips logging those again."""
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def log_final(self, metrics: dict[str, float], step: int, logged: tuple[str, ...] = ()) -> None:
        """A trial's final metrics and the FINAL_TAG marker in one batch (one sqlite transaction):
        either both are in the run or neither is. Keys in `logged` already have their value at
        `step` (the distillation loop's `iteration`, `resumed_from`): only the marker carries them."""
        from mlflow.entities import RunTag

        new = {k: v for k, v in metrics.items() if k not in logged}
        self.client.log_batch(self.run_id, metrics=_metrics(new, step),
                              tags=[RunTag(FINAL_TAG, json.dumps(metrics))])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path))

    def artifact_names(self) -> set[str]:
        return {a.path for a in self.client.list_artifacts(self.run_id)}

    def download(self, name: str, folder: Path) -> Path:
        return Path(self.client.download_artifacts(self.run_id, name, str(folder)))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def _metrics(metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))]


def eval_metrics(results: dict[str, dict], prefix: str = "") -> dict[str, float]:
    """acc_mean/<arch>, acc_std/<arch>, acc_run<i>/<arch> and val_acc_mean/<arch>, each after `prefix`
    (XARCH for the cross-architecture evaluation, so it never overwrites the trial's own)."""
    out: dict[str, float] = {}
    for arch, r in results.items():
        out[f"{prefix}acc_mean/{arch}"] = r["mean"]
        out[f"{prefix}acc_std/{arch}"] = r["std"]
        out[f"{prefix}val_acc_mean/{arch}"] = r["val_mean"]
        for i, acc in enumerate(r["runs"]):
            out[f"{prefix}acc_run{i}/{arch}"] = acc
    return out

def quiet_mlflow() -> None:
    """MLflow calls ride out a tracking-server restart of up to ~2 minutes (6 retries, waits of
    0+4+8+16+32+64 s; MLflow's default 7 wait ~4 minutes; the driver's `check_reachable` already
    refuses a server that is down at start), time out in 20 s, and skip git lookups."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "6")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
