"""Recipes: the evaluation protocols' schedules, the official per-dataset rows, and the rule
that the matching augmentation follows distill.match_protocol, never eval.protocol."""
from __future__ import annotations

import pytest

from dsdm.config import make_config
from dsdm.checkpoint import config_mismatch
from dsdm.errors import DsdmError
from dsdm.recipes import OFFICIAL_RECIPES, PROTOCOLS, get_protocol, match_ops, official_recipe


def test_protocol_recipe_scales_milestones():
    dsdm = get_protocol("dsdm")
    full = dsdm.recipe("cifar10")
    assert (full.epochs, full.milestones, full.batch_size, full.gamma, full.cutmix_p) == (1500, (1000, 1250), 64, 0.2, 0.5)
    assert dsdm.recipe("cifar10", 15).milestones == (10, 12)  # 2/3 and 5/6 of the epochs
    assert dsdm.recipe("cifar10", 150).milestones == (100, 125)
    assert dsdm.recipe("digits", 1).milestones == (1,)
    dm = get_protocol("dm")
    assert dm.recipe("cifar10").milestones == (500,) and dm.recipe("cifar10", 10).milestones == (5,)
    assert (dm.recipe("cifar10").batch_size, dm.recipe("cifar10").cutmix_p) == (256, 0.0)
    # evaluation augmentation drops flip on digit data only
    assert "flip" in [o.value for o in dsdm.recipe("cifar10").ops]
    assert "flip" not in [o.value for o in dsdm.recipe("mnist").ops]
    assert set(PROTOCOLS) == {"dsdm", "dsdm-uniform", "dm"}
    with pytest.raises(DsdmError, match="protocol"):
        get_protocol("best")


# (dataset, factor, ipc) -> (CutMix p, evaluation DSA ops, matching ops), as the official DSDM code
# (Li-Hongcheng/DSDM argument.py + misc/reproduce.py under --reproduce) sets them.
PINNED = {
    ("mnist", 2, 10): (0.0, "color_crop_scale_rotate", "color_crop"),
    ("mnist", 4, 1): (0.0, "color_crop_scale_rotate", "color_crop"),
    ("mnist", 1, 10): (0.5, "color_crop_scale_rotate", "color_crop_cutout"),
    ("digits", 2, 10): (0.0, "color_crop_scale_rotate", "color_crop"),
    ("digits", 1, 10): (0.5, "color_crop_scale_rotate", "color_crop_cutout"),
    ("fashionmnist", 2, 1): (0.5, "flip_color_crop_scale_rotate", "color_crop_cutout"),
    ("fashionmnist", 1, 10): (0.5, "flip_color_crop_scale_rotate", "color_crop_cutout"),
    ("svhn", 1, 1): (0.0, "color_crop_scale_rotate_cutout", "color_crop_cutout"),
    ("svhn", 1, 10): (0.5, "color_crop_scale_rotate", "color_crop_cutout"),
    ("svhn", 2, 1): (0.5, "color_crop_scale_rotate", "color_crop_cutout"),
    ("cifar10", 2, 10): (0.5, "flip_color_crop_scale_rotate", "color_crop_cutout"),
    ("cifar100", 1, 50): (0.5, "flip_color_crop_scale_rotate", "color_crop_cutout"),
    ("speechcommands", 2, 10): (0.0, "", "color_crop_cutout"),
    ("speechcommands", 1, 1): (0.0, "", "color_crop_cutout"),
    ("bench", 2, 1): (0.5, "flip_color_crop_scale_rotate", "color_crop_cutout"),
}


def _names(ops) -> str:
    """Op names in application order (dsdm.augment.Op's declaration order)."""
    from dsdm.augment import Op

    return "_".join(o.value for o in Op if o in set(ops))


@pytest.mark.parametrize("key", list(PINNED), ids=["-".join(map(str, k)) for k in PINNED])
def test_official_recipe_rows(key):
    cutmix, dsa, match = PINNED[key]
    r = official_recipe(*key)
    assert (r.cutmix_p, _names(r.eval_ops), _names(r.match_ops)) == (cutmix, dsa, match)
    assert match_ops("dsdm", *key) == r.match_ops
    uniform = get_protocol("dsdm-uniform").augmentation(*key)  # the recipe tables before 2026-12 used
    assert uniform.cutmix_p == 0.5 and _names(uniform.match_ops) == "color_crop_cutout"


def test_every_row_is_pinned():
    """A row added to the table needs a line in PINNED (and a look at the official code)."""
    covered = set()
    for key in PINNED:
        covered.add(next(i for i, row in enumerate(OFFICIAL_RECIPES)
                         if row.matches(key[0].replace("-", ""), key[1], key[2])))
    assert covered == set(range(len(OFFICIAL_RECIPES)))


def test_eval_protocol_never_changes_distillation(digits):
    """How a set is evaluated is not how it is distilled: the Siamese draws follow distill.match_protocol."""
    from dsdm.distill import Distiller

    base = {"data.dataset": "digits", "distill.pretrained": False, "distill.factor": 2}
    ops = {}
    for overrides in ({}, {"eval.protocol": "dm"}, {"eval.protocol": "dsdm-uniform"},
                      {"distill.match_protocol": "dsdm-uniform"}):
        cfg = make_config("smoke", {**base, **overrides})
        ops[tuple(overrides.items())] = Distiller(digits, cfg, None).ops
    first, *evals, uniform = ops.values()
    assert all(o == first for o in evals) and first == match_ops("dsdm", "digits", 2, 10)
    assert uniform == match_ops("dsdm-uniform", "digits", 2, 10) != first
    with pytest.raises(DsdmError, match=r"distill.match_protocol must be one of dsdm, dsdm-uniform, dm \(got 'best'\)"):
        make_config("smoke", {"distill.match_protocol": "best"})


def test_resume_checks_match_protocol_not_eval_protocol():
    """A checkpoint from before distill.match_protocol existed matched with eval.protocol's row."""
    now = make_config("smoke", {"eval.protocol": "dm"})
    saved = {k: v for k, v in now.plain().items() if k != "distill.match_protocol"}
    assert config_mismatch({**saved, "eval.protocol": "dsdm"}, now) == []
    assert config_mismatch({**saved, "eval.protocol": "dsdm-uniform"}, now) == [
        "distill.match_protocol: 'dsdm-uniform' -> 'dsdm'"]
