"""The Ray zoo pool trains a group of models per actor call (zoo.group_size) and keeps every model
once, saved each on its own, even when the actor training the group dies mid-call; a zoo phase
cut short keeps its finished models for the next run."""
from __future__ import annotations

import json

import pytest
import torch

from dsdm.config import make_config
from dsdm.zoo import ModelZoo, train_zoo

pytestmark = pytest.mark.slow  # Ray end to end


@pytest.fixture()
def ray_with_fault(tmp_path, monkeypatch):
    """Ray on 2 CPUs whose workers see DSDM_FAULT_ZOO_KILL_INDEX=1: the first actor call that
    starts model 1 dies (os._exit), as an OOM kill would."""
    import ray

    from tune.runner import start_ray

    monkeypatch.setenv("DSDM_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("DSDM_FAULT_ZOO_KILL_INDEX", "1")
    start_ray(None, 2)
    yield tmp_path
    ray.shutdown()


def test_an_actor_call_trains_a_group_and_a_lost_group_is_retrained(digits, tmp_path, ray_with_fault):
    from tune.zoo import load_or_train_zoo_on_pool, put_dataset

    cfg = make_config("smoke", {"data.dataset": "digits", "zoo.group_size": 2, "zoo.num_models": 3}).zoo
    refs, info = load_or_train_zoo_on_pool(digits, put_dataset(digits), cfg, tmp_path / "runs", 0, 0.1,
                                           num_actors=1, cpus_per_actor=1, progress=lambda line: None)
    fired = json.loads((ray_with_fault / "zoo_kill_index.fired").read_text())
    assert fired["value"] == 1
    models = {m["index"]: m for m in info["models"]}
    assert sorted(models) == [0, 1, 2]  # every model exactly once
    assert models[0]["group"] == models[1]["group"] == [0, 1] and models[2]["group"] == [2]
    assert models[0]["actor"] == models[1]["actor"]  # one call trained both
    assert models[1]["restarted"] or models[1]["resubmitted"]  # the lost call was run again
    manifest = json.loads((tmp_path / "runs" / "zoos" / info["folder"].split("/")[-1] / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [f"model{i:03d}_epoch001.pt" for i in range(3)]  # saved each as before
    assert_same_models_as_one_process(digits, cfg, info["folder"])


def assert_same_models_as_one_process(digits, cfg, folder) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the actor (1 CPU): the same reduction order, so the same bits
    try:
        local = train_zoo(digits, cfg)  # the same models as one process trains one at a time
    finally:
        torch.set_num_threads(threads)
    saved = ModelZoo.load(folder)
    assert len(saved.state_dicts[1]) == len(local.state_dicts[1]) == cfg.num_models
    for a, b in zip(local.state_dicts[1], saved.state_dicts[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def folders(path):
    """The zoo folders under `path`, without their `.lock` files (kept: flock needs a file)."""
    return [p for p in path.iterdir() if p.is_dir()]


def test_a_zoo_interrupted_after_two_models_trains_only_the_third_when_run_again(digits, tmp_path, monkeypatch):
    import ray

    from tune.runner import start_ray
    from tune.zoo import load_or_train_zoo_on_pool, put_dataset

    cfg = make_config("smoke", {"data.dataset": "digits", "zoo.num_models": 3}).zoo
    (tmp_path / "faults").mkdir()
    monkeypatch.setenv("DSDM_FAULT_DIR", str(tmp_path / "faults"))
    monkeypatch.setenv("DSDM_FAULT_DRIVER_ZOO_DONE", "1@raise")  # the driver fails once model 2 of 3 is in
    zoos, lines = tmp_path / "runs" / "zoos", []
    start_ray(None, 1)
    try:
        data_ref = put_dataset(digits)
        train = lambda: load_or_train_zoo_on_pool(digits, data_ref, cfg, tmp_path / "runs", 0, 0.1,  # noqa: E731
                                                  num_actors=1, cpus_per_actor=1, progress=lines.append)
        with pytest.raises(RuntimeError, match="fault injected at driver_zoo_done=1"):
            train()
        (partial,) = folders(zoos)
        assert partial.name.endswith(".partial") and sorted(p.name for p in partial.iterdir()) == [
            "model000.pt", "model001.pt"]  # one actor: models in index order, each written as it arrived
        lines.clear()
        _, info = train()
    finally:
        ray.shutdown()
    assert lines[0] == f"zoo: 2/3 models finished by an earlier run, kept from {partial}", lines
    assert [m["resumed"] for m in info["models"]] == [True, True, False] and info["trained"]
    assert [p.name for p in folders(zoos)] == [partial.name.removesuffix(".partial")]  # the partial folder is gone
    assert_same_models_as_one_process(digits, cfg, info["folder"])
