"""An interrupted search resumes without losing or redoing work; a corrupted zoo is retrained.

One chain of `python -m tune.search` runs on a local 1-CPU Ray (trials one at a time, 2 samples):

0. the search's zoo is already in the storage (pre-trained here) but one snapshot is corrupted
   (a byte flipped: its manifest sha256 no longer matches);
1. the first run moves that zoo aside and pre-trains it again on the actor pool; SIGINT once
   the first trial has finished and the second has reported a checkpoint -> exit 130;
2. `--resume`: the second trial continues from its checkpoint; SIGTERM once it has
   checkpointed a later iteration -> exit 143;
3. `--resume` finishes: both trials DONE, the first untouched, one MLflow run per trial.

(The zoo-actor and trial-process faults run on the two-node cluster: tests/test_cluster.py.)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
NAME = "digits-ipc10-smoke"
SAMPLES = 2
ITERATIONS = 6
TINY = ["--set", f"distill.iterations={ITERATIONS}", "--set", "distill.checkpoint_every=1", "--set", "distill.log_every=1",
        "--set", "distill.batch_real=8", "--set", "distill.aug_pool=1", "--set", "zoo.max_per_class=10",
        "--set", "eval.runs=1", "--set", "eval.epochs=1"]


def start(storage: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "tune.search", "--dataset", "digits", "--budget", "smoke",
           "--num-samples", str(SAMPLES), "--num-cpus", "1", "--storage", str(storage), "--cross-arch", "none",
           *TINY, *extra]
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)


def reports(storage: Path) -> dict[str, list[dict]]:
    """{trial_id: its result.json rows} as Tune wrote them so far."""
    out = {}
    for folder in (storage / NAME).glob("run_trial_*"):
        rows = []
        if (folder / "result.json").is_file():
            for line in (folder / "result.json").read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line being written
                    pass
        out[folder.name.split("_")[2]] = rows
    return out


def finished(storage: Path) -> set[str]:
    return {t for t, rows in reports(storage).items() if any("test_acc" in r for r in rows)}


def progress(storage: Path) -> dict[str, int]:
    """{unfinished trial: last checkpointed iteration} (every report checkpoints here)."""
    return {t: rows[-1].get("iteration", 0) for t, rows in reports(storage).items()
            if rows and not any("test_acc" in r for r in rows)}


def interrupt_when(proc: subprocess.Popen, storage: Path, sig: int, ready, timeout: float = 300):
    """Send `sig` once `ready(storage)` holds (polled); return the exit code and the progress then."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready(storage):
        time.sleep(0.2)
    assert proc.poll() is None, "the search ended before it could be interrupted"
    assert time.time() < deadline, "timed out waiting for trial progress"
    at = progress(storage)
    proc.send_signal(sig)
    return proc.wait(timeout=120), at


def mlflow_trial_runs(storage: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsdm-digits-ipc10")
    runs = client.search_runs([exp.experiment_id])
    return client, runs


def seed_corrupt_zoo(storage: Path, digits) -> Path:
    """Pre-train (in this process) the zoo the search will look for, then corrupt one snapshot."""
    from dsdm.zoo import load_or_train_zoo
    from tune.search import base_config, build_parser
    from tune.space import parse_fixed, search_space

    args = build_parser().parse_args(["--dataset", "digits", "--budget", "smoke", *TINY])
    fixed = parse_fixed(args.fix)
    cfg = base_config(args, search_space(args.budget, fixed), fixed)
    _, folder = load_or_train_zoo(digits, cfg.zoo, storage / "zoos", cfg.data.seed, cfg.data.val_fraction)
    snapshot = folder / "model000_epoch001.pt"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    return snapshot


@pytest.fixture(scope="module")
def chain(tmp_path_factory, digits):
    tmp = tmp_path_factory.mktemp("faults")
    storage = tmp / "storage"
    state: dict = {"storage": storage, "tmp": tmp}
    snapshot = seed_corrupt_zoo(storage, digits)
    state["corrupt"] = snapshot.read_bytes()
    procs = []
    try:
        # 1. corrupted zoo retrained; SIGINT mid-search: the first trial is done, the second has a checkpoint
        procs.append(start(storage, tmp / "run1"))
        state["rc1"], state["at1"] = interrupt_when(
            procs[-1], storage, signal.SIGINT, lambda s: len(finished(s)) >= 1 and any(progress(s).values()))
        state["done1"] = finished(storage)
        state["zoo1"] = json.loads((storage / f"{NAME}.zoo.json").read_text())
        state["files1"] = {t: (d / "result.json").read_bytes() for d in (storage / NAME).glob("run_trial_*")
                           for t in [d.name.split("_")[2]] if t in state["done1"]}
        client, runs = mlflow_trial_runs(storage)
        state["runs1"] = {r.data.tags["dsdm.trial_id"]: (r.info.run_id, r.info.start_time, r.info.end_time)
                          for r in runs if r.data.tags.get("dsdm.trial_id") in state["done1"]}
        # 2. --resume; SIGTERM once the interrupted trial has checkpointed past where it stopped
        procs.append(start(storage, tmp / "run2", "--resume"))
        before = reports(storage)
        state["rc2"], state["at2"] = interrupt_when(
            procs[-1], storage, signal.SIGTERM,
            lambda s: any(len(rows) > len(before.get(t, [])) for t, rows in reports(s).items() if t in progress(s)))
        state["done2"] = finished(storage)
        state["rows2"] = reports(storage)
        state["zoo2"] = json.loads((storage / f"{NAME}.zoo.json").read_text())
        # 3. --resume to the end
        procs.append(start(storage, tmp / "run3", "--resume"))
        state["rc3"] = procs[-1].wait(timeout=400)
        state["zoo3"] = json.loads((storage / f"{NAME}.zoo.json").read_text())
        for i in (1, 2, 3):
            state[f"out{i}"] = (tmp / f"run{i}.out").read_text()
            state[f"err{i}"] = (tmp / f"run{i}.err").read_text()
        yield state
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_resume_after_sigint_exits_130_and_keeps_state(chain):
    assert chain["rc1"] == 130, chain["err1"][-3000:]
    assert last_line(chain["err1"]).startswith("tune.search: interrupted (SIGINT)"), chain["err1"][-2000:]
    assert "--resume" in last_line(chain["err1"])
    assert len(chain["done1"]) == 1 and len(chain["at1"]) == 1  # one trial done, one stopped mid-distillation


def test_resume_after_sigterm_exits_143_and_keeps_state(chain):
    assert chain["rc2"] == 128 + signal.SIGTERM, chain["err2"][-3000:]
    assert last_line(chain["err2"]).startswith("tune.search: interrupted (SIGTERM)"), chain["err2"][-2000:]
    assert chain["done2"] == chain["done1"] and len(chain["at2"]) == 1


def test_resume_completes_remaining_trials(chain):
    assert chain["rc3"] == 0, chain["err3"][-3000:]
    table = pq.read_table(chain["storage"] / NAME / "trials.parquet").to_pandas()
    assert len(table) == SAMPLES and set(table["status"]) == {"DONE"}, table
    assert set(table["trial_id"]) == set(reports(chain["storage"]))  # no extra trials were started
    assert (table["iteration"] == ITERATIONS).all()
    (trial,) = chain["at1"]
    rows = [r for r in reports(chain["storage"])[trial] if "test_acc" not in r]
    iterations = [r["iteration"] for r in rows]
    assert iterations == list(range(1, ITERATIONS + 1)), iterations  # continued twice, no iteration redone
    resumed = sorted({r["resumed_from"] for r in rows})
    assert len(resumed) == 3 and resumed[0] == 0 and resumed[1] >= 1, resumed  # two restarts from checkpoints
    final = table.set_index("trial_id").loc[trial, "resumed_from"]
    assert final == resumed[-1] >= chain["at1"][trial]


def test_resume_does_not_rerun_finished_trials(chain):
    now = {t: (d / "result.json").read_bytes() for d in (chain["storage"] / NAME).glob("run_trial_*")
           for t in [d.name.split("_")[2]]}
    for trial_id, before in chain["files1"].items():
        assert now[trial_id] == before, f"trial {trial_id} reported again after it had finished"


def test_resume_mlflow_has_no_duplicate_runs(chain):
    client, runs = mlflow_trial_runs(chain["storage"])
    trials = [r for r in runs if "dsdm.trial_id" in r.data.tags]
    parents = [r for r in runs if "dsdm.trial_id" not in r.data.tags]
    assert len(parents) == 1
    assert len(trials) == SAMPLES and len({r.data.tags["dsdm.trial_id"] for r in trials}) == SAMPLES
    assert all(r.info.status == "FINISHED" for r in trials)
    for r in trials:
        assert len(client.get_metric_history(r.info.run_id, "test_acc")) == 1  # the final metrics logged once
    for r in trials:  # runs of trials finished before the first interruption were not touched
        trial = r.data.tags["dsdm.trial_id"]
        if trial in chain["runs1"]:
            assert (r.info.run_id, r.info.start_time, r.info.end_time) == chain["runs1"][trial]


def test_fault_corrupt_zoo_snapshot_is_detected_and_retrained(chain):
    from dsdm.zoo import ModelZoo

    recovered = chain["zoo1"].get("recovered")
    assert recovered and "sha256" in recovered["error"] and "model000_epoch001.pt" in recovered["error"], chain["zoo1"]
    assert "failed its integrity check" in chain["out1"]
    assert chain["zoo1"]["trained"] is True and sorted(m["index"] for m in chain["zoo1"]["models"]) == [0, 1]
    aside = Path(recovered["moved_to"])
    assert (aside / "model000_epoch001.pt").read_bytes() == chain["corrupt"]  # kept for inspection, not deleted
    zoo = ModelZoo.load(chain["zoo1"]["folder"])  # the retrained zoo passes its checksums
    assert zoo.num_models == 2
    for later in ("zoo2", "zoo3"):  # and is reused by the resumed runs
        assert chain[later]["trained"] is False and "recovered" not in chain[later]
