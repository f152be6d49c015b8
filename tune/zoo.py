"""Pre-train the zoo on a Ray actor pool and share it through the object store.

The driver puts the dataset in the object store once (numpy arrays: zero-copy for
readers on the same node), a pool of actors runs `dsdm.zoo.pretrain_one` for the M
models in parallel, and each snapshot is put in the object store once. Trials receive
the grid of ObjectRefs and fetch only the snapshots they use. The actors are killed
before Tune starts: trials would otherwise wait forever for the CPUs they hold.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from ray.util import ActorPool

from dsdm.config import ZooConfig
from dsdm.data import Dataset
from dsdm.zoo import ModelZoo, pretrain_one, zoo_arch, zoo_key

TENSOR_FIELDS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


# --- dataset through the object store --------------------------------------------------------
def put_dataset(dataset: Dataset) -> ray.ObjectRef:
    payload = {f.name: getattr(dataset, f.name) for f in fields(dataset) if not f.name.startswith("_")}
    for name in TENSOR_FIELDS:
        payload[name] = payload[name].numpy()
    return ray.put(payload)


def dataset_from_store(payload: dict) -> Dataset:
    """Rebuild a Dataset around the object store's read-only numpy arrays (no copy)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # we never write to them
        tensors = {name: torch.from_numpy(payload[name]) for name in TENSOR_FIELDS}
    return Dataset(**{**payload, **tensors})


def state_to_numpy(state_dict: dict) -> dict:
    return {k: v.numpy() for k, v in state_dict.items()}


def state_from_numpy(state: dict) -> dict:
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


# --- the pool --------------------------------------------------------------------------------
@ray.remote
class PretrainWorker:
    """One zoo model at a time; torch threads pinned to the CPUs the actor holds."""

    def __init__(self, threads: int):
        torch.set_num_threads(max(1, threads))
        context = ray.get_runtime_context()
        self.node, self.actor = context.get_node_id(), context.get_actor_id()

    def train(self, data_payload: dict, cfg: dict, index: int, device: str) -> dict:
        dataset = dataset_from_store(data_payload)
        start = time.time()
        result = pretrain_one(dataset, ZooConfig(**{**cfg, "snapshots": tuple(cfg["snapshots"])}), index, device)
        return {"index": index, "node": self.node, "actor": self.actor, "seconds": time.time() - start,
                "snapshots": {e: state_to_numpy(sd) for e, sd in result["snapshots"].items()},
                "test_acc": result["test_acc"]}


@dataclass
class ZooRefs:
    """What trials receive: snapshot ObjectRefs by [epoch][model] plus the zoo's shape."""
    arch: str
    dataset: str
    channels: int
    num_classes: int
    image_size: tuple[int, int]
    config: dict
    refs: dict[int, list]
    test_acc: dict[int, list[float]]

    def materialise(self, num_models: int, epoch: int) -> ModelZoo:
        """A ModelZoo holding only the M snapshots at epoch E that a trial uses."""
        zoo = ModelZoo(self.arch, self.dataset, self.channels, self.num_classes, self.image_size, self.config)
        zoo.state_dicts[epoch] = [state_from_numpy(s) for s in ray.get(self.refs[epoch][:num_models])]
        zoo.test_acc[epoch] = self.test_acc[epoch][:num_models]
        return zoo


def train_zoo_on_pool(data_ref, dataset: Dataset, cfg: ZooConfig, num_actors: int, cpus_per_actor: float,
                      gpus_per_actor: float = 0.0, resources: dict | None = None,
                      progress: Callable[[str], None] = print) -> tuple[ModelZoo, list[dict]]:
    """Train M models on `num_actors` actors; return the zoo and per-model (node, seconds)."""
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    worker = PretrainWorker.options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, resources=resources or {},
                                    max_restarts=2, max_task_retries=2)
    actors = [worker.remote(max(1, int(cpus_per_actor))) for _ in range(num_actors)]
    cfg_dict = {**asdict(cfg), "snapshots": list(cfg.snapshots)}
    zoo = ModelZoo(zoo_arch(cfg, dataset), dataset.name, dataset.channels, dataset.num_classes,
                   dataset.image_size, cfg_dict)
    done: list[dict] = []
    try:
        pool = ActorPool(actors)
        jobs = pool.map_unordered(lambda a, i: a.train.remote(data_ref, cfg_dict, i, device), range(cfg.num_models))
        for result in jobs:
            done.append(result)
            progress(f"zoo model {result['index'] + 1}/{cfg.num_models} done on node {result['node'][:8]} "
                     f"in {result['seconds']:.1f}s ({len(done)}/{cfg.num_models})")
    finally:
        release(actors)
    for result in sorted(done, key=lambda r: r["index"]):  # model order = index, whatever finished first
        zoo.add({"snapshots": {e: state_from_numpy(s) for e, s in result["snapshots"].items()},
                 "test_acc": result["test_acc"]})
    return zoo, [{k: r[k] for k in ("index", "node", "actor", "seconds")} for r in done]


def release(actors: list, timeout_s: float = 30.0) -> None:
    """Kill the actors and wait until Ray sees their CPUs free again (see the deadlock note)."""
    for actor in actors:
        ray.kill(actor, no_restart=True)
    deadline = time.time() + timeout_s
    total = ray.cluster_resources().get("CPU", 0)
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < total:
        time.sleep(0.2)


def put_zoo(zoo: ModelZoo) -> ZooRefs:
    """Each snapshot goes into the object store once."""
    refs = {e: [ray.put(state_to_numpy(sd)) for sd in sds] for e, sds in zoo.state_dicts.items()}
    return ZooRefs(zoo.arch, zoo.dataset, zoo.channels, zoo.num_classes, tuple(zoo.image_size),
                   zoo.config, refs, zoo.test_acc)


def load_or_train_zoo_on_pool(dataset: Dataset, data_ref, cfg: ZooConfig, storage: Path, data_seed: int,
                              val_fraction: float, num_actors: int, cpus_per_actor: float,
                              gpus_per_actor: float = 0.0, resources: dict | None = None,
                              progress: Callable[[str], None] = print) -> tuple[ZooRefs, dict]:
    """The zoo persisted under `storage/zoos/<key>`: reused when present, else trained and saved."""
    folder = Path(storage) / "zoos" / zoo_key(dataset, cfg, data_seed, val_fraction)
    info = {"folder": str(folder), "trained": False, "models": []}
    if (folder / "manifest.json").is_file():
        zoo = ModelZoo.load(folder)
        progress(f"zoo: reusing {folder}")
    else:
        start = time.time()
        zoo, info["models"] = train_zoo_on_pool(data_ref, dataset, cfg, num_actors, cpus_per_actor,
                                                gpus_per_actor, resources, progress)
        zoo.save(folder)
        info.update(trained=True, seconds=time.time() - start)
        progress(f"zoo: {cfg.num_models} models trained in {info['seconds']:.1f}s, saved to {folder}")
    return put_zoo(zoo), info
