"""Evaluation: train fresh networks on a (decoded) synthetic set, report final-epoch accuracy.

Nothing here selects on test accuracy: each network is trained for the protocol's full
schedule and its *final* weights are scored once on the validation split (for any
selection a caller makes) and once on the test split (for reporting only).
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch

from dsdm.config import EvalConfig
from dsdm.data import Dataset
from dsdm.inference import score_networks, scoring_plan
from dsdm.phases import PhaseClock
from dsdm.recipes import get_protocol, set_recipe
from dsdm.synthetic import SyntheticSet
from dsdm.models import build_model
from dsdm.train import (TrainRecipe, accuracy, speed_levers, stack_networks, train_classifier,
                        train_classifiers)


def train_and_score(arch: str, x: torch.Tensor, y: torch.Tensor, dataset: Dataset,
                    recipe: TrainRecipe, seed: int, device: torch.device,
                    clock: PhaseClock | None = None) -> dict[str, float]:
    """One freshly initialised network trained on (x, y); final-epoch val and test accuracy."""
    with _phase(clock, "eval_train"):
        model = build_model(arch, dataset.channels, dataset.num_classes, dataset.image_size, seed).to(device)
        generator = torch.Generator().manual_seed(seed)
        train_classifier(model, x.to(device), y.to(device), dataset.mean, dataset.std, recipe, generator)
    with _phase(clock, "eval_score"):
        return _scores(model, dataset)


def train_and_score_stacked(arch: str, x: torch.Tensor, y: torch.Tensor, dataset: Dataset,
                            recipe: TrainRecipe, seeds: Sequence[int], device: torch.device) -> list[dict[str, float]]:
    """`train_and_score` for each seed, the networks trained as one stacked model (same draws)."""
    models = [build_model(arch, dataset.channels, dataset.num_classes, dataset.image_size, s).to(device) for s in seeds]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    train_classifiers(models, x.to(device), y.to(device), dataset.mean, dataset.std, recipe, generators)
    return [_scores(m, dataset) for m in models]


def train_and_score_all(arch: str, x: torch.Tensor, y: torch.Tensor, dataset: Dataset, recipe: TrainRecipe,
                        seeds: Sequence[int], device: torch.device, cfg: EvalConfig,
                        stacked: bool = False, clock: PhaseClock | None = None) -> list[dict[str, float]]:
    """The networks of `seeds` trained as `train_and_score` trains them (stacked or one by one),
    then scored together: one pass over val and over test for all of them (dsdm.inference)."""
    with _phase(clock, "eval_train"):
        models = [build_model(arch, dataset.channels, dataset.num_classes, dataset.image_size, s).to(device) for s in seeds]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        x, y = x.to(device), y.to(device)
        if stacked and len(models) > 1:
            train_classifiers(models, x, y, dataset.mean, dataset.std, recipe, generators)
        else:
            for model, generator in zip(models, generators):
                train_classifier(model, x, y, dataset.mean, dataset.std, recipe, generator)
    splits = {"val": (dataset.val_x, dataset.val_y), "test": (dataset.test_x, dataset.test_y)}
    plan = scoring_plan(cfg, device, len(models) * (len(dataset.val_y) + len(dataset.test_y)))
    with _phase(clock, "eval_score"):
        return score_networks(models, splits, dataset.mean, dataset.std, **plan)


def _phase(clock: PhaseClock | None, name: str):
    return nullcontext() if clock is None else clock.phase(name)


def _scores(model: torch.nn.Module, dataset: Dataset) -> dict[str, float]:
    return {
        "val": accuracy(model, dataset.val_x, dataset.val_y, dataset.mean, dataset.std),
        "test": accuracy(model, dataset.test_x, dataset.test_y, dataset.mean, dataset.std),
    }


def evaluate_set(synset: SyntheticSet, dataset: Dataset, cfg: EvalConfig, device: torch.device,
                 on_run: Callable[[str, int, dict], None] | None = None,
                 run_ids: Sequence[int] | None = None, clock: PhaseClock | None = None) -> dict[str, dict[str, Any]]:
    """Per architecture: mean/std/each run's test accuracy (%) and the same for validation.

    `run_ids` picks which of the cfg.runs networks to train (run i is seeded cfg.seed*1000+i), so
    the runs can be spread over processes and joined with `merge_results`. With cfg.scoring=joint
    (default) an architecture's networks are trained, then scored in one pass (on_run reports them
    after it); with `each`, each network is scored as soon as it is trained. A `clock` gets the
    seconds of training (eval_train) and scoring (eval_score) apart (stacked `each`: all in eval_train)."""
    x, y = synset.decoded()
    protocol = get_protocol(cfg.protocol)
    recipe = speed_levers(set_recipe(protocol, synset, dataset.name, cfg.epochs), len(x), cfg)
    stacked = stack_networks(cfg.batch_nets, device)
    results: dict[str, dict[str, Any]] = {}
    for arch in cfg.archs:
        tests, vals, start = [], [], time.time()
        runs = list(range(cfg.runs) if run_ids is None else run_ids)
        seeds = [cfg.seed * 1000 + run for run in runs]
        if cfg.scoring == "joint":
            all_scores = train_and_score_all(arch, x, y, dataset, recipe, seeds, device, cfg, stacked, clock)
        elif stacked and len(runs) > 1:
            with _phase(clock, "eval_train"):
                all_scores = train_and_score_stacked(arch, x, y, dataset, recipe, seeds, device)
        else:  # lazily, so on_run reports each network as soon as it is trained
            all_scores = (train_and_score(arch, x, y, dataset, recipe, s, device, clock) for s in seeds)
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
