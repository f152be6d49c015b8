"""A real two-node Ray cluster on one machine (loopback), with faults injected while it runs.

`ray.cluster_utils.Cluster` starts a head raylet (custom resource `head`) and a second raylet
(`worker`), 1 CPU each, both on 127.0.0.1. `python -m tune.search --address` joins it as a
separate driver process. One run covers:

- placement: the 2 zoo actors (1 CPU each) and the 2 trials (1 CPU each) land on both nodes;
- data path: every Ray worker process of both nodes starts with a `sitecustomize` that makes
  reading a dataset from disk raise (and leaves a marker), so the run can only succeed if the
  dataset reached the workers through the object store; the driver records that the dataset
  object has a copy on the worker node;
- fault (a): the actor training zoo model 1 dies (`os._exit`) the first time it starts it;
- fault (b): the first trial to reach distillation iteration 2 dies (`os._exit`); Tune retries
  it from its checkpoint at iteration 1;
- teardown: every process of both nodes is gone after `Cluster.shutdown()`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow  # Ray and subprocess searches end to end

REPO = Path(__file__).resolve().parents[1]
NAME = "digits-ipc10-smoke"
TINY = ["--set", "distill.iterations=3", "--set", "distill.checkpoint_every=1", "--set", "distill.log_every=1",
        "--set", "distill.batch_real=8", "--set", "distill.aug_pool=1", "--set", "zoo.max_per_class=10",
        "--set", "eval.runs=1", "--set", "eval.epochs=1"]

# Loaded by every Python process a raylet of the test cluster starts (PYTHONPATH of the raylet).
POISON = '''
import os, sys
_marks, _node = os.environ.get("DSDM_POISON_MARKS"), os.environ.get("DSDM_POISON_NODE", "?")
if _marks and any(a.endswith("default_worker.py") for a in sys.argv):
    import importlib.abc, importlib.util
    open(os.path.join(_marks, f"{_node}-{os.getpid()}"), "w").close()

    def _refuse(*args, **kwargs):
        open(os.path.join(_marks, f"violation-{_node}-{os.getpid()}"), "w").close()
        raise RuntimeError("a Ray worker read a dataset from disk; it must come through the object store")

    class _Poison(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "sklearn.datasets":
                _refuse()
            if name != "dsdm.data":
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            real_exec = spec.loader.exec_module

            def exec_module(module):
                real_exec(module)
                for key in module.LOADERS:
                    module.LOADERS[key] = _refuse
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Poison())
'''


def read_results(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "poison").mkdir()
    (tmp / "poison" / "sitecustomize.py").write_text(POISON)
    marks, faults, storage = tmp / "marks", tmp / "faults", tmp / "storage"
    marks.mkdir()
    faults.mkdir()

    def node_env(node: str) -> dict:
        return {"PYTHONPATH": str(tmp / "poison"), "DSDM_POISON_MARKS": str(marks), "DSDM_POISON_NODE": node,
                "OMP_WAIT_POLICY": "PASSIVE"}

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1},
                                                            "env_vars": node_env("head")})
    state = {"cluster": cluster, "down": False}
    try:
        worker = cluster.add_node(num_cpus=1, resources={"worker": 1}, env_vars=node_env("worker"))
        cluster.wait_for_nodes()
        env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "DSDM_FAULT_DIR": str(faults), "DSDM_FAULT_ZOO_KILL_INDEX": "1", "DSDM_FAULT_TRIAL_EXIT_AT": "2"}
        env.pop("RAY_ADDRESS", None)
        cmd = [sys.executable, "-m", "tune.search", "--dataset", "digits", "--budget", "smoke", "--num-samples", "2",
               "--address", cluster.address, "--storage", str(storage), "--zoo-cpus", "1", "--trial-cpus", "1",
               "--max-failures", "2", "--cross-arch", "none", *TINY]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
        state.update(proc=proc, storage=storage, marks=marks, faults=faults,
                     head=cluster.head_node.node_id, worker=worker.node_id,
                     processes=[p.process for n in (cluster.head_node, worker)
                                for infos in n.all_processes.values() for p in infos])
        yield state
    finally:
        if not state["down"]:
            cluster.shutdown()


def test_cluster_search_runs_through_address(cluster_run):
    proc = cluster_run["proc"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = pq.read_table(cluster_run["storage"] / NAME / "trials.parquet").to_pandas()
    assert len(table) == 2 and set(table["status"]) == {"DONE"}, table


def test_cluster_zoo_actors_and_trials_ran_on_both_nodes(cluster_run):
    nodes = {cluster_run["head"], cluster_run["worker"]}
    zoo = json.loads((cluster_run["storage"] / f"{NAME}.zoo.json").read_text())
    assert {m["node"] for m in zoo["models"]} == nodes, zoo["models"]
    trial_nodes = {r["node"] for d in (cluster_run["storage"] / NAME).glob("run_trial_*")
                   for r in read_results(d) if "node" in r}
    assert trial_nodes == nodes
    placement = json.loads((cluster_run["storage"] / f"{NAME}.cluster.json").read_text())
    by_id = {n["node_id"]: n["resources"] for n in placement["nodes"]}
    assert by_id[cluster_run["head"]].get("head") == 1 and by_id[cluster_run["worker"]].get("worker") == 1


def test_cluster_data_reached_worker_through_object_store(cluster_run):
    marks = {p.name for p in cluster_run["marks"].iterdir()}
    assert not [m for m in marks if m.startswith("violation")], marks  # no worker read the dataset from disk
    assert any(m.startswith("head-") for m in marks) and any(m.startswith("worker-") for m in marks), marks
    placement = json.loads((cluster_run["storage"] / f"{NAME}.cluster.json").read_text())
    assert cluster_run["worker"] in placement["dataset_object"]["node_ids"], placement  # pulled over to the worker
    assert placement["dataset_object"]["bytes"] > 100_000  # in plasma, not inlined in a task


def test_fault_zoo_actor_dies_pool_completes_every_model_once(cluster_run):
    fired = json.loads((cluster_run["faults"] / "zoo_kill_index.fired").read_text())
    zoo = json.loads((cluster_run["storage"] / f"{NAME}.zoo.json").read_text())
    assert sorted(m["index"] for m in zoo["models"]) == [0, 1]  # every model exactly once
    killed = next(m for m in zoo["models"] if m["index"] == 1)
    assert killed["restarted"] or killed["resubmitted"], killed  # Ray restarted the actor or the pool re-submitted
    assert killed["pid"] != fired["pid"]  # finished by another process than the one that died
    manifest = json.loads((Path(zoo["folder"]) / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model000_epoch001.pt", "model001_epoch001.pt"]


def test_fault_killed_trial_continues_from_checkpoint(cluster_run):
    fired = json.loads((cluster_run["faults"] / "trial_exit_at.fired").read_text())
    assert fired["value"] == 2 and fired["resumed_from"] == 0
    table = pq.read_table(cluster_run["storage"] / NAME / "trials.parquet").to_pandas().set_index("trial_id")
    row = table.loc[fired["trial"]]
    assert row["status"] == "DONE" and row["iteration"] == 3
    assert row["resumed_from"] == 1  # the retry loaded the checkpoint of iteration 1, it did not restart at 0
    trial_dir = next((cluster_run["storage"] / NAME).glob(f"run_trial_{fired['trial']}_*"))
    iterations = [r["iteration"] for r in read_results(trial_dir) if "test_acc" not in r]
    assert iterations == [1, 2, 3], iterations  # reported once each: no iteration was redone
    other = table.drop(index=fired["trial"])
    assert (other["resumed_from"] == 0).all()


def test_cluster_tears_down_cleanly(cluster_run):
    assert cluster_run["processes"], "no node processes recorded"
    cluster_run["cluster"].shutdown()
    cluster_run["down"] = True
    for process in cluster_run["processes"]:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"Ray process {process.pid} ({process.args}) still alive after Cluster.shutdown()")
