"""Evaluation: train fresh networks on a (decoded) synthetic set, report final-epoch accuracy.

Nothing here selects on test accuracy: each network is trained for the protocol's full
schedule and its *final* weights are scored once on the validation split (for any
selection a caller makes) and once on the test split (for reporting only).
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from dsdm.augment import EVAL_OPS, MATCH_OPS, Op, ops_for
from dsdm.config import EvalConfig
from dsdm.data import Dataset
from dsdm.errors import DsdmError
from dsdm.inference import score_networks, scoring_plan
from dsdm.phases import PhaseClock
from dsdm.synthetic import SyntheticSet
from dsdm.train import (TrainRecipe, accuracy, build_model, speed_levers, stack_networks, train_classifier,
                        train_classifiers)


@dataclass(frozen=True)
class AugRecipe:
    """The augmentation half of a protocol for one dataset (and factor, IPC)."""
    cutmix_p: float  # CutMix probability when training evaluation networks
    eval_ops: tuple[Op, ...]  # DSA ops (one draw per sample) when training evaluation networks; () = none
    match_ops: tuple[Op, ...]  # the Siamese augmentation of distillation matching

    def describe(self) -> str:
        dsa = "_".join(o.value for o in self.eval_ops) or "none"
        return f"CutMix {self.cutmix_p:g}, DSA {dsa}, matching {'_'.join(o.value for o in self.match_ops)}"


def _ops(names: str) -> tuple[Op, ...]:
    return tuple(Op(n) for n in names.split("_")) if names else ()


@dataclass(frozen=True)
class RecipeRow:
    dataset: str  # normalised name (lower case, no '-' or '_'); "*" = any other dataset
    factor: str  # "any", "1" or ">1"
    ipc: int  # 0 = any
    recipe: AugRecipe
    source: str  # where the official code sets it

    def matches(self, dataset: str, factor: int, ipc: int) -> bool:
        return (self.dataset in (dataset, "*") and self.ipc in (0, ipc)
                and {"any": True, "1": factor == 1, ">1": factor > 1}[self.factor])


_COLOR_CROP_CUTOUT = _ops("color_crop_cutout")
# Protocol `dsdm`: the official DSDM recipe per dataset, factor and IPC (Li-Hongcheng/DSDM,
# argument.py run with --reproduce, which calls misc/reproduce.py). There DSA's default strategy is
# color_crop_cutout_flip_scale_rotate; flip is removed for MNIST and SVHN, cutout whenever CutMix
# ('cut' mixup) is on; matching (aug_type) is color_crop_cutout unless reproduce.py says otherwise.
# The first row that matches wins.
_MNIST_FACTOR = AugRecipe(0.0, _ops("color_crop_scale_rotate"), _ops("color_crop"))  # factor > 1
_MNIST_PLAIN = AugRecipe(0.5, _ops("color_crop_scale_rotate"), _COLOR_CROP_CUTOUT)  # factor 1
OFFICIAL_RECIPES: tuple[RecipeRow, ...] = (
    RecipeRow("mnist", ">1", 0, _MNIST_FACTOR,
              "reproduce.py mnist, factor > 1: mixup vanilla, dsa_strategy color_crop_scale_rotate, aug_type color_crop"),
    RecipeRow("mnist", "1", 0, _MNIST_PLAIN, "argument.py mnist: mix_p 0.5, flip removed; cutout removed by CutMix"),
    # digits (scikit-learn 8x8, ours): grey handwritten digits like MNIST, so MNIST's rows; at 8x8 a
    # factor-2 tile is 4x4 pixels, where CutMix boxes and cutout remove even more of a digit.
    RecipeRow("digits", ">1", 0, _MNIST_FACTOR, "ours: as mnist, factor > 1"),
    RecipeRow("digits", "1", 0, _MNIST_PLAIN, "ours: as mnist, factor 1"),
    RecipeRow("fashionmnist", "any", 0, AugRecipe(0.5, _ops("color_crop_flip_scale_rotate"), _COLOR_CROP_CUTOUT),
              "argument.py fashion: mix_p 0.5, flip kept; cutout removed by CutMix"),
    RecipeRow("svhn", "1", 1, AugRecipe(0.0, _ops("color_crop_cutout_scale_rotate"), _COLOR_CROP_CUTOUT),
              "reproduce.py svhn, factor 1 and ipc 1: mixup vanilla, dsa_strategy color_crop_cutout_scale_rotate"),
    RecipeRow("svhn", "any", 0, AugRecipe(0.5, _ops("color_crop_scale_rotate"), _COLOR_CROP_CUTOUT),
              "argument.py svhn: mix_p 0.5, flip removed; cutout removed by CutMix"),
    RecipeRow("cifar10", "any", 0, AugRecipe(0.5, _ops("color_crop_flip_scale_rotate"), _COLOR_CROP_CUTOUT),
              "argument.py cifar: mix_p 0.5; cutout removed by CutMix"),
    RecipeRow("cifar100", "any", 0, AugRecipe(0.5, _ops("color_crop_flip_scale_rotate"), _COLOR_CROP_CUTOUT),
              "argument.py cifar: mix_p 0.5; cutout removed by CutMix"),
    RecipeRow("speechcommands", "any", 0, AugRecipe(0.0, (), _COLOR_CROP_CUTOUT),
              "argument.py speech: mixup vanilla, dsa False ('I didn't use data augmentation'); aug_type default"),
    RecipeRow("*", "any", 0, AugRecipe(0.5, EVAL_OPS, MATCH_OPS),
              "datasets the official code does not have (test fixtures): the uniform recipe, flip dropped as ops_for says"),
)


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def official_recipe(dataset_name: str, factor: int, ipc: int) -> AugRecipe:
    key = _normalise(dataset_name)
    row = next(r for r in OFFICIAL_RECIPES if r.matches(key, factor, ipc))
    r = row.recipe
    return AugRecipe(r.cutmix_p, ops_for(key, r.eval_ops), ops_for(key, r.match_ops))


@dataclass(frozen=True)
class EvalProtocol:
    """A named evaluation recipe; milestones are fractions of the epochs so budgets scale.

    `cutmix_p` and the ops are the same for every dataset unless `official` is set: then
    CutMix, DSA and the matching augmentation come from OFFICIAL_RECIPES per dataset and factor."""
    name: str
    epochs: int
    batch_size: int
    lr: float
    milestones: tuple[float, ...]
    gamma: float
    cutmix_p: float
    official: bool = False

    def augmentation(self, dataset_name: str, factor: int = 1, ipc: int = 0) -> AugRecipe:
        if self.official:
            return official_recipe(dataset_name, factor, ipc)
        return AugRecipe(self.cutmix_p, ops_for(dataset_name, EVAL_OPS), ops_for(dataset_name, MATCH_OPS))

    def recipe(self, dataset_name: str, epochs: int = 0, factor: int = 1, ipc: int = 0) -> TrainRecipe:
        epochs = epochs or self.epochs
        aug = self.augmentation(dataset_name, factor, ipc)
        return TrainRecipe(
            epochs=epochs, batch_size=self.batch_size, lr=self.lr,
            milestones=tuple(sorted({max(1, round(f * epochs)) for f in self.milestones})),
            gamma=self.gamma, cutmix_p=aug.cutmix_p, ops=aug.eval_ops,
        )


PROTOCOLS: dict[str, EvalProtocol] = {
    # Reference DSDM code: 1500 epochs, batch 64, lr x0.2 at epochs 1000 and 1250; CutMix, DSA and
    # matching augmentation per dataset and factor (OFFICIAL_RECIPES).
    "dsdm": EvalProtocol("dsdm", 1500, 64, 0.01, (1000 / 1500, 1250 / 1500), 0.2, 0.5, official=True),
    # The same schedule with one recipe for every dataset (CutMix p 0.5, DSA without flip on digits
    # and speech, matching color_crop_cutout): what protocol `dsdm` meant before 2026-12.
    "dsdm-uniform": EvalProtocol("dsdm-uniform", 1500, 64, 0.01, (1000 / 1500, 1250 / 1500), 0.2, 0.5),
    # DM code: 1000 epochs, batch 256, lr x0.1 at half, no CutMix.
    "dm": EvalProtocol("dm", 1000, 256, 0.01, (0.5,), 0.1, 0.0),
}


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise DsdmError(f"unknown evaluation protocol '{name}'; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def match_ops(protocol: str, dataset_name: str, factor: int, ipc: int) -> tuple[Op, ...]:
    """The Siamese augmentation distillation matches with under `protocol` (the same table row)."""
    return get_protocol(protocol).augmentation(dataset_name, factor, ipc).match_ops


def set_recipe(protocol: EvalProtocol, synset: SyntheticSet, dataset_name: str, epochs: int = 0) -> TrainRecipe:
    """The training recipe of `protocol` for this set: its factor is read from its tile grid."""
    return protocol.recipe(dataset_name, epochs, factor=max(synset.grid), ipc=synset.ipc)


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
