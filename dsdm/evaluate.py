"""Evaluation: train fresh networks on a (decoded) synthetic set, report final-epoch accuracy.

Nothing here selects on test accuracy: each network is trained for the protocol's full
schedule and its *final* weights are scored once on the validation split (for any
selection a caller makes) and once on the test split (for reporting only).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dsdm.augment import EVAL_OPS, ops_for
from dsdm.config import EvalConfig
from dsdm.data import Dataset
from dsdm.errors import DsdmError
from dsdm.synthetic import SyntheticSet
from dsdm.train import (TrainRecipe, accuracy, build_model, speed_levers, stack_networks, train_classifier,
                        train_classifiers)


@dataclass(frozen=True)
class EvalProtocol:
    """A named evaluation recipe; milestones are fractions of the epochs so budgets scale."""
    name: str
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[float, ...]
    gamma: float
    cutmix_p: float

    def recipe(self, dataset_name: str, epochs: int = 0) -> TrainRecipe:
        epochs = epochs or self.epochs
        return TrainRecipe(
            epochs=epochs, batch_size=self.batch_size, lr=self.lr,
            milestones=tuple(sorted({max(1, round(f * epochs)) for f in self.milestones})),
            gamma=self.gamma, cutmix_p=self.cutmix_p, ops=ops_for(dataset_name, EVAL_OPS),
        )


PROTOCOLS: dict[str, EvalProtocol] = {
    # Reference DSDM code: 1500 epochs, batch 64, lr x0.2 at epochs 1000 and 1250, CutMix p 0.5.
    "dsdm": EvalProtocol("dsdm", 1500, 64, 0.01, (1000 / 1500, 1250 / 1500), 0.2, 0.5),
    # DM code: 1000 epochs, batch 256, lr x0.1 at half, no CutMix.
    "dm": EvalProtocol("dm", 1000, 256, 0.01, (0.5,), 0.1, 0.0),
}


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise DsdmError(f"unknown evaluation protocol '{name}'; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def train_and_score(arch: str, x: torch.Tensor, y: torch.Tensor, dataset: Dataset,
                    recipe: TrainRecipe, seed: int, device: torch.device) -> dict[str, float]:
    """One freshly initialised network trained on (x, y); final-epoch val and test accuracy."""
    model = build_model(arch, dataset.channels, dataset.num_classes, dataset.image_size, seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    train_classifier(model, x.to(device), y.to(device), dataset.mean, dataset.std, recipe, generator)
    return _scores(model, dataset)


def train_and_score_stacked(arch: str, x: torch.Tensor, y: torch.Tensor, dataset: Dataset,
                            recipe: TrainRecipe, seeds: Sequence[int], device: torch.device) -> list[dict[str, float]]:
    """`train_and_score` for each seed, the networks trained as one stacked model (same draws)."""
    models = [build_model(arch, dataset.channels, dataset.num_classes, dataset.image_size, s).to(device) for s in seeds]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    train_classifiers(models, x.to(device), y.to(device), dataset.mean, dataset.std, recipe, generators)
    return [_scores(m, dataset) for m in models]


def _scores(model: torch.nn.Module, dataset: Dataset) -> dict[str, float]:
    return {
        "val": accuracy(model, dataset.val_x, dataset.val_y, dataset.mean, dataset.std),
        "test": accuracy(model, dataset.test_x, dataset.test_y, dataset.mean, dataset.std),
    }


def evaluate_set(synset: SyntheticSet, dataset: Dataset, cfg: EvalConfig, device: torch.device,
                 on_run: Callable[[str, int, dict], None] | None = None,
                 run_ids: Sequence[int] | None = None) -> dict[str, dict[str, Any]]:
    """Per architecture: mean/std/each run's test accuracy (%) and the same for validation.

    `run_ids` picks which of the cfg.runs networks to train (run i is seeded cfg.seed*1000+i), so
    the runs can be spread over processes and joined with `merge_results`."""
    x, y = synset.decoded()
    protocol = get_protocol(cfg.protocol)
    recipe = speed_levers(protocol.recipe(dataset.name, cfg.epochs), len(x), cfg.train_path, cfg.compile)
    stacked = stack_networks(cfg.batch_nets, device)
    results: dict[str, dict[str, Any]] = {}
    for arch in cfg.archs:
        tests, vals, start = [], [], time.time()
        runs = list(range(cfg.runs) if run_ids is None else run_ids)
        seeds = [cfg.seed * 1000 + run for run in runs]
        if stacked and len(runs) > 1:
            all_scores = train_and_score_stacked(arch, x, y, dataset, recipe, seeds, device)
        else:  # lazily, so on_run reports each network as soon as it is trained
            all_scores = (train_and_score(arch, x, y, dataset, recipe, s, device) for s in seeds)
        for run, scores in zip(runs, all_scores):
            tests.append(100 * scores["test"])
            vals.append(100 * scores["val"])
            if on_run is not None:
                on_run(arch, run, scores)
        results[arch] = _summary(tests, vals, {"protocol": protocol.name, "epochs": recipe.epochs,
                                               "train_images": len(x), "seconds": time.time() - start})
    return results


def merge_results(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Join evaluate_set results of the same set computed run by run (in the order given)."""
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for arch, r in part.items():
            if arch in merged:
                m = merged[arch]
                merged[arch] = _summary(m["runs"] + r["runs"], m["val_runs"] + r["val_runs"],
                                        {**m, "seconds": m["seconds"] + r["seconds"]})
            else:
                merged[arch] = dict(r)
    return merged


def _summary(tests: list[float], vals: list[float], info: dict[str, Any]) -> dict[str, Any]:
    return {**info, "mean": statistics.fmean(tests), "std": _std(tests), "runs": tests,
            "val_mean": statistics.fmean(vals), "val_std": _std(vals), "val_runs": vals}


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
