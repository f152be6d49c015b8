"""The model zoo: M networks pre-trained on the real data, with snapshots at several epochs.

One zoo serves every E of a sweep: model i is trained once to max(snapshots) and its
weights are kept at each snapshot epoch. Weights live in memory (no disk read per
distillation iteration); on disk a zoo is a folder of state-dict files plus a manifest
with each file's sha256, so a corrupted snapshot is detected on load.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from dsdm.config import ZooConfig
from dsdm.data import Dataset
from dsdm.errors import DsdmError
from dsdm.recipes import zoo_recipe
from dsdm.io import atomic_torch_save, atomic_write_text, sha256_file
from dsdm.models import build_model
from dsdm.train import accuracy, speed_levers, stack_networks, train_classifiers

# how a zoo is trained, not which zoo (not in zoo_key); precision is in it when not fp32 (bf16 rounds the weights)
SPEED_LEVERS = ("train_path", "compile", "batch_nets", "group_size")
PRETRAIN_CALLS = 0  # models pre-trained in this process; Tune trials report it (must stay 0)


def zoo_arch(cfg: ZooConfig, dataset: Dataset) -> str:
    if cfg.arch != "auto":
        return cfg.arch
    return "convnet4" if dataset.kind == "speech" else "convnet3"


def pretrain_subset(dataset: Dataset, max_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images the zoo sees (never the validation split); CPU budgets subsample."""
    if max_per_class <= 0:
        return dataset.train_x, dataset.train_y
    g = torch.Generator().manual_seed(seed)
    keep = [idx[torch.randperm(len(idx), generator=g)[:max_per_class]] for idx in dataset.class_indices()]
    keep = torch.cat(keep).sort().values
    return dataset.train_x[keep], dataset.train_y[keep]


def pretrain_one(dataset: Dataset, cfg: ZooConfig, index: int, device: torch.device | str = "cpu",
                 on_epoch: Callable[[int], None] | None = None) -> dict:
    """Train zoo model `index`; return {'snapshots': {epoch: state_dict}, 'test_acc': {epoch: acc}}.

    A plain function of its inputs so a Ray actor can call it unchanged.
    """
    return pretrain_group(dataset, cfg, [index], device, on_epoch)[0]


def zoo_groups(cfg: ZooConfig, device: torch.device | str, workers: int = 1) -> list[list[int]]:
    """Model indices per training call (one `pretrain_group` each): zoo.group_size models; with 0
    (auto) the M models split evenly over `workers` when they train stacked (CUDA), else one."""
    stacked = stack_networks(cfg.batch_nets, device)
    size = cfg.group_size or (math.ceil(cfg.num_models / max(1, workers)) if stacked else 1)
    return [list(range(first, min(first + size, cfg.num_models))) for first in range(0, cfg.num_models, size)]


def pretrain_group(dataset: Dataset, cfg: ZooConfig, indices: Sequence[int], device: torch.device | str = "cpu",
                   on_epoch: Callable[[int], None] | None = None) -> list[dict]:
    """`pretrain_one` for each index; with zoo.batch_nets on, trained as one stacked model (same
    seeds, same draws). `on_epoch(epoch)` after each epoch of each model."""
    global PRETRAIN_CALLS
    PRETRAIN_CALLS += len(indices)
    device = torch.device(device)
    seeds = [cfg.seed * 10_000 + i for i in indices]
    arch = zoo_arch(cfg, dataset)
    x, y = pretrain_subset(dataset, cfg.max_per_class, cfg.seed)
    models = [build_model(arch, dataset.channels, dataset.num_classes, dataset.image_size, s).to(device) for s in seeds]
    recipe = speed_levers(zoo_recipe(cfg, dataset.name), len(x), cfg)
    results = [{"snapshots": {}, "test_acc": {}} for _ in indices]

    def keep(epoch: int, k: int, net: torch.nn.Module) -> None:
        if epoch in cfg.snapshots:
            results[k]["snapshots"][epoch] = {n: v.detach().cpu().clone() for n, v in net.state_dict().items()}
            results[k]["test_acc"][epoch] = accuracy(net, dataset.test_x, dataset.test_y, dataset.mean, dataset.std)
        if on_epoch is not None:
            on_epoch(epoch)

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    train_classifiers(models, x.to(device), y.to(device), dataset.mean, dataset.std, recipe, generators, keep,
                      stacked=stack_networks(cfg.batch_nets, device))
    return results


@dataclass
class ModelZoo:
    """state_dicts[epoch][i] is model i's weights after `epoch` epochs of pre-training."""
    arch: str
    dataset: str
    channels: int
    num_classes: int
    image_size: tuple[int, int]
    config: dict  # the ZooConfig that made it (as a dict)
    state_dicts: dict[int, list[dict]] = field(default_factory=dict)
    test_acc: dict[int, list[float]] = field(default_factory=dict)  # reporting only

    @property
    def num_models(self) -> int:
        return min((len(v) for v in self.state_dicts.values()), default=0)

    @property
    def epochs(self) -> list[int]:
        return sorted(self.state_dicts)

    def model(self, index: int, epoch: int, device: torch.device | str = "cpu") -> torch.nn.Module:
        """A frozen network in eval mode holding snapshot (index, epoch)."""
        if epoch not in self.state_dicts:
            raise DsdmError(f"the zoo has no snapshot at epoch {epoch} (has {self.epochs}); "
                            f"pre-train with --snapshots including {epoch}")
        if index >= len(self.state_dicts[epoch]):
            raise DsdmError(f"model {index} asked of a zoo of {len(self.state_dicts[epoch])}; "
                            "pre-train more models (--models) or lower M")
        net = build_model(self.arch, self.channels, self.num_classes, self.image_size, seed=0)
        net.load_state_dict(self.state_dicts[epoch][index])
        net.to(device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def add(self, result: dict) -> None:
        """Append one `pretrain_one` result."""
        for epoch, sd in result["snapshots"].items():
            self.state_dicts.setdefault(int(epoch), []).append(sd)
            self.test_acc.setdefault(int(epoch), []).append(float(result["test_acc"][epoch]))

    # --- disk ----------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for epoch, sds in self.state_dicts.items():
            for i, sd in enumerate(sds):
                name = f"model{i:03d}_epoch{epoch:03d}.pt"
                atomic_torch_save(sd, folder / name)
                files[name] = sha256_file(folder / name)
        manifest = {"format": "dsdm-zoo", "version": 1, "arch": self.arch, "dataset": self.dataset,
                    "channels": self.channels, "num_classes": self.num_classes,
                    "image_size": list(self.image_size), "config": self.config,
                    "test_acc": {str(e): a for e, a in self.test_acc.items()}, "files": files}
        atomic_write_text(folder / "manifest.json", json.dumps(manifest, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "ModelZoo":
        folder = Path(folder)
        manifest = read_manifest(folder)
        zoo = cls(manifest["arch"], manifest["dataset"], manifest["channels"], manifest["num_classes"],
                  tuple(manifest["image_size"]), manifest["config"])
        for name, digest in sorted(manifest["files"].items()):
            path = folder / name
            if not path.is_file() or sha256_file(path) != digest:
                raise DsdmError(f"zoo snapshot '{path}' is missing or corrupted (sha256 mismatch); "
                                f"delete '{folder}' to pre-train again")
            epoch = int(name.split("epoch")[1].split(".")[0])
            zoo.state_dicts.setdefault(epoch, []).append(torch.load(path, map_location="cpu", weights_only=True))
        zoo.test_acc = {int(e): a for e, a in manifest["test_acc"].items()}
        return zoo


def read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        raise DsdmError(f"'{folder}' is not a dsdm zoo (no readable manifest.json); "
                        "pass a folder written by `python -m dsdm pretrain`") from None
    if manifest.get("format") != "dsdm-zoo":
        raise DsdmError(f"'{folder}/manifest.json' is not a dsdm zoo manifest; pass a folder written by `python -m dsdm pretrain`")
    return manifest


def zoo_key(dataset: Dataset, cfg: ZooConfig, data_seed: int = 0, val_fraction: float = 0.1) -> str:
    """What determines a zoo: dataset, split, arch, recipe, seeds and snapshot epochs."""
    spec = {k: v for k, v in asdict(cfg).items() if k not in SPEED_LEVERS and (k, v) != ("precision", "fp32")}
    spec = {**spec, "dataset": dataset.name, "arch": zoo_arch(cfg, dataset),
            "data_seed": data_seed, "val_fraction": val_fraction, "snapshots": sorted(cfg.snapshots)}
    blob = json.dumps(spec, sort_keys=True)
    return f"{dataset.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def train_zoo(dataset: Dataset, cfg: ZooConfig, device="cpu", progress: Callable[[str], None] | None = None) -> ModelZoo:
    """Pre-train all M models in this process (tune.zoo does the same on a Ray actor pool)."""
    zoo = ModelZoo(zoo_arch(cfg, dataset), dataset.name, dataset.channels, dataset.num_classes,
                   dataset.image_size, _jsonable(asdict(cfg)))
    for indices in zoo_groups(cfg, device):
        start = time.time()
        for result in pretrain_group(dataset, cfg, indices, device):
            zoo.add(result)
        if progress is not None:
            done = indices[-1] + 1
            progress(f"zoo model{'s' if len(indices) > 1 else ''} {done}/{cfg.num_models} trained in {time.time() - start:.1f}s")
    return zoo


def load_or_train_zoo(dataset: Dataset, cfg: ZooConfig, cache_root: Path, data_seed: int = 0,
                      val_fraction: float = 0.1, device="cpu", progress=None) -> tuple[ModelZoo, Path]:
    """The zoo for this config from the cache, trained and saved there if absent."""
    folder = Path(cache_root) / zoo_key(dataset, cfg, data_seed, val_fraction)
    if (folder / "manifest.json").is_file():
        return ModelZoo.load(folder), folder
    zoo = train_zoo(dataset, cfg, device, progress)
    zoo.save(folder)
    return zoo, folder


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
