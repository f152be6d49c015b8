"""tune/recorder.py: MLflow lookups scoped by search, exactly-once finals, the reuse rule, one store."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tune import recorder as rec
from tune.recorder import Recorder

REPO = Path(__file__).resolve().parents[1]


def open_recorder(tmp_path, search: str, name: str = "dsdm-digits-ipc10") -> Recorder:
    return Recorder.open(rec.default_uri(tmp_path), name, tmp_path / "art", search)


def test_parent_and_trial_lookups_are_scoped_by_search(tmp_path):
    a = open_recorder(tmp_path, "search-a")
    parent = a.parent("search-a")
    trial, final = a.trial("t1", parent.run_id)
    assert final is None
    assert a.parent("search-a") == parent  # never the (later) trial run
    b = open_recorder(tmp_path, "search-b")
    other = b.parent("search-b")
    trial_b, _ = b.trial("t1", other.run_id)  # same trial id, another search
    assert len({parent, trial, other, trial_b}) == 4
    assert a.trial("t1", parent.run_id) == (trial, None)
    trial.log_final({"test_acc": 50.0}, step=3)
    assert a.trial("t1", parent.run_id) == (trial, {"test_acc": 50.0})


def test_a_recorder_pickles_without_its_client(tmp_path):
    import pickle

    a = open_recorder(tmp_path, "s")
    a.parent("s")  # the client exists now
    again = pickle.loads(pickle.dumps(a))
    assert again._client is None and again.experiment_id == a.experiment_id and again.parent("s") == a.parent("s")


def test_cross_arch_results_go_into_the_trial_run_of_their_own_sweep(tmp_path):
    """ablations.cross_arch and the search record another architecture's accuracy in the trial's run
    of ITS sweep, even when another sweep of the experiment has a trial with the same id."""
    from tune.cross_arch import record_cross_arch

    runs = {}
    for search in ("sweep-a", "sweep-b"):
        r = open_recorder(tmp_path, search)
        parent = r.parent(search)
        runs[search] = (r, parent, r.trial("t1", parent.run_id)[0])
    result = {"t1": {"resnet10": {"mean": 40.0, "std": 1.0, "val_mean": 41.0, "runs": [39.0, 41.0]}}}
    r, parent, trial = runs["sweep-a"]
    record_cross_arch(r, parent.run_id, result)
    client = r.client
    assert client.get_run(trial.run_id).data.metrics["acc_mean/resnet10"] == 40.0
    assert "acc_mean/resnet10" not in client.get_run(runs["sweep-b"][2].run_id).data.metrics
    assert r.cross_arch_results(("resnet10",)) == {"t1": {"resnet10": (40.0, 1.0)}}
    assert runs["sweep-b"][0].cross_arch_results(("resnet10",)) == {}


def test_finished_twin_is_another_searchs_finished_trial_with_the_same_config_and_compute(tmp_path):
    """The reuse rule (Recorder.finished_twin): same params exactly, another search, FINISHED with
    the final marker, same compute (or none recorded); the earliest wins."""
    params = {"distill.seed": 1, "distill.lambda1": 50.0, "eval.runs": 5}

    def trial(search, trial_id, p=params, status="FINISHED", final=True, compute="cpu x1"):
        run, _ = open_recorder(tmp_path, search, "dsdm-digits-ipc1").trial(trial_id, "p")
        run.log_params(p)
        if compute:
            run.set_tags({rec.COMPUTE_TAG: compute})
        if final:
            run.log_final({"val_acc": 70.0}, step=10)
        run.finish(status)
        return run.run_id

    mine = open_recorder(tmp_path, "mine", "dsdm-digits-ipc1")
    trial("mine", "t0")  # this search's own trial: never its twin
    trial("other", "t1", {**params, "distill.lambda1": 49.0})  # another config
    trial("other", "t2", {**params, "distill.seed": 2})  # another seed
    trial("other", "t3", status="KILLED")
    trial("other", "t4", final=False)
    trial("other", "t5", compute="cuda x1")
    assert mine.finished_twin(params, "cpu x1") is None
    first = trial("other", "t6", compute=None)  # from before the compute tag: any compute
    trial("third", "t7")
    twin = mine.finished_twin(params, "cpu x1")
    assert twin.info.run_id == first and json.loads(twin.data.tags[rec.FINAL_TAG]) == {"val_acc": 70.0}
    assert mine.finished_twin(params, "cuda x1").data.tags[rec.TRIAL_TAG] == "t5"


def test_close_open_runs_ends_every_running_run_but_the_one_kept(tmp_path):
    r = open_recorder(tmp_path, "s")
    parent = r.parent("s")
    done, _ = r.trial("t1", parent.run_id)
    done.finish()
    r.trial("t2", parent.run_id)
    assert r.close_open_runs("KILLED", keep=parent.run_id) == 1
    statuses = {x.data.tags.get(rec.TRIAL_TAG, "parent"): x.info.status for x in r._search({})}
    assert statuses == {"parent": "RUNNING", "t1": "FINISHED", "t2": "KILLED"}


def test_metrics_skip_non_finite_values_and_last_step_reads_the_history(tmp_path):
    r = open_recorder(tmp_path, "s")
    run = r.parent("s")
    run.log_metrics({"iteration": 3, "loss": float("nan"), "node": "n1"}, step=3)
    run.log_metrics({"iteration": 5}, step=5)
    assert run.last_step("iteration") == 5 and run.last_step("loss") == -1
    run.log_params({"a": 1})
    run.log_params({"a": 2, "b": 3})  # params once: the first value stays
    assert r.client.get_run(run.run_id).data.params == {"a": "1", "b": "3"}


STORE = """
import sys, time, pathlib
go = pathlib.Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
from tune.recorder import Recorder
print(Recorder.open(sys.argv[1], "dsdm-digits-ipc10", None, "s").experiment_id)
"""


def test_two_searches_create_one_new_mlflow_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", STORE, uri, str(tmp_path / "go")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    (tmp_path / "go").touch()  # all three start on the new store at once
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-1500:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1  # one experiment, created once


def test_eval_metrics_prefix_keeps_cross_arch_apart_from_the_trials_own():
    result = {"convnet3": {"mean": 50.0, "std": 2.0, "val_mean": 49.0, "runs": [48.0, 52.0]}}
    assert rec.eval_metrics(result) == {"acc_mean/convnet3": 50.0, "acc_std/convnet3": 2.0,
                                        "val_acc_mean/convnet3": 49.0, "acc_run0/convnet3": 48.0,
                                        "acc_run1/convnet3": 52.0}
    assert set(rec.eval_metrics(result, prefix=rec.XARCH)) == {f"xarch/{k}" for k in rec.eval_metrics(result)}
