"""Recipes: how each phase trains and augments, per dataset, in one table module.

- the zoo's pre-training recipe (`zoo_recipe`: colour + crop DSA and CutMix, spec section 3);
- named evaluation protocols (`PROTOCOLS`: `dsdm` = the official DSDM recipe per dataset, factor
  and IPC from `OFFICIAL_RECIPES`; `dsdm-uniform`; `dm`), each giving the training recipe of the
  evaluation networks;
- the Siamese augmentation distillation matches with (`match_ops`), read from the same row of
  the table, so the official code's pairing of evaluation and matching augmentation stays whole.
  Which protocol's row distillation reads is `distill.match_protocol`, not `eval.protocol`:
  changing how a set is evaluated never changes how it is distilled.
"""
from __future__ import annotations

from dataclasses import dataclass

from dsdm.augment import EVAL_OPS, MATCH_OPS, Op, ops_for
from dsdm.config import PROTOCOL_NAMES, ZooConfig
from dsdm.errors import DsdmError
from dsdm.synthetic import SyntheticSet
from dsdm.train import TrainRecipe

PRETRAIN_OPS = (Op.COLOR, Op.CROP)  # spec: colour + crop augmentation, plus CutMix


def zoo_recipe(cfg: ZooConfig, dataset_name: str) -> TrainRecipe:
    """Pre-training: SGD to max(snapshots) with colour + crop DSA and CutMix."""
    return TrainRecipe(epochs=max(cfg.snapshots), batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, cutmix_p=cfg.cutmix_p, ops=ops_for(dataset_name, PRETRAIN_OPS))



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


assert set(PROTOCOLS) == set(PROTOCOL_NAMES)  # dsdm.config validates names without importing torch


def get_protocol(name: str) -> EvalProtocol:
    if name not in PROTOCOLS:
        raise DsdmError(f"unknown evaluation protocol '{name}'; choose one of: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def match_ops(protocol: str, dataset_name: str, factor: int, ipc: int) -> tuple[Op, ...]:
    """The Siamese augmentation distillation matches with: the matching column of `protocol`'s
    row for this dataset, factor and IPC (`distill.match_protocol` names the protocol)."""
    return get_protocol(protocol).augmentation(dataset_name, factor, ipc).match_ops


def set_recipe(protocol: EvalProtocol, synset: SyntheticSet, dataset_name: str, epochs: int = 0) -> TrainRecipe:
    """The training recipe of `protocol` for this set: its factor is read from its tile grid."""
    return protocol.recipe(dataset_name, epochs, factor=max(synset.grid), ipc=synset.ipc)
