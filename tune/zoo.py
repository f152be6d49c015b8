"""Pre-train the zoo on a Ray actor pool and share it through the object store.

The driver puts the dataset in the object store once (numpy arrays: zero-copy for
readers on the same node), a pool of actors runs `dsdm.zoo.pretrain_group` for the M
models in parallel, a group of `dsdm.zoo.zoo_groups` models per call (one model on CPU;
on CUDA the zoo split over the actors, each group trained as one stacked model), and each
snapshot is put in the object store once. Trials receive
the grid of ObjectRefs and fetch only the snapshots they use. The actors are killed
before Tune starts: trials would otherwise wait forever for the CPUs they hold.

Faults: an actor that dies mid-training is restarted by Ray (max_restarts) and its task
retried (max_task_retries); if it is still lost, the pool re-submits that group to a fresh
actor. Results are keyed by model index, so every model lands in the zoo exactly once. Each
finished model is written at once to `<zoo folder>.partial/` (`FinishedModels`), so a search
interrupted in the zoo phase trains only the models still missing when it is run again (a
model's seed depends on its index alone). A persisted zoo whose manifest checksums no longer
match is moved aside and trained again.
Fault points (tune/faults.py) mark where the fault-injection tests strike.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from dsdm.config import ZooConfig
from dsdm.data import Dataset
from dsdm.errors import DsdmError
from dsdm.io import atomic_torch_save
from dsdm.zoo import ModelZoo, pretrain_group, read_manifest, zoo_arch, zoo_groups, zoo_key
from tune.faults import fault_point

TENSOR_FIELDS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
MAX_SUBMITS = 3  # times the pool hands one model to an actor before giving up
HEARTBEAT_S = 20.0  # a progress line at least this often while the zoo trains


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


class FinishedModels:
    """The models of a zoo still in training that are already done: one `model<i>.pt` each under
    `<zoo folder>.partial/`, written atomically as each arrives, read back by the next run, and
    removed once the whole zoo is saved."""

    RECORD = ("index", "group", "node", "actor", "pid", "restarted", "seconds", "test_acc")

    def __init__(self, zoo_folder: Path):
        self.folder = zoo_folder.with_name(zoo_folder.name + ".partial")

    def load(self, num_models: int, progress: Callable[[str], None]) -> dict[int, dict]:
        done = {}
        for path in sorted(self.folder.glob("model*.pt")):
            try:
                record = torch.load(path, map_location="cpu", weights_only=True)
                index = int(record["index"])
                snapshots = {int(e): state_to_numpy(sd) for e, sd in record["snapshots"].items()}
            except Exception as exc:  # a foreign or damaged file costs that model's training, nothing else
                progress(f"zoo: ignoring {path} ({type(exc).__name__}); that model is trained again")
                continue
            if 0 <= index < num_models:
                done[index] = {**{k: record[k] for k in self.RECORD}, "snapshots": snapshots, "resumed": True}
        if done:
            progress(f"zoo: {len(done)}/{num_models} models finished by an earlier run, kept from {self.folder}")
        return done

    def save(self, result: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {k: result[k] for k in self.RECORD}
        record["snapshots"] = {e: state_from_numpy(s) for e, s in result["snapshots"].items()}
        atomic_torch_save(record, self.folder / f"model{result['index']:03d}.pt")

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# --- the pool --------------------------------------------------------------------------------
@ray.remote
class PretrainWorker:
    """One group of zoo models per call; torch threads pinned to the CPUs the actor holds."""

    def __init__(self, threads: int):
        torch.set_num_threads(max(1, threads))
        context = ray.get_runtime_context()
        self.node, self.actor = context.get_node_id(), context.get_actor_id()
        self.restarted = bool(context.was_current_actor_reconstructed)

    def train(self, data_payload: dict, cfg: dict, indices: list[int], device: str) -> list[dict]:
        """One result per model of the group (`seconds`: the group's wall time)."""
        for index in indices:
            fault_point("zoo_kill_index", index, actor=self.actor, node=self.node)
        dataset = dataset_from_store(data_payload)
        if device == "cuda" and not torch.cuda.is_available():  # GPUs declared, no CUDA device: CPU
            device = "cpu"
        start = time.time()
        results = pretrain_group(dataset, ZooConfig(**{**cfg, "snapshots": tuple(cfg["snapshots"])}), indices, device)
        return [{"index": index, "group": list(indices), "node": self.node, "actor": self.actor, "pid": os.getpid(),
                 "restarted": self.restarted, "seconds": time.time() - start,
                 "snapshots": {e: state_to_numpy(sd) for e, sd in result["snapshots"].items()},
                 "test_acc": result["test_acc"]} for index, result in zip(indices, results)]


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
                      progress: Callable[[str], None] = print,
                      finished: FinishedModels | None = None) -> tuple[ModelZoo, list[dict]]:
    """Train M models on `num_actors` actors; return the zoo and per-model (node, actor, seconds).

    Each group of model indices (`zoo_groups`) is handed to one idle actor; a lost actor (its death
    outlived Ray's own restart + task retry) is replaced and the group re-submitted, at most
    MAX_SUBMITS times. With `finished`, models an earlier run finished are taken from it and each
    new one is written to it as it arrives.
    """
    from ray.exceptions import RayActorError, RayTaskError

    device = "cuda" if gpus_per_actor > 0 else "cpu"
    worker = PretrainWorker.options(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, resources=resources or {},
                                    max_restarts=2, max_task_retries=2)

    def new_actor():
        return worker.remote(max(1, int(cpus_per_actor)))

    done: dict[int, dict] = finished.load(cfg.num_models, progress) if finished is not None else {}
    missing = cfg.num_models - len(done)
    actors = [new_actor() for _ in range(max(1, min(num_actors, missing)))] if missing else []
    groups = [g for g in ([i for i in group if i not in done] for group in zoo_groups(cfg, device, len(actors) or 1)) if g]
    cfg_dict = {**asdict(cfg), "snapshots": list(cfg.snapshots)}
    zoo = ModelZoo(zoo_arch(cfg, dataset), dataset.name, dataset.channels, dataset.num_classes,
                   dataset.image_size, cfg_dict)
    submits = {i: 0 for i in range(cfg.num_models)}
    resubmitted: list[int] = []
    todo, idle, running = deque(groups), list(actors), {}
    started = time.time()
    if missing:
        progress(f"zoo: pre-training {missing} model(s) on {len(actors)} actor(s)")
    try:
        while todo or running:
            while todo and idle:
                actor, group = idle.pop(), todo.popleft()
                for index in group:
                    submits[index] += 1
                running[actor.train.remote(data_ref, cfg_dict, group, device)] = (actor, group)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=HEARTBEAT_S)
            if not ready:  # actors starting (tens of seconds under load) or a slow model: say so
                progress(f"zoo: {len(done)}/{cfg.num_models} models done, {len(running)} training, "
                         f"{time.time() - started:.0f}s elapsed")
                continue
            actor, group = running.pop(ready[0])
            names = f"zoo model{'s' if len(group) > 1 else ''} {', '.join(str(i + 1) for i in group)}/{cfg.num_models}"
            try:
                results = ray.get(ready[0])
            except RayTaskError as exc:  # an exception inside pretrain_one: retrying would repeat it
                if isinstance(getattr(exc, "cause", None), DsdmError):
                    raise DsdmError(str(exc.cause)) from None
                raise
            except RayActorError as exc:
                if max(submits[i] for i in group) >= MAX_SUBMITS:
                    raise DsdmError(f"{names} lost {max(submits[i] for i in group)} times ({type(exc).__name__}); "
                                    "check the workers' memory and logs, then rerun (finished work is kept)") from None
                progress(f"{names}: actor lost ({type(exc).__name__}); re-submitting to a fresh actor")
                ray.kill(actor, no_restart=True)
                actors.append(new_actor())
                idle.append(actors[-1])
                todo.appendleft(group)
                resubmitted.extend(group)
                continue
            idle.append(actor)
            fresh = [r for r in results if r["index"] not in done]  # never twice, whatever a retry did
            done.update((r["index"], r) for r in fresh)
            for r in fresh if finished is not None else ():
                finished.save(r)
            if fresh:
                progress(f"{names} done on node {fresh[0]['node'][:8]} in {fresh[0]['seconds']:.1f}s "
                         f"({len(done)}/{cfg.num_models})" + (" by a restarted actor" if fresh[0]["restarted"] else ""))
            for r in fresh:
                fault_point("driver_zoo_done", r["index"])  # the driver interrupted in the zoo phase
    finally:
        release(actors)
    for index in sorted(done):  # model order = index, whatever finished first
        result = done[index]
        zoo.add({"snapshots": {e: state_from_numpy(s) for e, s in result["snapshots"].items()},
                 "test_acc": result["test_acc"]})
    keys = ("index", "group", "node", "actor", "pid", "restarted", "seconds")
    return zoo, [{**{k: done[i][k] for k in keys}, "submits": submits[i], "resubmitted": i in resubmitted,
                  "resumed": done[i].get("resumed", False)} for i in sorted(done)]


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
    """The zoo persisted under `storage/zoos/<key>`: reused when present, else trained and saved.

    A zoo that fails its manifest's sha256 check is moved aside (kept, not deleted) to
    `<key>.corrupt-<time>` and trained again; `info["recovered"]` says what happened.
    """
    folder = Path(storage) / "zoos" / zoo_key(dataset, cfg, data_seed, val_fraction)
    with zoo_lock(folder, progress):  # two searches starting together on one storage train it once
        return _load_or_train(folder, dataset, data_ref, cfg, num_actors, cpus_per_actor, gpus_per_actor,
                              resources, progress)


@contextlib.contextmanager
def zoo_lock(folder: Path, progress: Callable[[str], None] = print, every_s: float = 20.0):
    """Hold `<zoo folder>.lock` (flock, released if the process dies); while another process holds
    it, wait, saying so every `every_s` seconds."""
    import fcntl

    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as fh:
        waited = None
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited is None or time.time() - waited >= every_s:
                    progress(f"zoo: another search is pre-training this zoo into {folder}; waiting to reuse it")
                    waited = time.time()
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_or_train(folder: Path, dataset: Dataset, data_ref, cfg: ZooConfig, num_actors: int,
                   cpus_per_actor: float, gpus_per_actor: float, resources: dict | None,
                   progress: Callable[[str], None]) -> tuple[ZooRefs, dict]:
    info = {"folder": str(folder), "trained": False, "models": []}
    zoo = None
    if (folder / "manifest.json").is_file():
        try:
            zoo = ModelZoo.load(folder)
            progress(f"zoo: reusing {folder}")
        except DsdmError as exc:
            aside = folder.with_name(f"{folder.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            os.replace(folder, aside)
            info["recovered"] = {"error": str(exc), "moved_to": str(aside)}
            print(f"zoo: {folder} failed its integrity check ({str(exc).split(';')[0]}); "
                  f"moved it to {aside} and pre-training the zoo again", file=sys.stderr, flush=True)
    if zoo is None:
        start = time.time()
        finished = FinishedModels(folder)
        zoo, info["models"] = train_zoo_on_pool(data_ref, dataset, cfg, num_actors, cpus_per_actor,
                                                gpus_per_actor, resources, progress, finished)
        zoo.save(folder)
        finished.clear()  # after the manifest: an interrupt in between keeps both, and the zoo wins
        info.update(trained=True, seconds=time.time() - start)
        progress(f"zoo: {cfg.num_models} models trained in {info['seconds']:.1f}s, saved to {folder}")
    info["manifest"] = read_manifest(folder)  # config, files and checksums: readable where the folder is not
    return put_zoo(zoo), info
