"""Config: flat view round-trip, string parsing, validation, budget/method precedence."""
from __future__ import annotations

import dataclasses
import math

import pytest

from dsdm.config import BUDGETS, METHOD_PRESETS, Config, DistillConfig, make_config
from dsdm.errors import DsdmError


def test_flat_round_trip_equals():
    cfg = make_config("cpu", {"distill.lambda1": 3.5, "zoo.snapshots": (1, 2, 10), "eval.archs": ("convnet3", "resnet10")})
    flat = cfg.flat()
    assert flat["distill.lambda1"] == 3.5 and flat["zoo.snapshots"] == (1, 2, 10) and flat["budget"] == "cpu"
    assert Config.from_flat(flat) == cfg
    # the JSON/MLflow view (tuples as lists) round-trips too
    plain = cfg.plain()
    assert plain["zoo.snapshots"] == [1, 2, 10]
    assert Config.from_flat(plain) == cfg
    assert Config.from_flat(Config().flat()) == Config()


def test_override_parses_strings_to_field_types():
    cfg = Config().override({
        "distill.ipc": "50", "distill.lambda1": "1e-3", "distill.fast": "false", "distill.pretrained": "True",
        "zoo.snapshots": "1, 5,10", "eval.archs": "convnet3,resnet10", "data.dataset": "mnist",
    })
    d = cfg.distill
    assert d.ipc == 50 and type(d.ipc) is int
    assert d.lambda1 == pytest.approx(1e-3) and type(d.lambda1) is float
    assert d.fast is False and d.pretrained is True
    assert cfg.zoo.snapshots == (1, 5, 10)
    assert cfg.eval.archs == ("convnet3", "resnet10")
    assert cfg.data.dataset == "mnist"
    # the original is frozen and unchanged
    assert Config().distill.ipc == 10
    with pytest.raises(DsdmError, match="distill.ipc"):
        Config().override({"distill.ipc": "ten"})
    with pytest.raises(DsdmError, match="distill.fast"):
        Config().override({"distill.fast": "maybe"})
    with pytest.raises(DsdmError):
        Config().override({"distill.ipc": 2.5})  # a non-integral float is not an int


def test_unknown_key_lists_valid_keys():
    with pytest.raises(DsdmError) as err:
        Config().override({"foo.bar": 1})
    msg = str(err.value)
    assert "foo.bar" in msg and "distill.lambda1" in msg and "zoo.snapshots" in msg and "\n" not in msg
    with pytest.raises(DsdmError, match="distill.lamda1"):
        make_config("smoke", {"distill.lamda1": 1})


@pytest.mark.parametrize("key", ["distill.lambda1", "distill.lambda2"])
def test_negative_lambda_rejected(key):
    with pytest.raises(DsdmError, match="lambda"):
        make_config("smoke", {key: -0.1})
    assert make_config("smoke", {key: 0.0}).flat()[key] == 0.0


def test_budget_precedence():
    # defaults < method preset < budget < overrides
    dm = make_config("smoke", {"distill.method": "dm"})
    assert dm.distill.iterations == BUDGETS["smoke"]["distill.iterations"]  # budget beats preset's 20000
    assert dm.distill.factor == 1 and dm.distill.pretrained is False and dm.distill.lambda1 == 0.0  # preset
    assert dm.distill.per_class_step is False
    assert dm.distill.momentum == DistillConfig.momentum  # untouched default
    dm_paper = make_config("paper", {"distill.method": "dm"})
    assert dm_paper.distill.iterations == METHOD_PRESETS["dm"]["distill.iterations"] == 20_000
    explicit = make_config("smoke", {"distill.method": "dm", "distill.iterations": 7, "distill.factor": 3})
    assert explicit.distill.iterations == 7 and explicit.distill.factor == 3  # overrides beat all
    dsdm = make_config("smoke")
    assert dsdm.distill.factor == 2 and dsdm.distill.lambda1 == 50.0 and dsdm.budget == "smoke"
    assert dsdm.zoo.num_models == 2 and dsdm.eval.epochs == 5
    with pytest.raises(DsdmError, match="budget"):
        make_config("huge")
    with pytest.raises(DsdmError, match="method"):
        make_config("smoke", {"distill.method": "magic"})


def test_zoo_consistency_checks():
    with pytest.raises(DsdmError, match="larger than the zoo"):
        make_config("smoke", {"distill.num_models": 3})  # smoke zoo has 2
    with pytest.raises(DsdmError, match="snapshot"):
        make_config("smoke", {"distill.pretrain_epochs": 2})  # smoke snapshots (1,)
    ok = make_config("smoke", {"distill.pretrain_epochs": 2, "zoo.snapshots": (1, 2)})
    assert ok.distill.pretrain_epochs == 2
    # DM (no pre-trained models) does not need the zoo to match
    assert make_config("smoke", {"distill.method": "dm", "distill.num_models": 9}).distill.num_models == 9


@pytest.mark.parametrize("key,value", [("distill.ipc", 0), ("distill.alpha", 1.5), ("eval.runs", 0),
                                       ("data.val_fraction", 1.0), ("distill.batch_real", 1),
                                       ("eval.precision", "fp16"), ("zoo.precision", "half"), ("eval.compile", "yes"),
                                       ("zoo.batch_nets", "always"), ("eval.train_path", "turbo"),
                                       ("zoo.group_size", -1)])
def test_other_invalid_values(key, value):
    with pytest.raises(DsdmError) as err:
        make_config("smoke", {key: value})
    assert "\n" not in str(err.value)


def test_parse_set_pairs_is_the_one_key_value_parser():
    from dsdm.config import parse_set_pairs

    assert parse_set_pairs([" distill.iterations = 20", "eval.archs=convnet3,resnet10"]) == {
        "distill.iterations": "20", "eval.archs": "convnet3,resnet10"}
    assert parse_set_pairs(["M=4", "distill.lambda2=0.5"], "--fix", {"M": "distill.num_models"}) == {
        "distill.num_models": "4", "distill.lambda2": "0.5"}
    for flag, pairs in (("--set", ["distill.iterations"]), ("--fix", ["=3"])):
        with pytest.raises(DsdmError, match=f"^{flag} expects KEY=VALUE") as err:
            parse_set_pairs(pairs, flag)
        assert "\n" not in str(err.value)


def test_zoo_covering_serves_every_m_and_e_of_every_budget_grid():
    from dsdm.config import BUDGET_GRIDS, BUDGETS, zoo_covering

    assert set(BUDGET_GRIDS) == set(BUDGETS)
    for budget, (models, epochs) in BUDGET_GRIDS.items():
        zoo = zoo_covering(models, epochs)
        for m in models:
            for e in epochs:
                cfg = make_config(budget, {**zoo, "distill.num_models": m, "distill.pretrain_epochs": e})
                assert cfg.distill.num_models <= cfg.zoo.num_models and e in cfg.zoo.snapshots
    assert zoo_covering([2, 8, 4], [5, 1, 5]) == {"zoo.num_models": 8, "zoo.snapshots": (1, 5)}
    with pytest.raises(DsdmError):
        zoo_covering([], [1])


@pytest.mark.parametrize("key", ["distill.lambda1", "distill.alpha", "zoo.lr", "data.val_fraction"])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", math.inf])
def test_inf_and_nan_refused_for_every_float_key(key, value):
    with pytest.raises(DsdmError, match=f"config key '{key}' cannot take .*; pass a finite number"):
        make_config("smoke", {key: value})
    section, name = key.split(".")
    cfg = Config()
    bad = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: float(value)})})
    with pytest.raises(DsdmError, match=f"config key '{key}' cannot take .*; pass a finite number"):
        bad.validate()  # a Config built in code, not parsed from strings
