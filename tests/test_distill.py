"""Distiller (Algorithm 1) through its public API: reproducibility, exact resume, gradients,
the lambda = 0 reduction, the memory bank, NaN handling and input checks. Tiny digits runs."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from dsdm.augment import augment, decode
from dsdm.config import make_config
from dsdm.distill import Distiller, RunHooks, image_lr
from dsdm.errors import DsdmError
from dsdm.losses import prototype_loss
from dsdm.models import ConvNet
from dsdm.io import safe_torch_load

from conftest import TINY_ZOO

# A tiny DSDM run on digits that matches the session's tiny zoo (2 models, snapshots 1 and 2).
BASE = {
    "zoo.num_models": TINY_ZOO["num_models"], "zoo.snapshots": TINY_ZOO["snapshots"],
    "zoo.max_per_class": TINY_ZOO["max_per_class"],
    "distill.num_models": 2, "distill.pretrain_epochs": 2, "distill.ipc": 1, "distill.batch_real": 8,
    "distill.iterations": 3, "distill.warmup": 2, "distill.aug_pool": 2,
    "distill.log_every": 1, "distill.checkpoint_every": 1,
}

# (method, fast): DM uses a fresh random net per iteration (no zoo); fast applies to zoo models only
VARIANTS = [("dsdm", True), ("dsdm", False), ("dm", True), ("dm", False)]
IDS = ["dsdm-fast", "dsdm-reference", "dm-fast", "dm-reference"]


def config(method="dsdm", fast=True, **over):
    return make_config("smoke", {**BASE, "distill.method": method, "distill.fast": fast,
                                 **{k.replace("__", "."): v for k, v in over.items()}})


def distiller(digits, zoo, cfg):
    return Distiller(digits, cfg, zoo if cfg.distill.pretrained else None, "cpu")


class Killed(Exception):
    pass


# --- end to end ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,fast", VARIANTS, ids=IDS)
def test_smoke_run_is_bit_reproducible(digits, tiny_zoo, method, fast):
    cfg = config(method, fast)
    logs = []
    first = distiller(digits, tiny_zoo, cfg)
    init = first.images.detach().clone()
    a = first.run(log=lambda metrics, step: logs.append((step, metrics)))
    b = distiller(digits, tiny_zoo, cfg).run()
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, init.clamp(0, 1)), "the pixels were optimised"
    assert torch.isfinite(a.images).all() and 0 <= a.images.min() and a.images.max() <= 1
    grid = (2, 2) if method == "dsdm" else (1, 1)  # DM: no factor
    assert a.grid == grid and a.images.shape == (10, 1, 8, 8)
    assert a.labels.bincount().tolist() == [1] * 10 and a.config == cfg.plain()
    assert [s for s, _ in logs] == [1, 2, 3]
    assert {"loss/proto", "loss/sd", "loss/h", "loss/total", "seconds"} <= set(logs[0][1])
    assert all(math.isfinite(m["loss/total"]) for _, m in logs)
    if method == "dsdm" and fast:  # another seed is another run
        other = distiller(digits, tiny_zoo, config(method, fast, distill__seed=1)).run()
        assert not torch.equal(other.images, a.images)


@pytest.mark.parametrize("method,fast,refresh", [("dsdm", True, 0), ("dsdm", True, 1), ("dsdm", True, 3),
                                                 ("dsdm", False, 0), ("dm", False, 0)],
                         ids=["dsdm-fast", "dsdm-fast-refresh1", "dsdm-fast-refresh3", "dsdm-reference", "dm"])
def test_kill_and_resume_is_exact(digits, tiny_zoo, tmp_path, method, fast, refresh):
    """A run killed mid-way and restarted from its checkpoint ends where an uninterrupted one does.
    warmup=1 < checkpoint < N, so the memory bank and L_h are part of the resumed state; with
    refresh the pool's slot generations and use counts are too (refresh 3 > checkpoint: mid-count)."""
    n = 4
    cfg = config(method, fast, distill__iterations=n, distill__warmup=1, distill__aug_refresh=refresh)
    straight = distiller(digits, tiny_zoo, cfg)
    full = straight.run()

    ckpt = tmp_path / "run.ckpt"

    def kill_at_3(metrics, step):
        if step == 3:
            raise Killed  # the process dies between the log and the checkpoint of iteration 3

    with pytest.raises(Killed):
        distiller(digits, tiny_zoo, cfg).run(checkpoint=ckpt, log=kill_at_3)
    saved = safe_torch_load(ckpt, expect="dsdm-distill-checkpoint", what="checkpoint", fix="-")
    assert saved["state"]["iteration"] == 2

    resumed = distiller(digits, tiny_zoo, cfg)
    steps = []
    out = resumed.run(checkpoint=ckpt, log=lambda m, s: steps.append(s))
    assert steps == [3, 4], "resumed after the checkpointed iteration, not from scratch"
    assert torch.equal(out.images, full.images)
    assert torch.equal(resumed.bank.h, straight.bank.h)
    assert torch.equal(resumed.generator.get_state(), straight.generator.get_state())
    assert torch.equal(resumed.pool.generation, straight.pool.generation)
    assert torch.equal(resumed.pool.uses, straight.pool.uses)
    if refresh == 1:
        assert int(straight.pool.generation.sum()) == n, "R = 1: every use moved its slot on"
    # the finished checkpoint is a no-op to resume
    again = distiller(digits, tiny_zoo, cfg)
    assert torch.equal(again.run(checkpoint=ckpt, log=lambda m, s: pytest.fail("no steps left")).images, full.images)


def test_checkpoint_of_another_config_refused(digits, tiny_zoo, tmp_path):
    ckpt = tmp_path / "a.ckpt"
    distiller(digits, tiny_zoo, config(distill__iterations=1)).run(checkpoint=ckpt)
    other = distiller(digits, tiny_zoo, config(distill__iterations=1, distill__lambda1=1.0))
    with pytest.raises(DsdmError, match=r"different config \(distill.lambda1: 50.0 -> 1.0\)"):
        other.run(checkpoint=ckpt)
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(DsdmError, match="checkpoint"):
        other.run(checkpoint=tmp_path / "junk.ckpt")


def test_checkpoint_resumes_with_more_iterations_and_from_older_configs(digits, tiny_zoo, tmp_path):
    """Extending `iterations` continues the same trajectory; a key added to Config after the
    checkpoint was written counts as its default (sweeps resumed across an upgrade)."""
    straight = distiller(digits, tiny_zoo, config(distill__iterations=3)).run()
    ckpt = tmp_path / "a.ckpt"
    distiller(digits, tiny_zoo, config(distill__iterations=2)).run(checkpoint=ckpt)
    payload = safe_torch_load(ckpt, expect="dsdm-distill-checkpoint", what="checkpoint", fix="-")
    del payload["config"]["distill.cache_dtype"]  # as if written before that key existed
    torch.save(payload, ckpt)
    steps = []
    out = distiller(digits, tiny_zoo, config(distill__iterations=3)).run(checkpoint=ckpt, log=lambda m, s: steps.append(s))
    assert steps == [3]
    assert torch.equal(out.images, straight.images)
    odd = config(distill__iterations=3, distill__cache_dtype="bfloat16")
    with pytest.raises(DsdmError, match="distill.cache_dtype: 'float32' -> 'bfloat16'"):
        distiller(digits, tiny_zoo, odd).run(checkpoint=ckpt)


# --- one step -----------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_gradients_reach_the_pixels_only(digits, tiny_zoo, monkeypatch, fast):
    nets = []
    real_model = tiny_zoo.model
    monkeypatch.setattr(tiny_zoo, "model", lambda *a, **k: nets.append(real_model(*a, **k)) or nets[-1])
    weights = {e: [{k: v.clone() for k, v in sd.items()} for sd in sds] for e, sds in tiny_zoo.state_dicts.items()}
    real_x = digits.train_x.clone()
    d = distiller(digits, tiny_zoo, config(fast=fast))
    before = d.images.detach().clone()
    d.step()
    assert nets, "a zoo model was used"
    for net in nets:
        assert all(p.grad is None and not p.requires_grad for p in net.parameters())
    assert d.images.grad is not None and d.images.grad.abs().sum() > 0
    assert not torch.equal(d.images.detach(), before)
    assert torch.equal(digits.train_x, real_x), "real images untouched"
    for e, sds in tiny_zoo.state_dicts.items():
        for sd, ref in zip(sds, weights[e]):
            assert all(torch.equal(sd[k], ref[k]) for k in ref), "zoo weights untouched"


def test_lambdas_zero_is_one_iteration_of_per_class_steps(digits, tiny_zoo):
    """Fast path, M=1 model and K=1 draw (so the pick is known): the update is the reference's C
    per-class SGD steps on ||mu_real_c - mu_syn_c||^2, computed here from scratch on the synthetic
    side. First iteration: class c gets its gradient at step c (no momentum before it), then moves
    by momentum alone in the C-1-c later steps: lr * g_c * (1 + m + ... + m^(C-1-c))."""
    cfg = config(distill__lambda1=0.0, distill__lambda2=0.0, distill__num_models=1, distill__aug_pool=1)
    d = distiller(digits, tiny_zoo, cfg)
    x0 = d.images.detach().clone().clamp(0, 1)
    terms = d.step()
    assert terms["total"] == terms["proto"] and terms["h"] == 0

    net = tiny_zoo.model(0, 2)
    params = d.pool.params(0, 0)
    real_means = list(d.cache.entries[(0, 0)].mean)  # the cached real prototypes
    # the cached real prototype of class c is a class-c prototype (labels not mixed up)
    with torch.no_grad():
        full = [net.embed(augment(digits.class_images(c), digits.mean, digits.std, params)).mean(0)
                for c in range(10)]
    for c, mu in enumerate(real_means):
        assert int(torch.stack([(mu - f).norm() for f in full]).argmin()) == c

    x = x0.clone().requires_grad_(True)
    xd, _ = decode(x, d.labels, d.grid)
    f = net.embed(augment(xd, digits.mean, digits.std, params))
    per = f.shape[0] // 10
    loss = sum(prototype_loss(real_means[c][None], f[c * per:(c + 1) * per]) for c in range(10))
    loss.backward()
    assert loss.item() == pytest.approx(terms["proto"], rel=1e-5)
    mom, ipc = cfg.distill.momentum, cfg.distill.ipc
    scale = torch.tensor([sum(mom ** i for i in range(10 - c)) for c in range(10)]).repeat_interleave(ipc)
    expected = x0 - image_lr(cfg) * x.grad * scale.view(-1, 1, 1, 1)
    assert torch.allclose(d.images.detach(), expected, rtol=1e-5, atol=1e-6)
    joint = distiller(digits, tiny_zoo, cfg.override({"distill.per_class_step": False}))
    joint.step()  # one joint step: momentum buffer = grad, every class moves by lr * g_c once
    assert torch.allclose(joint.images.detach(), x0 - image_lr(cfg) * x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_lambdas_zero_total_equals_proto(digits, tiny_zoo, fast):
    d = distiller(digits, tiny_zoo, config(fast=fast, distill__lambda1=0.0, distill__lambda2=0.0))
    terms = d.step()
    assert terms["total"] == terms["proto"] > 0 and terms["sd"] > 0 and terms["h"] == 0
    assert not d.bank.initialised.any(), "no memory bank without L_h"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_memory_bank_updates_and_enters_after_warmup(digits, tiny_zoo, fast):
    l1, l2 = 50.0, 0.2
    d = distiller(digits, tiny_zoo, config(fast=fast, distill__warmup=2, distill__lambda2=l2))
    assert not d.bank.initialised.any()
    history = []
    for i in range(3):
        terms = d.step()
        history.append(terms)
        assert d.bank.initialised.all()
        assert torch.isfinite(d.bank.h).all() and d.bank.h.abs().sum() > 0
        with_h = terms["proto"] + l1 * terms["sd"] + l2 * terms["h"]
        assert terms["total"] == pytest.approx(with_h, rel=1e-5)
    assert history[0]["h"] == 0 and history[1]["h"] == 0, "L_h is off during the warm-up"
    assert history[2]["h"] > 0, "and on from iteration `warmup`"


def test_memory_term_changes_the_update_only_after_warmup(digits, tiny_zoo):
    """Fast path draws nothing extra for the bank, so lambda2 on/off runs agree until warmup."""
    on = distiller(digits, tiny_zoo, config(distill__warmup=2, distill__lambda2=5.0))
    off = distiller(digits, tiny_zoo, config(distill__warmup=2, distill__lambda2=0.0))
    for i in range(3):
        on.step(), off.step()
        same = torch.equal(on.images, off.images)
        assert same if i < 2 else not same, f"after step {i}"


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_warmup_zero_starts_without_a_prototype(digits, tiny_zoo, fast):
    """warmup=0: h_c does not exist before the bank's first update, so L_h starts at the 2nd step."""
    d = distiller(digits, tiny_zoo, config(fast=fast, distill__warmup=0, distill__lambda2=0.2))
    first, second = d.step(), d.step()
    assert first["h"] == 0 and math.isfinite(first["total"])  # h_c does not exist yet
    assert second["h"] > 0


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_one_synthetic_image_per_class_never_nan(digits, tiny_zoo, fast):
    """ipc=1, factor 1: the synthetic covariance is undefined (n-1 = 0); the loss stays finite."""
    d = distiller(digits, tiny_zoo, config(fast=fast, distill__ipc=1, distill__factor=1))
    terms = d.step()
    assert all(math.isfinite(v) for v in terms.values()) and terms["sd"] > 0
    assert torch.isfinite(d.images).all()


# --- failures -----------------------------------------------------------------------------

@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_nan_loss_raises_and_checkpoint_survives(digits, tiny_zoo, tmp_path, monkeypatch, fast):
    cfg = config(fast=fast, distill__iterations=3)
    poisoned = {"on": False}
    real_embed = ConvNet.embed

    def embed(self, x):
        out = real_embed(self, x)
        return out * float("nan") if poisoned["on"] else out

    monkeypatch.setattr(ConvNet, "embed", embed)

    def poison_after_2(metrics, step):
        if step == 2:
            poisoned["on"] = True

    ckpt = tmp_path / "nan.ckpt"
    with pytest.raises(DsdmError) as err:
        distiller(digits, tiny_zoo, cfg).run(checkpoint=ckpt, log=poison_after_2)
    msg = str(err.value)
    assert "nan" in msg.lower() and "iteration 3" in msg and "\n" not in msg
    monkeypatch.undo()
    fresh = distiller(digits, tiny_zoo, cfg)
    fresh.load_checkpoint(ckpt)
    assert fresh.iteration == 2 and torch.isfinite(fresh.images).all()
    assert torch.isfinite(fresh.run(checkpoint=ckpt).images).all()


def test_ipc_larger_than_a_class(digits, tiny_zoo):
    smallest = min(len(i) for i in digits.class_indices())
    assert 100 <= smallest < 400
    with pytest.raises(DsdmError) as err:
        distiller(digits, tiny_zoo, config(distill__ipc=100, distill__factor=2))
    msg = str(err.value)
    assert "400" in msg and f"has {smallest}" in msg and "--ipc" in msg and "\n" not in msg
    with pytest.raises(DsdmError, match="ipc"):
        distiller(digits, tiny_zoo, config(method="dm", distill__ipc=smallest + 1))
    ok = distiller(digits, tiny_zoo, config(distill__ipc=100, distill__factor=1))  # 100 tiles fit
    assert ok.images.shape == (1000, 1, 8, 8)


def test_zoo_mismatch_refused(digits, tiny_zoo):
    with pytest.raises(DsdmError, match="needs a zoo"):
        Distiller(digits, config(), None)
    with pytest.raises(DsdmError, match="larger than the zoo"):
        Distiller(digits, config(zoo__num_models=4, distill__num_models=3), tiny_zoo)
    with pytest.raises(DsdmError, match="snapshot"):
        Distiller(digits, config(zoo__snapshots=(1, 2, 3), distill__pretrain_epochs=3), tiny_zoo)


def test_zoo_of_another_dataset_refused(digits, tiny_zoo):
    import dataclasses

    with pytest.raises(DsdmError, match="fashionmnist"):
        Distiller(digits, config(), dataclasses.replace(tiny_zoo, dataset="fashionmnist"))


def test_dm_step_on_mnist(mnist):
    """28x28 goes through the padded ConvNet (d = 2048) and the loop runs on real MNIST."""
    cfg = config("dm", distill__ipc=1, distill__batch_real=8, distill__iterations=1)
    d = Distiller(mnist, cfg, None)
    assert d.bank.feature_dim == 2048 and d.images.shape == (10, 1, 28, 28)
    before = d.images.detach().clone()
    terms = d.step()
    assert math.isfinite(terms["total"]) and terms["total"] == terms["proto"]
    assert not torch.equal(d.images.detach(), before)


# --- the pool refresh, per-class steps and the run loop's hooks -----------------------------

def _slot_history(d, steps):
    """(real indices, draw) slot (0, 0) holds before each of `steps` iterations (M = K = 1)."""
    seen = []
    for _ in range(steps):
        seen.append((torch.cat(d.pool.real_batch(0, 0)), d.pool.params(0, 0)))
        d.step()
    return seen


def _same_draw(a, b) -> bool:
    return a.ops == b.ops and all(torch.equal(getattr(a, f), getattr(b, f)) for f in
                                  ("brightness", "crop", "cutout", "scale", "rotate") if getattr(a, f) is not None)


@pytest.mark.parametrize("refresh", [0, 1, 2])
def test_aug_refresh_redraws_a_slot_after_r_uses(digits, tiny_zoo, refresh):
    """One zoo model and one slot, so every iteration uses slot (0, 0): R = 1 gives every use a new
    real batch and a new draw (a cache fill each), R = 0 keeps the slot for the whole run."""
    d = distiller(digits, tiny_zoo, config(distill__num_models=1, distill__aug_pool=1, distill__aug_refresh=refresh))
    seen = _slot_history(d, 4)
    changed = [not torch.equal(a[0], b[0]) for a, b in zip(seen, seen[1:])]
    redrawn = [not _same_draw(a[1], b[1]) for a, b in zip(seen, seen[1:])]
    expected = {0: [False] * 3, 1: [True] * 3, 2: [False, True, False]}[refresh]
    assert changed == expected and redrawn == expected
    assert d.cache.fills == 1 + sum(expected) and d.cache.hits == 3 - sum(expected)
    assert d.pool.generation.tolist() == [[{0: 0, 1: 4, 2: 2}[refresh]]]


def test_refreshed_slot_is_a_pure_function_of_its_generation(digits, tiny_zoo):
    """Two runs agree slot by slot, and an evicted entry refills to the same bits (LRU cap)."""
    cfg = config(distill__aug_refresh=1, distill__iterations=5)
    free, capped = distiller(digits, tiny_zoo, cfg), distiller(digits, tiny_zoo, cfg)
    capped.cache.max_bytes = 1  # keeps one entry: every other slot is recomputed when drawn again
    for _ in range(5):
        free.step(), capped.step()
    assert torch.equal(free.images, capped.images) and torch.equal(free.pool.generation, capped.pool.generation)
    assert len(capped.cache.entries) == 1


def test_fast_per_class_steps_replay_the_reference_order(digits, tiny_zoo):
    """After two iterations (momentum built up), one fast iteration with per-class steps equals C
    optimiser steps taken one after another, step c with class c's gradient at the pixels of that
    moment, computed by C separate forward passes (the reference's order)."""
    cfg = config(distill__lambda2=0.0, distill__iterations=3)
    fast = distiller(digits, tiny_zoo, cfg)
    fast.step(), fast.step()
    replay = distiller(digits, tiny_zoo, cfg)
    replay.load_state_dict(copy.deepcopy(fast.state_dict()))  # the optimizer state holds live buffers
    fast.step()
    with torch.no_grad():
        replay.images.clamp_(0, 1)  # as step() does first
    m, net = replay.pick_network()
    k = int(torch.randint(replay.pool.size, (), generator=replay.generator))
    for c, s in enumerate(replay.class_slices):
        loss, _, _ = replay.fast_class_losses(m, net, k)  # all classes at the current pixels
        grad, = torch.autograd.grad(loss[c], replay.images)
        assert grad[:s.start].abs().sum() == 0 and grad[s.stop:].abs().sum() == 0
        replay.images.grad = grad
        replay.optimizer.step()
    assert torch.allclose(fast.images, replay.images, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fast.images, fast.per_class_pixels()), "momentum moved later classes"


def test_hooks_report_window_averages_and_checkpoints(digits, tiny_zoo, tmp_path):
    """Reports at multiples of log_every or checkpoint_every and at the end, each averaging exactly
    the iterations since the previous one; the checkpoint hook sees the checkpoint file written."""
    cfg = config(distill__iterations=7, distill__log_every=2, distill__checkpoint_every=3)
    by_hand = distiller(digits, tiny_zoo, cfg)
    totals = [by_hand.step()["total"] for _ in range(7)]
    logs, ckpts, after, proxies = [], [], [], []
    ckpt = tmp_path / "h.ckpt"

    def on_checkpoint(metrics, step):
        saved = safe_torch_load(ckpt, expect="dsdm-distill-checkpoint", what="checkpoint", fix="-")
        ckpts.append((step, saved["state"]["iteration"], metrics))

    hooks = RunHooks(log=lambda m, s: logs.append((s, m)), checkpoint=on_checkpoint, after_step=after.append,
                     proxy=lambda d: proxies.append(d.iteration) or 0.5, proxy_every=3)
    distiller(digits, tiny_zoo, cfg).run(checkpoint=ckpt, hooks=hooks)
    assert [s for s, _ in logs] == [2, 3, 4, 6, 7] and after == list(range(1, 8))
    bounds = [0, 2, 3, 4, 6, 7]
    for (step, metrics), lo in zip(logs, bounds):
        window = totals[lo:step]
        assert metrics["loss/total"] == pytest.approx(sum(window) / len(window), rel=1e-6)
    assert [(s, i) for s, i, _ in ckpts] == [(3, 3), (6, 6), (7, 7)]
    assert ckpts[0][2] is logs[1][1], "the checkpoint hook gets that step's report"
    assert proxies == [3, 6] and logs[1][1]["proxy_val_acc"] == 0.5 and "proxy_val_acc" not in logs[0][1]
