"""An interrupted search resumes without losing or redoing work; a corrupted zoo is retrained.

One chain of `python -m tune.search` runs on a local 1-CPU Ray (trials one at a time, so trial
number 1 finishes before number 2 starts; 2 samples, 6 iterations, a checkpoint each). Every
interrupt fires at a NAMED fault point (tune.faults.fault_point), never on a wall clock:

0. the search's zoo is already in the storage (pre-trained here) but one snapshot is corrupted
   (a byte flipped: its manifest sha256 no longer matches);
1. the first run moves that zoo aside and pre-trains it again on the actor pool; the driver
   sends itself SIGINT once Tune has registered trial 2's checkpoint of iteration 2
   (DSDM_FAULT_DRIVER_CHECKPOINT=2:2@SIGINT) -> exit 130;
2. `--resume`: trial 2 continues after its checkpoint; SIGTERM at its checkpoint of iteration 4
   -> exit 143;
3. `--resume`: trial 2 finishes, logs its final metrics to MLflow, and then -- before Tune saved
   its result -- sends the driver SIGINT and blocks (DSDM_FAULT_TRIAL_FINAL_LOGGED=2@SIGINT,block)
   -> exit 130 with the final metrics in MLflow but not in Tune's state;
4. `--resume` finishes: trial 2 finds its final metrics in MLflow and reports them again
   without evaluating or logging a second time; both trials DONE, one MLflow run per trial.

The fixture only runs the chain; each test reads what it needs, so any test passes alone.
(The zoo-actor and trial-process faults run on the two-node cluster: tests/test_cluster.py.)
"""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import (FINAL_METRICS, ITERATIONS, NAME, SAMPLES, finished, last_line, mlflow_runs,
                     reports, run_search, search_env, seed_zoo, snapshot)

pytestmark = pytest.mark.slow  # Ray and subprocess searches end to end


def seed_corrupt_zoo(storage: Path, smoke_zoo: Path) -> Path:
    """The zoo the search will look for (the session's pre-trained one), one snapshot corrupted."""
    snapshot = seed_zoo(storage, smoke_zoo) / "model000_epoch001.pt"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    return snapshot


@pytest.fixture(scope="module")
def chain(tmp_path_factory, smoke_zoo):
    tmp = tmp_path_factory.mktemp("faults")
    storage = tmp / "storage"
    state: dict = {"storage": storage, "tmp": tmp}
    state["corrupt"] = seed_corrupt_zoo(storage, smoke_zoo).read_bytes()
    steps = [("run1", [], {"driver_checkpoint": "2:2@SIGINT"}),
             ("run2", ["--resume"], {"driver_checkpoint": "2:4@SIGTERM"}),
             ("run3", ["--resume"], {"trial_final_logged": "2@SIGINT,block"}),
             ("run4", ["--resume"], {})]
    for step, extra, points in steps:
        proc = run_search(storage, tmp / step, *extra, env=search_env(tmp / f"faults-{step}", **points))
        state[step] = {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr, "done": finished(storage),
                       "reports": reports(storage), "mlflow": snapshot(storage),
                       "zoo": json.loads((storage / f"{NAME}.zoo.json").read_text()),
                       "fired": {f.stem: json.loads(f.read_text()) for f in (tmp / f"faults-{step}").glob("*.fired")}}
    return state


def second_trial(chain) -> str:
    (fired,) = chain["run1"]["fired"].values()
    return fired["trial"]


def test_resume_after_sigint_exits_130_and_keeps_state(chain):
    run = chain["run1"]
    assert run["rc"] == 130, run["err"][-3000:]
    assert last_line(run["err"]) == ("tune.search: interrupted (SIGINT); finished trials are saved, rerun the same "
                                     "command with --resume to finish the others"), run["err"][-2000:]
    trial = second_trial(chain)
    assert len(run["done"]) == 1 and trial not in run["done"]  # trial 1 done, trial 2 stopped mid-distillation
    assert [r["iteration"] for r in run["reports"][trial]] == [1, 2]  # stopped right after its checkpoint


def test_resume_after_sigterm_exits_143_and_keeps_state(chain):
    run = chain["run2"]
    assert run["rc"] == 128 + signal.SIGTERM, run["err"][-3000:]
    assert last_line(run["err"]).startswith("tune.search: interrupted (SIGTERM); finished trials are saved")
    assert run["done"] == chain["run1"]["done"]
    assert [r["iteration"] for r in run["reports"][second_trial(chain)]] == [1, 2, 3, 4]


def test_resume_completes_remaining_trials(chain):
    run, storage = chain["run4"], chain["storage"]
    assert run["rc"] == 0, run["err"][-3000:]
    table = pq.read_table(storage / NAME / "trials.parquet").to_pandas()
    assert len(table) == SAMPLES and set(table["status"]) == {"DONE"}, table
    assert set(table["trial_id"]) == set(reports(storage))  # no extra trials were started
    assert (table["iteration"] == ITERATIONS).all()
    rows = [r for r in run["reports"][second_trial(chain)] if "test_acc" not in r]
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))  # no iteration redone
    assert [r["resumed_from"] for r in rows] == [0, 0, 2, 2, 4, 4]  # continued from the checkpoints 2 and 4


def test_resume_does_not_rerun_finished_trials(chain):
    (first,) = chain["run1"]["done"]
    assert chain["run4"]["reports"][first] == chain["run1"]["reports"][first]
    assert chain["run4"]["mlflow"][first] == chain["run1"]["mlflow"][first]  # its MLflow run untouched


def test_final_metrics_logged_once_across_interrupt_between_mlflow_and_tune(chain):
    """The fault between a trial's final MLflow write and Tune's save: MLflow has the final
    metrics, Tune does not; the resumed trial re-reports them without evaluating again."""
    trial = second_trial(chain)
    run3 = chain["run3"]
    assert run3["rc"] == 130, run3["err"][-3000:]
    assert run3["fired"]["trial_final_logged"]["trial"] == trial
    assert trial not in run3["done"] and run3["mlflow"][trial]["final"]  # in MLflow, not in Tune
    client, _, runs = mlflow_runs(chain["storage"])
    (run,) = [r for r in runs if r.data.tags.get("dsdm.trial_id") == trial]
    for key in FINAL_METRICS:
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
    final = [r for r in chain["run4"]["reports"][trial] if "test_acc" in r]
    assert len(final) == 1 and final[0]["final_from_mlflow"] == 1  # re-reported, not re-evaluated
    assert {k: final[0][k] for k in FINAL_METRICS} == {k: run.data.metrics[k] for k in FINAL_METRICS}
    table = pq.read_table(chain["storage"] / NAME / "trials.parquet").to_pandas().set_index("trial_id")
    assert (chain["storage"] / NAME / table.loc[trial, "set_path"]).is_file()  # the set came back from MLflow's artifacts


def test_resume_mlflow_runs_nested_finished_and_counted_once(chain):
    runs = chain["run4"]["mlflow"]
    parent = runs.pop("parent")
    assert parent["status"] == "FINISHED" and parent["parent"] is None
    assert len(runs) == SAMPLES
    for trial, run in runs.items():
        assert run["status"] == "FINISHED" and run["parent"] == parent["run_id"], (trial, run)
        assert run["counts"]["test_acc"] == 1 and run["steps"] == list(range(1, ITERATIONS + 1)), (trial, run)
    # Progress metrics once too: a trial Tune is stopping may log an iteration past its last checkpoint;
    # the resumed attempt replays it bit-exactly and does not log that step again.
    for trial, run in runs.items():
        assert run["counts"] == {"test_acc": 1, "iteration": ITERATIONS}, (trial, run)  # one per step; the final adds none


def test_interrupted_runs_end_killed_not_running(chain):
    trial = second_trial(chain)
    for step in ("run1", "run2"):
        runs = chain[step]["mlflow"]
        assert runs["parent"]["status"] == "KILLED", runs
        assert runs[trial]["status"] == "KILLED", runs
    assert "RUNNING" not in {r["status"] for step in ("run1", "run2", "run3") for r in chain[step]["mlflow"].values()}


def test_experiment_opens_as_model_training(chain):
    _, exp, _ = mlflow_runs(chain["storage"])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_fault_corrupt_zoo_snapshot_is_detected_and_retrained(chain):
    from dsdm.zoo import ModelZoo

    zoo1 = chain["run1"]["zoo"]
    recovered = zoo1.get("recovered")
    assert recovered and "sha256" in recovered["error"] and "model000_epoch001.pt" in recovered["error"], zoo1
    assert "failed its integrity check" in chain["run1"]["err"]  # a notice: stderr
    assert zoo1["trained"] is True and sorted(m["index"] for m in zoo1["models"]) == [0, 1]
    aside = Path(recovered["moved_to"])
    assert (aside / "model000_epoch001.pt").read_bytes() == chain["corrupt"]  # kept for inspection, not deleted
    zoo = ModelZoo.load(zoo1["folder"])  # the retrained zoo passes its checksums
    assert zoo.num_models == 2
    for later in ("run2", "run3", "run4"):  # and is reused by the resumed runs
        assert chain[later]["zoo"]["trained"] is False and "recovered" not in chain[later]["zoo"]
