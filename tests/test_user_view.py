"""What a user sees of a search (issue 28): errors not retried and in this command's words, a
`--resume` that checks the command, records logged once, tables without `nan`, the MLflow line.

The slow tests share one finished smoke search (`finished`); each test that resumes works on its
own copy of it, so no test depends on another's output.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import seed_zoo

REPO = Path(__file__).resolve().parents[1]
NAME = "digits-ipc10-smoke"


# what a user sees does not depend on how long the networks train: 1 epoch, 1 network, a small zoo
LIGHT = ["--set", "eval.epochs=1", "--set", "eval.runs=1", "--set", "zoo.max_per_class=10"]


def argv(storage: Path, *extra: str, samples: int = 3) -> list[str]:
    return ["--dataset", "digits", "--budget", "smoke", "--num-samples", str(samples), "--storage", str(storage),
            "--num-cpus", "1", *LIGHT, *extra]


def search(storage: Path, *extra: str, samples: int = 3, timeout: int = 600) -> subprocess.CompletedProcess:
    """A smoke search on a 1-CPU Ray: half the worker processes of 2 CPUs (each imports torch), and
    nothing here is about parallelism (tests/test_search.py checks the 2-actor zoo)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tune.search", *argv(storage, *extra, samples=samples)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def client(storage: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")


def runs(storage: Path) -> tuple[list, list]:
    """(parent runs, trial runs) of the digits IPC 10 experiment."""
    c = client(storage)
    found = c.search_runs([c.get_experiment_by_name("dsdm-digits-ipc10").experiment_id])
    return ([r for r in found if "dsdm.trial_id" not in r.data.tags], [r for r in found if "dsdm.trial_id" in r.data.tags])


# --- without Ray ------------------------------------------------------------------------------
def test_error_messages_name_this_commands_flags():
    """dsdm's errors name `python -m dsdm` flags; printed by tune.search they name --set keys."""
    from tune.messages import in_tune_words

    line = in_tune_words("distillation loss became nan at iteration 2; lower --lr-img or the lambdas")
    assert "--set distill.lr_img=" in line and "--lr-img" not in line
    assert "--set distill.num_models=" in in_tune_words("M=5 is larger than the zoo; lower --models or pre-train more")
    assert in_tune_words("--models-x stays") == "--models-x stays"


def test_best_trial_tie_goes_to_the_trial_started_first():
    from tune.tables import trial_table

    def result(trial_id: str, n: int, val: float):
        return SimpleNamespace(metrics={"trial_id": trial_id, "val_acc": val, "test_acc": 1.0}, error=None,
                               config={}, checkpoint=None, path=f"/s/run/run_trial_{trial_id}_{n}_x=1_2026")

    for order in ([("b", 2), ("a", 1), ("c", 3)], [("c", 3), ("a", 1), ("b", 2)]):
        table = trial_table([result(t, n, 50.0) for t, n in order], [])
        assert list(table["trial_id"]) == ["a", "b", "c"]
    table = trial_table([result("a", 1, 40.0), result("b", 2, 50.0)], [])
    assert list(table["trial_id"]) == ["b", "a"]


def test_resume_refuses_a_changed_identity_flag_and_grows_samples():
    from dsdm.errors import DsdmError
    from tune.resume import check_resume

    was = {"dataset": "digits", "ipc": 10, "budget": "smoke", "fix": {}, "set": {}, "seed": 0,
           "scheduler": "fifo", "proxy_every": 0, "num_samples": 3}
    assert check_resume(was, dict(was)) is None
    assert check_resume(was, {**was, "num_samples": 5}) == 5
    with pytest.raises(DsdmError, match=r"--seed is 1 here but 0 in the search being resumed"):
        check_resume(was, {**was, "seed": 1})
    with pytest.raises(DsdmError, match=r"--set is distill.lr_img=1 here but \(none\)"):
        check_resume(was, {**was, "set": {"distill.lr_img": "1"}})
    with pytest.raises(DsdmError, match=r"--num-samples 2 is fewer than the 3"):
        check_resume(was, {**was, "num_samples": 2})


def test_table_markdown_has_empty_cells_not_nan():
    import pandas as pd

    from tune.tables import markdown

    text = markdown(pd.DataFrame({"val_acc": [50.0, float("nan")], "xarch/convnet3": ["1.00 ± 0.10", None]}))
    assert "nan" not in text.lower() and "None" not in text


def test_mlflow_line_opens_the_runs_table_with_the_venvs_mlflow():
    from tune.recorder import mlflow_advice

    line = mlflow_advice("sqlite:////x/mlflow.db", "7")
    assert line.startswith(f"MLflow: {Path(sys.executable).with_name('mlflow')} ui --backend-store-uri sqlite:////x/")
    url = line.split("then open ", 1)[1]
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&viewStateShareKey=dsdm-trials"
    assert mlflow_advice("http://10.0.0.1:5000", "3") == (
        "MLflow: open http://10.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning&viewStateShareKey=dsdm-trials")


def test_zoo_lock_makes_a_second_search_wait(tmp_path):
    """Two searches on a new storage folder: the second waits for the first's zoo (then reuses it)."""
    import fcntl
    import threading

    from tune.zoo import zoo_lock

    folder = tmp_path / "zoos" / "key"
    folder.parent.mkdir()
    held = open(folder.with_name("key.lock"), "a")
    fcntl.flock(held, fcntl.LOCK_EX)
    waiting, entered = threading.Event(), threading.Event()

    def second():
        with zoo_lock(folder, progress=lambda line: waiting.set() if "waiting" in line else None):
            entered.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert waiting.wait(30)
    assert not entered.is_set()
    fcntl.flock(held, fcntl.LOCK_UN)
    held.close()
    thread.join(30)
    assert entered.is_set()


def test_refused_search_leaves_no_folder(tmp_path, monkeypatch, capsys):
    from tune import search as tune_search

    monkeypatch.chdir(tmp_path)
    assert tune_search.main(["--dataset", "digits", "--budget", "smoke", "--ipc", "1000", "--num-samples", "1"]) == 2
    assert "ipc" in capsys.readouterr().err.lower()
    assert not (tmp_path / "runs").exists()


def test_data_root_message_names_the_files_once(tmp_path):
    from dsdm.data import load_dataset
    from dsdm.errors import DsdmError

    with pytest.raises(DsdmError) as info:
        load_dataset("mnist", tmp_path, offline=True)
    message = str(info.value)
    assert message.count("train-images") <= 1, message
    assert "--data-root" in message


def test_distill_interrupted_before_distillation_does_not_promise_a_checkpoint(tmp_path, monkeypatch, capsys):
    from dsdm import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_zoo", interrupted)
    code = cli.main(["distill", "--dataset", "digits", "--budget", "smoke", "--out", str(tmp_path / "s.pt")])
    err = capsys.readouterr().err
    assert code == 130
    assert "last checkpoint" not in err and "start again" in err


# --- a real search ------------------------------------------------------------------------------
@pytest.mark.slow
def test_deterministic_trial_error_is_not_retried(tmp_path, smoke_zoo):
    """Every trial's loss overflows: each trial stops once (no retries), stderr stays short and its
    advice names a flag tune.search has."""
    seed_zoo(tmp_path, smoke_zoo)
    proc = search(tmp_path, "--set", "distill.lr_img=1e30", samples=2)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tune.search: error: no trial finished") and "--set distill.lr_img=" in last, last
    assert "--lr-img" not in proc.stderr
    assert len(proc.stderr.splitlines()) < 40, proc.stderr[-3000:]
    _, trials = runs(tmp_path)
    assert len(trials) == 2
    assert all(r.info.status == "FAILED" and "loss became" in r.data.tags["dsdm.error"] for r in trials)
    assert not list((tmp_path / NAME).glob("*/error.txt"))  # Tune saw no crash to retry


@pytest.fixture(scope="module")
def finished(tmp_path_factory, smoke_zoo):
    storage = tmp_path_factory.mktemp("finished") / "runs"
    seed_zoo(storage, smoke_zoo)
    proc = search(storage)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return storage, proc


def copy_of(finished, tmp_path: Path) -> Path:
    """The finished search moved to a folder of this test's own."""
    target = tmp_path / "moved"
    shutil.copytree(finished[0], target)
    return target


@pytest.mark.slow
def test_each_step_metric_logged_once(finished):
    storage, _ = finished
    c = client(storage)
    for run in runs(storage)[1]:
        for key in ("iteration", "resumed_from"):
            steps = [m.step for m in c.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (key, steps)


@pytest.mark.slow
def test_cross_arch_phase_tagged_on_parent_and_trial(finished):
    storage, _ = finished
    (parent,), trials = runs(storage)
    (evaluated,) = [r for r in trials if "xarch/acc_mean/resnet10" in r.data.metrics]
    for run in (parent, evaluated):
        assert run.data.tags["dsdm.xarch_started"] <= run.data.tags["dsdm.xarch_ended"]


@pytest.mark.slow
def test_trial_table_relative_set_path_and_no_nan(finished):
    storage, proc = finished
    text = (storage / NAME / "trials.md").read_text()
    assert "nan" not in text
    import pyarrow.parquet as pq

    table = pq.read_table(storage / NAME / "trials.parquet").to_pandas()
    assert not table.loc[0, "set_path"].startswith("/")
    assert (storage / NAME / table.loc[0, "set_path"]).is_file()
    assert f"best distilled set: {storage / NAME / table.loc[0, 'set_path']}" in proc.stdout


@pytest.mark.slow
def test_search_prints_the_runs_table_url(finished):
    storage, proc = finished
    c = client(storage)
    exp_id = c.get_experiment_by_name("dsdm-digits-ipc10").experiment_id
    assert f"#/experiments/{exp_id}/runs?workflowType=machine_learning&viewStateShareKey=dsdm-trials" in proc.stdout
    # the view that key loads is on the experiment, and each column it shows is a trial's metric or param
    view = json.loads(c.get_experiment(exp_id).tags["mlflow.sharedViewState.dsdm-trials"])
    assert view["orderByKey"] == "metrics.`val_acc`" and view["orderByAsc"] is False
    trial = next(r for r in c.search_runs([exp_id]) if "dsdm.trial_id" in r.data.tags)
    for column in view["selectedColumns"]:
        kind, key = column.split(".", 1)
        assert key.strip("`") in {"metrics": trial.data.metrics, "params": trial.data.params}[kind], column
    assert f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri sqlite:///{storage}" in proc.stdout


@pytest.mark.slow
def test_resume_refuses_a_changed_flag_in_one_line(finished, tmp_path, capsys):
    """Refused before Ray starts: in process (the other resumes here are subprocesses)."""
    from tune import search as tune_search

    storage = copy_of(finished, tmp_path)
    assert tune_search.main(argv(storage, "--resume", "--seed", "1")) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--seed is 1 here but 0" in lines[0], err[-2000:]


@pytest.mark.slow
def test_moved_finished_search_resumes_as_itself_redoing_nothing(finished, tmp_path):
    """A moved folder: the same parent, no FAILED run, parent metrics and cross-arch not redone."""
    storage = copy_of(finished, tmp_path)
    (parent_before,), trials_before = runs(storage)
    proc = search(storage, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,), trials = runs(storage)
    assert parent.info.run_id == parent_before.info.run_id and parent.info.status == "FINISHED"
    assert len(trials) == len(trials_before) and all(r.info.status == "FINISHED" for r in trials)
    c = client(storage)
    for key in ("best_val_acc", "best_test_acc", "search_seconds"):
        assert len(c.get_metric_history(parent.info.run_id, key)) == 1, key
    assert len([r for r in trials if "xarch/acc_mean/resnet10" in r.data.metrics]) == 1
    assert "cross-arch: trial" not in proc.stdout


@pytest.mark.slow
def test_resume_with_more_samples_adds_trials(finished, tmp_path):
    storage = copy_of(finished, tmp_path)
    proc = search(storage, "--resume", samples=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume adds trials: --num-samples 4 (was 3)" in proc.stdout
    (parent,), trials = runs(storage)
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    record = json.loads((storage / f"{NAME}.search.json").read_text())
    assert record["command"]["num_samples"] == 4


def test_ray_noise_filtered_real_errors_kept():
    import logging

    from tune.raynoise import quiet_ray

    quiet_ray()
    quiet_ray()  # idempotent
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    tune_logger = logging.getLogger("ray.tune.tune")
    tune_logger.addHandler(handler)
    try:
        tune_logger.warning("Experiment has been interrupted, but the most recent state was saved.\nResume ...")
        tune_logger.error("Trial crashed: a real error")
    finally:
        tune_logger.removeHandler(handler)
    assert records == ["Trial crashed: a real error"]


@pytest.mark.slow
def test_parent_run_has_a_csv_table_mlflow_previews_whole(finished):
    storage, _ = finished
    (parent,), trials = runs(storage)
    names = {a.path for a in client(storage).list_artifacts(parent.info.run_id)}
    assert {"trials.md", "trials.parquet", "trials.csv"} <= names
    import pandas as pd

    assert len(pd.read_csv(storage / NAME / "trials.csv")) == len(trials)
