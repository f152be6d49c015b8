"""Final scoring of N networks in one pass (dsdm.inference, eval.scoring=joint) against today's
per-network `accuracy` (eval.scoring=each); and the per-phase clock (dsdm.phases)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsdm.augment import normalize
from dsdm.config import EvalConfig, make_config
from dsdm.coreset import select_coreset
from dsdm.errors import DsdmError
from dsdm.evaluate import evaluate_set, get_protocol
from dsdm.inference import score_networks, scoring_plan
from dsdm.phases import PhaseClock
from dsdm.models import build_model
from dsdm.train import accuracy, train_classifier


@pytest.fixture(scope="module")
def trained(digits):
    """Three ConvNet-3s and a ResNet-10 (BatchNorm) trained 3 epochs on 20 digits per class: real,
    distinct predictions (untrained networks predict one class, which hides disagreements)."""
    x, y = select_coreset("random", digits, 20, seed=0).decoded()
    rec = replace(get_protocol("dsdm").recipe("digits", 3), cutmix_p=0.0)
    nets = []
    for arch, seed in (("convnet3", 0), ("convnet3", 1), ("convnet3", 2), ("resnet10", 3)):
        net = build_model(arch, digits.channels, digits.num_classes, digits.image_size, seed)
        nets.append(train_classifier(net, x, y, digits.mean, digits.std, rec, torch.Generator().manual_seed(seed)))
    return nets


def _splits(ds):
    return {"val": (ds.val_x, ds.val_y), "test": (ds.test_x, ds.test_y)}


def _today(nets, ds):
    return [{"val": accuracy(m, ds.val_x, ds.val_y, ds.mean, ds.std),
             "test": accuracy(m, ds.test_x, ds.test_y, ds.mean, ds.std)} for m in nets]


@pytest.mark.parametrize("batch_size", [1024, 100, 7])
def test_joint_scores_equal_todays_per_network_scores(trained, digits, batch_size):
    """Eager, any batch size (the last batch shorter): each network's val and test accuracy equal
    today's exactly, and its logits agree to float rounding (same model, same samples)."""
    today = _today(trained, digits)
    assert len({r["test"] for r in today}) > 1, "the networks differ"
    assert score_networks(trained, _splits(digits), digits.mean, digits.std, batch_size) == today
    xb = normalize(digits.test_x[:batch_size], digits.mean, digits.std)
    with torch.no_grad():
        full = [m(normalize(digits.test_x, digits.mean, digits.std))[:batch_size] for m in trained]
        part = [m(xb) for m in trained]
    for a, b in zip(full, part):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(not m.training for m in trained)


def test_stacked_scoring_equals_one_by_one(trained, digits):
    """vmap over stacked weights (the CUDA default): same accuracies; BatchNorm networks are
    scored one after another."""
    today = _today(trained, digits)
    assert score_networks(trained[:3], _splits(digits), digits.mean, digits.std, 256, stacked=True) == today[:3]
    assert score_networks(trained, _splits(digits), digits.mean, digits.std, 256, stacked=True) == today


@pytest.mark.slow
def test_compiled_scoring_equals_todays(trained, digits):
    """torch.compile (fused norm/ReLU/pool, last batch padded): same accuracies (about 30 s to compile)."""
    today = _today(trained[:3], digits)
    assert score_networks(trained[:3], _splits(digits), digits.mean, digits.std, 128, compiled=True) == today


def test_empty_split_is_nan(trained, digits):
    r = score_networks(trained[:1], {"val": (digits.val_x[:0], digits.val_y[:0])}, digits.mean, digits.std)
    assert r[0]["val"] != r[0]["val"]


def test_evaluate_set_joint_equals_each(digits):
    """The default path (train, then one pass) reports the same numbers as today's, architecture by
    architecture; the old path stays selectable (eval.scoring=each)."""
    synset = select_coreset("random", digits, 2, seed=0)
    cfg = EvalConfig(archs=("convnet3", "resnet10"), runs=2, epochs=2, seed=3)
    assert cfg.scoring == "joint"
    joint = evaluate_set(synset, digits, cfg, torch.device("cpu"))
    each = evaluate_set(synset, digits, replace(cfg, scoring="each"), torch.device("cpu"))
    for arch in cfg.archs:
        for key in ("runs", "val_runs", "mean", "std", "val_mean"):
            assert joint[arch][key] == each[arch][key], (arch, key)


def test_scoring_keys_are_validated_config_values():
    assert make_config("smoke", {"eval.scoring": "each", "eval.score_batch": 64}).eval.score_batch == 64
    for overrides, match in (({"eval.scoring": "fast"}, "eval: unknown scoring 'fast'; choose one of: joint, each"),
                             ({"eval.score_compile": "yes"}, "eval: score_compile must be one of"),
                             ({"eval.score_batch": -1}, "eval: score_batch must be >= 0")):
        with pytest.raises(DsdmError, match=match) as err:
            make_config("smoke", overrides)
        assert "\n" not in str(err.value)
    cfg = EvalConfig()
    assert scoring_plan(cfg, "cpu", 16_000 * 5) == {"batch_size": 256, "compiled": True, "stacked": False}
    assert scoring_plan(cfg, "cpu", 1000)["compiled"] is False  # a test-sized pass: compiling would not pay
    assert scoring_plan(replace(cfg, score_compile="off"), "cpu", 10**6)["compiled"] is False
    assert scoring_plan(cfg, "cuda", 10**6) == {"batch_size": 4096, "compiled": False, "stacked": True}


def test_phase_clock_sums_phases_and_carves_parts():
    clock = PhaseClock("cpu")
    for name in ("zoo", "distill", "distill", "eval"):
        with clock.phase(name):
            torch.ones(1000).sum()
    clock.add("distill", 2.0)
    clock.carve("distill", "cache_fill", 0.5)
    clock.carve("eval", "nothing", 1e9)  # never more than the parent had
    m = clock.metrics()
    assert set(m) == {"phase_seconds/zoo", "phase_seconds/distill", "phase_seconds/cache_fill", "phase_seconds/eval",
                      "phase_seconds/nothing", "peak_rss_mb"}
    assert m["phase_seconds/cache_fill"] == 0.5 and 1.5 <= m["phase_seconds/distill"] < 1.6
    assert m["phase_seconds/eval"] == 0.0 and m["phase_seconds/nothing"] >= 0 and m["peak_rss_mb"] > 10
    assert "peak RSS" in clock.summary() and "zoo" in clock.summary()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_stacked_scoring_and_phase_memory(trained, digits, monkeypatch):
    """On a GPU (TF32 off, so cuDNN computes in fp32): stacked scoring of the networks moved there
    matches CPU scoring to at most one image per split (other kernels, other rounding); the clock
    records each phase's peak CUDA memory."""
    import copy

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    today = _today(trained, digits)
    clock = PhaseClock("cuda")
    with clock.phase("eval"):
        nets = [copy.deepcopy(m).cuda() for m in trained]
        got = score_networks(nets, _splits(digits), digits.mean, digits.std, 4096, stacked=True)
    for g, t in zip(got, today):
        assert abs(g["val"] - t["val"]) * len(digits.val_y) <= 1 and abs(g["test"] - t["test"]) * len(digits.test_y) <= 1
    m = clock.metrics()
    assert m["peak_cuda_mb/eval"] > 0 and m["peak_cuda_mb"] == m["peak_cuda_mb/eval"]
