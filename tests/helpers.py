"""What the end-to-end tests share: a tiny smoke search as a subprocess, its environment with fault
points, and what MLflow and Tune recorded (tests import it; it is not a test module)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAME = "digits-ipc10-smoke"
SAMPLES = 2
ITERATIONS = 6
TINY = ["--set", f"distill.iterations={ITERATIONS}", "--set", "distill.checkpoint_every=1", "--set", "distill.log_every=1",
        "--set", "distill.batch_real=8", "--set", "distill.aug_pool=1", "--set", "zoo.max_per_class=10",
        "--set", "eval.runs=1", "--set", "eval.epochs=1"]
FINAL_METRICS = ("test_acc", "val_acc", "test_std", "acc_mean/convnet3", "eval_seconds")


def search_env(faults: Path | None = None, **points: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSDM_FAULT_") and k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    if faults is not None:
        faults.mkdir(parents=True, exist_ok=True)
        env["DSDM_FAULT_DIR"] = str(faults)
        env.update({f"DSDM_FAULT_{k.upper()}": v for k, v in points.items()})
    return env


def seed_zoo(storage: Path, smoke_zoo: Path) -> Path:
    """The session's pre-trained smoke zoo (conftest's `smoke_zoo`) copied into `storage`, where the
    search finds and reuses it; returns the copied model folder."""
    return Path(shutil.copytree(smoke_zoo, storage / "zoos" / smoke_zoo.name))


def search_argv(storage: Path, *extra: str, samples: int = SAMPLES) -> list[str]:
    """tune.search's arguments for the tiny smoke search (for `main(argv)` in process, or a subprocess)."""
    return ["--dataset", "digits", "--budget", "smoke", "--num-samples", str(samples), "--num-cpus", "1",
            "--storage", str(storage), "--cross-arch", "none", *TINY, *extra]


def run_search(storage: Path, log: Path, *extra: str, env: dict | None = None, samples: int = SAMPLES,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m tune.search` on a private 1-CPU Ray; stdout/stderr kept in log.out/log.err."""
    cmd = [sys.executable, "-m", "tune.search", *search_argv(storage, *extra, samples=samples)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or search_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.with_suffix(".out").write_text(out)
    log.with_suffix(".err").write_text(err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def reports(storage: Path, name: str = NAME) -> dict[str, list[dict]]:
    """{trial_id: its result.json rows} as Tune wrote them."""
    out = {}
    for folder in (storage / name).glob("run_trial_*"):
        rows = []
        if (folder / "result.json").is_file():
            rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        out[folder.name.split("_")[2]] = rows
    return out


def finished(storage: Path) -> set[str]:
    return {t for t, rows in reports(storage).items() if any("test_acc" in r for r in rows)}


def mlflow_runs(storage: Path):
    """(client, {"parent": run, trial_id: run, ...}) of the digits experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsdm-digits-ipc10")
    runs = client.search_runs([exp.experiment_id])
    return client, exp, runs


def snapshot(storage: Path) -> dict:
    """Statuses, parents and final-metric counts of every run, as a user's MLflow query sees them."""
    client, _, runs = mlflow_runs(storage)
    return {r.data.tags.get("dsdm.trial_id", "parent"): {
        "run_id": r.info.run_id, "status": r.info.status, "parent": r.data.tags.get("mlflow.parentRunId"),
        "start": r.info.start_time, "end": r.info.end_time, "final": "dsdm.final" in r.data.tags,
        "counts": {k: len(client.get_metric_history(r.info.run_id, k)) for k in ("test_acc", "iteration")},
        "steps": sorted({m.step for m in client.get_metric_history(r.info.run_id, "iteration")})}
        for r in runs}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
