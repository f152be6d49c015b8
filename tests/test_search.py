"""`python -m tune.search` as a user runs it: zoo pool, 3 Tune trials, MLflow, Parquet, and the
cross-architecture phase after the trials' checkpoint folders were deleted (it reads none of them).
(--resume is tests/test_faults.py's chain; nothing here reads what another test wrote.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import search_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


# the cross-arch phase trains 3 + 1 + 1 networks for 1 epoch (not 4 + 2 + 2 for 5)
EVAL = ["--set", "eval.epochs=1", "--set", "eval.runs=1"]


def run_search(storage: Path, *extra: str, env: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "tune.search", "--dataset", "digits", "--budget", "smoke",
           "--num-samples", "3", "--storage", str(storage), "--num-cpus", "2", *EVAL, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def mlflow_runs(storage: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsdm-digits-ipc10")
    return client.search_runs([exp.experiment_id])


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    storage = tmp_path_factory.mktemp("search")
    faults = tmp_path_factory.mktemp("faults")
    # before the cross-arch phase, the fault deletes every trial's folder (checkpoints included)
    proc = run_search(storage, env=search_env(faults, before_cross_arch="1@rmtree"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (faults / "before_cross_arch.fired").is_file()
    return storage, proc


def test_search_smoke_trains_zoo_once_on_two_actors(search):
    storage, _ = search
    info = json.loads((storage / "digits-ipc10-smoke.zoo.json").read_text())
    assert info["trained"] is True
    assert len(info["models"]) == 2
    assert len({m["actor"] for m in info["models"]}) >= 2, info["models"]


def test_search_smoke_trials_table_and_no_training_in_trials(search):
    storage, proc = search
    table = pq.read_table(storage / "digits-ipc10-smoke" / "trials.parquet").to_pandas()
    assert len(table) == 3
    assert set(table["status"]) == {"DONE"}
    assert (table["zoo_pretrain_calls"] == 0).all()  # trials fetched snapshots, never trained
    assert table["val_acc"].between(0, 100).all()
    assert table.loc[0, "set_path"].endswith("/distilled.pt") and "best distilled set:" in proc.stdout


def test_cross_arch_completes_after_the_trials_folders_are_gone(search):
    """The sets reached the cross-arch tasks through the checkpoints' filesystem and the object
    store before the folders were deleted; no task opened a path on the node that wrote it."""
    storage, proc = search
    assert not list((storage / "digits-ipc10-smoke").glob("run_trial_*/checkpoint_*"))
    table = pq.read_table(storage / "digits-ipc10-smoke" / "trials.parquet").to_pandas()
    assert table.loc[0, ["xarch/convnet3", "xarch/resnet10", "xarch/densenet121"]].str.contains(" ± ").all()


def test_search_smoke_mlflow_records(search):
    storage, _ = search
    runs = mlflow_runs(storage)
    trials = [r for r in runs if "dsdm.trial_id" in r.data.tags]
    parents = [r for r in runs if "dsdm.trial_id" not in r.data.tags]
    assert len(trials) == 3 and len(parents) == 1
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    assert all("acc_mean/convnet3" in r.data.metrics for r in trials)
    assert all(r.data.params["distill.ipc"] == "10" for r in trials)
    cross = [r for r in trials if "xarch/acc_mean/resnet10" in r.data.metrics]
    assert len(cross) == 1 and "xarch/acc_mean/densenet121" in cross[0].data.metrics
    best = max(r.data.metrics["val_acc"] for r in trials)  # smoke accuracies tie often: compare values
    assert cross[0].data.metrics["val_acc"] == best  # the cross-arch evaluation went to a best trial


def test_search_smoke_cross_arch_keys_apart_from_the_trials_own(search):
    """The trial's 2-network ConvNet-3 evaluation and the cross-arch 4-network one of the same set
    have their own keys, so MLflow, trials.md and the Parquet table agree on each."""
    from mlflow.tracking import MlflowClient

    storage, proc = search
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    (run,) = [r for r in mlflow_runs(storage) if "xarch/acc_mean/convnet3" in r.data.metrics]
    m = run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "acc_mean/convnet3")) == 1
    assert "acc_run1/convnet3" not in m and "xarch/acc_run2/convnet3" in m  # 1 network vs 1 + 2
    table = pq.read_table(storage / "digits-ipc10-smoke" / "trials.parquet").to_pandas().set_index("trial_id")
    row = table.loc[run.data.tags["dsdm.trial_id"]]
    assert row["test_acc"] == m["acc_mean/convnet3"]
    assert row["xarch/convnet3"] == f"{m['xarch/acc_mean/convnet3']:.2f} ± {m['xarch/acc_std/convnet3']:.2f}"
    assert f"{m['xarch/acc_mean/convnet3']:.2f} ± " in (storage / "digits-ipc10-smoke" / "trials.md").read_text()


def test_search_smoke_cross_arch_prints_one_line_per_network(search):
    _, proc = search
    lines = [line for line in proc.stdout.splitlines() if line.startswith("cross-arch: trial ")]
    assert len(lines) == 3 + 1 + 1, proc.stdout[-3000:]  # ConvNet-3 (runs + 2), ResNet-10, DenseNet-121
    assert lines[-1].endswith("(5/5 networks, " + lines[-1].rsplit(", ", 1)[1])
    assert all("% test accuracy (" in line and "s elapsed)" in line for line in lines)


def test_search_smoke_experiment_is_a_model_training_experiment(search):
    from mlflow.tracking import MlflowClient

    storage, _ = search
    exp = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}").get_experiment_by_name("dsdm-digits-ipc10")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_search_smoke_trials_carry_phases_memory_and_a_manifest(search):
    """Each trial run holds its seconds and memory per phase, its set's manifest (which re-scores
    the downloaded file), and a description; the trial table shows the same phase numbers."""
    from mlflow.tracking import MlflowClient

    from dsdm.io import sha256_file
    from dsdm.manifest import read_manifest

    storage, _ = search
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    table = pq.read_table(storage / "digits-ipc10-smoke" / "trials.parquet").to_pandas().set_index("trial_id")
    for run in [r for r in mlflow_runs(storage) if "dsdm.trial_id" in r.data.tags]:
        m = run.data.metrics
        assert {f"phase_seconds/{p}" for p in ("zoo", "distill", "cache_fill", "eval")} | {"peak_rss_mb"} <= set(m)
        assert m["phase_seconds/eval"] > 0 and m["peak_rss_mb"] > 100
        row = table.loc[run.data.tags["dsdm.trial_id"]]
        assert row["cache_fill_s"] == m["phase_seconds/cache_fill"] and row["peak_rss_mb"] == m["peak_rss_mb"]
        folder = storage / "downloads" / run.info.run_id
        folder.mkdir(parents=True)
        set_file = Path(client.download_artifacts(run.info.run_id, "distilled.pt", str(folder)))
        manifest = read_manifest(client.download_artifacts(run.info.run_id, "distilled.manifest.json", str(folder)))
        assert manifest["set"]["sha256"] == sha256_file(set_file)  # the manifest describes the logged file
        scored = manifest["evaluation"]["results"]["convnet3"]
        assert scored["test"]["mean"] == pytest.approx(m["acc_mean/convnet3"]) and scored["val"]["mean"] == pytest.approx(m["val_acc"])
        assert manifest["zoo"]["key"].startswith("digits-") and set(manifest["phases"]) >= {"distill", "eval"}
        assert run.data.tags["mlflow.note.content"].startswith("digits distilled to 10 stored image(s) per class")


def test_search_prints_no_tensorboard_hint(search):
    """MLflow holds the records: no `tensorboard --logdir` advice for a tool that is not installed."""
    _, proc = search
    assert "TensorBoard" not in proc.stdout + proc.stderr
