"""Coreset baselines: Random, Herding and K-Center, per class, in a pre-trained net's embedding."""
from __future__ import annotations

from typing import Callable

import torch

from dsdm.augment import normalize
from dsdm.data import Dataset
from dsdm.errors import DsdmError
from dsdm.synthetic import SyntheticSet


def random_select(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(len(features), generator=generator)[:k]


def herding_select(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy mean matching (Welling 2009): each pick brings the running mean closest to mu."""
    mu = features.mean(0)  # (d,)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(features), dtype=torch.bool)
    for t in range(1, k + 1):
        # distance of the mean after adding each candidate to the class mean
        dist = ((running * (t - 1) + features) / t - mu).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running = (running * (t - 1) + features[i]) / t
    return torch.tensor(chosen)


def kcenter_select(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy farthest-point (Sener & Savarese 2018), started at the sample nearest the mean."""
    first = int((features - features.mean(0)).norm(dim=1).argmin())
    chosen = [first]
    min_dist = (features - features[first]).norm(dim=1)
    for _ in range(k - 1):
        i = int(min_dist.argmax())
        chosen.append(i)
        min_dist = torch.minimum(min_dist, (features - features[i]).norm(dim=1))
    return torch.tensor(chosen)


SELECTORS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "random": random_select,
    "herding": herding_select,
    "kcenter": kcenter_select,
}


@torch.no_grad()
def embed_all(model: torch.nn.Module, x: torch.Tensor, mean, std, batch_size: int = 512) -> torch.Tensor:
    device = next(model.parameters()).device
    parts = [model.embed(normalize(x[i:i + batch_size].to(device), mean, std)).cpu()
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts)  # (N, d)


def select_coreset(method: str, dataset: Dataset, ipc: int, seed: int = 0,
                   model: torch.nn.Module | None = None, config: dict | None = None) -> SyntheticSet:
    """Pick `ipc` real training images per class; Herding/K-Center need `model` (pre-trained)."""
    if method not in SELECTORS:
        raise DsdmError(f"unknown coreset method '{method}'; choose one of: {', '.join(SELECTORS)}")
    check_ipc(dataset, ipc)
    if method != "random" and model is None:
        raise DsdmError(f"{method} selects in a pre-trained network's embedding; pass a zoo model")
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for c, idx in enumerate(dataset.class_indices()):
        x_c = dataset.train_x[idx]
        feats = x_c.flatten(1) if method == "random" else embed_all(model, x_c, dataset.mean, dataset.std)
        picks.append(idx[SELECTORS[method](feats, ipc, generator)])
    keep = torch.cat(picks)
    return SyntheticSet(images=dataset.train_x[keep].clone(), labels=dataset.train_y[keep].clone(),
                        grid=(1, 1), dataset=dataset.name, mean=dataset.mean, std=dataset.std,
                        config=config or {})


def check_ipc(dataset: Dataset, ipc: int, per_image: int = 1) -> None:
    """IPC (times the tiles one stored image takes at init) must fit in every class."""
    smallest = min(len(idx) for idx in dataset.class_indices())
    if ipc < 1 or ipc * per_image > smallest:
        raise DsdmError(f"ipc={ipc} needs {ipc * per_image} real images per class but the smallest "
                        f"class of '{dataset.name}' has {smallest} in the training split; lower --ipc")


def check_ipc_fits(dataset: Dataset, cfg) -> None:
    """IPC (times the tiles each stored image starts from, for DSDM and DM) fits in the smallest class."""
    from dsdm.synthetic import tile_grid

    rows, cols = tile_grid(cfg.distill.factor, dataset.kind)
    check_ipc(dataset, cfg.distill.ipc, per_image=rows * cols if cfg.distill.method in ("dsdm", "dm") else 1)
