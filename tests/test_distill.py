"""Distiller (Algorithm 1) through its public API: reproducibility, exact resume, gradients,
the lambda = 0 reduction, the memory bank, NaN handling and input checks. Tiny digits runs."""
from __future__ import annotations

import math

import pytest
import torch

from dsdm.augment import augment, decode
from dsdm.config import make_config
from dsdm.distill import Distiller, image_lr
from dsdm.errors import DsdmError
from dsdm.losses import prototype_loss
from dsdm.models import ConvNet
from dsdm.synthetic import safe_torch_load

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


@pytest.mark.parametrize("method,fast", [("dsdm", True), ("dsdm", False), ("dm", False)],
                         ids=["dsdm-fast", "dsdm-reference", "dm"])
def test_kill_and_resume_is_exact(digits, tiny_zoo, tmp_path, method, fast):
    """A run killed mid-way and restarted from its checkpoint ends where an uninterrupted one does.
    warmup=1 < checkpoint < N, so the memory bank and L_h are part of the resumed state."""
    n = 4
    cfg = config(method, fast, distill__iterations=n, distill__warmup=1)
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


def test_lambdas_zero_is_one_prototype_matching_step(digits, tiny_zoo):
    """Fast path, M=1 model and K=1 draw (so the pick is known): the update is exactly one SGD step
    on sum_c ||mu_real_c - mu_syn_c||^2 computed here from scratch on the synthetic side."""
    cfg = config(distill__lambda1=0.0, distill__lambda2=0.0, distill__num_models=1, distill__aug_pool=1)
    d = distiller(digits, tiny_zoo, cfg)
    x0 = d.images.detach().clone().clamp(0, 1)
    terms = d.step()
    assert terms["total"] == terms["proto"] and terms["h"] == 0

    net = tiny_zoo.model(0, 2)
    params = d.aug_pool[0]
    real_means = [entry[0] for entry in d.cache.entries[(0, 0)]]  # the cached real prototypes
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
    expected = x0 - image_lr(cfg) * x.grad  # first SGD step: momentum buffer = grad
    assert torch.allclose(d.images.detach(), expected, rtol=1e-5, atol=1e-7)


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
