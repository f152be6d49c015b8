"""The fast path's guarantees (dsdm/fastpath.py, Distiller's fast step): its per-class loss IS the
reference loss for the same model, augmentation draw and real batch (the 'same objective'
guarantee at the level of one step); the batched losses are the per-class ones; the cache's
padding, LRU cap and reduced-precision storage; compile/precision/lever switches; chunking."""
from __future__ import annotations

import pytest
import torch

from benchmarks.distill import SHAPES, bench_config, bench_dataset, bench_zoo
from dsdm.data import Dataset
from dsdm.distill import Distiller
from dsdm.errors import DsdmError
from dsdm.augment import nchw
from dsdm.fastpath import RealFeatureCache, chunk_size, embed, embed_chunked
from dsdm.losses import RealSide, dsdm_class_loss, dsdm_losses, precompute_real

SMALL = SHAPES["small"]


def small_distiller(ipc=2, fast=True, dataset=None, **opts):
    """The benchmark's small shapes; `distill__key=value` sets distill.key, `key=value` too."""
    ds = dataset if dataset is not None else bench_dataset(SMALL)
    over = {k.split("__")[-1]: v for k, v in {"compile": "off", **opts}.items()}
    cfg = bench_config(SMALL, ipc, fast, models=2, draws=2, opts=over)
    return Distiller(ds, cfg, bench_zoo(ds, 2), "cpu")


def _uneven_dataset() -> Dataset:
    """The small bench data with class 0 cut to 10 images: fewer than batch_real (16)."""
    ds = bench_dataset(SMALL)
    keep = torch.cat([torch.nonzero(ds.train_y == 0).flatten()[:10], torch.nonzero(ds.train_y != 0).flatten()])
    return Dataset("bench", "image", ds.train_x[keep], ds.train_y[keep], ds.val_x, ds.val_y, ds.test_x, ds.test_y,
                   ds.class_names, ds.mean, ds.std)


@pytest.mark.parametrize("uneven", [False, True], ids=["even", "class-with-fewer-than-batch_real"])
@pytest.mark.parametrize("with_h", [False, True], ids=["no-bank", "bank"])
def test_fast_class_loss_equals_reference_loss(uneven, with_h):
    """Same model, same draw, same real batch: fast per-class loss (cached, batched, one forward)
    == reference per-class loss (fresh forward per class, losses.dsdm_class_loss), and so are the
    gradients on the pixels."""
    d = small_distiller(ipc=2, dataset=_uneven_dataset() if uneven else None, distill__warmup=0)
    if with_h:  # a memory bank with a prototype for every class
        d.bank.update_all(torch.randn(d.bank.h.shape, generator=torch.Generator().manual_seed(1)))
        d.iteration = 5
    m, k = 1, 1
    net = d.zoo.model(m, 1)
    fast, fast_terms, _ = d.fast_class_losses(m, net, k)
    grad_fast, = torch.autograd.grad(fast.sum(), d.images)
    picks = d.pool.real_batch(m, k)
    if uneven:
        assert len(picks[0]) == 10 and len(picks[1]) == 16
    grad_ref = torch.zeros_like(d.images)
    for c in range(d.dataset.num_classes):
        ref, terms = d.reference_class_loss(net, c, d.pool.params(m, k), picks[c])
        assert fast[c].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7), f"class {c}"
        for key in ("proto", "sd", "h"):
            assert fast_terms[key][c].item() == pytest.approx(terms[key].item(), rel=1e-5, abs=1e-7)
        assert (terms["h"].item() > 0) == with_h
        grad_ref += torch.autograd.grad(ref, d.images)[0]
    assert ((grad_fast - grad_ref).norm() / grad_ref.norm()).item() < 1e-5  # float rounding only


def test_batched_losses_are_the_per_class_losses():
    """dsdm_losses over C classes (with a class padded by zero rows) == dsdm_class_loss per class."""
    g = torch.Generator().manual_seed(0)
    C, n, m, dim = 3, 7, 4, 12
    counts = [n, n - 3, n]
    real = [torch.randn(k, dim, generator=g) for k in counts]
    syn = torch.randn(C, m, dim, generator=g)
    h = torch.randn(C, dim, generator=g)
    pre = [precompute_real(r) for r in real]
    xc = torch.zeros(C, n, dim)
    for c, (x, _) in enumerate(pre):
        xc[c, :len(x)] = x
    side = RealSide(torch.stack([r.mean(0) for r in real]), xc, torch.stack([p[1] for p in pre]),
                    torch.tensor([float(k - 1) for k in counts]))
    total, terms = dsdm_losses(syn, side, h, 50.0, 0.2)
    for c in range(C):
        ref, ref_terms = dsdm_class_loss(real[c], syn[c], h[c], 50.0, 0.2)
        assert total[c].item() == pytest.approx(ref.item(), rel=1e-5)
        assert all(terms[k][c].item() == pytest.approx(ref_terms[k].item(), rel=1e-5, abs=1e-8) for k in terms)
    one, _ = dsdm_losses(syn[:, :1], side, None, 50.0, 0.2)  # one synthetic image: finite
    assert torch.isfinite(one).all()


def test_loss_levers_compute_the_same_loss():
    """distill.batched_loss=false (class by class) and nchw_input=false change speed, not values."""
    base = small_distiller(distill__warmup=0)
    ref, ref_terms, _ = base.fast_class_losses(0, base.zoo.model(0, 1), 0)
    for over in ({"distill__batched_loss": False}, {"distill__nchw_input": False}):
        d = small_distiller(distill__warmup=0, **over)
        loss, terms, _ = d.fast_class_losses(0, d.zoo.model(0, 1), 0)
        assert torch.allclose(loss, ref, rtol=1e-5) and torch.allclose(terms["sd"], ref_terms["sd"], rtol=1e-5)


def test_cache_cap_evicts_and_recomputes_exactly():
    """An LRU cap changes memory, never the run: entries are pure functions of (seed, m, k)."""
    free, capped = small_distiller(), small_distiller()
    one_entry = None
    for i in range(6):
        free.step()
        if one_entry is None and free.cache.entries:
            one_entry = next(iter(free.cache.entries.values())).nbytes
            capped.cache.max_bytes = one_entry  # room for a single entry
        capped.step()
    assert torch.equal(free.images, capped.images) and torch.equal(free.bank.h, capped.bank.h)
    assert len(capped.cache.entries) == 1 and capped.cache.evictions > 0
    assert capped.cache.fills > free.cache.fills


def test_cache_low_precision_storage_is_close():
    d = small_distiller()
    net = d.zoo.model(0, 1)
    picks, params = d.pool.real_batch(0, 0), d.pool.params(0, 0)
    full = RealFeatureCache(d.pool).fill(net, picks, params)
    half = RealFeatureCache(d.pool, dtype=torch.bfloat16).fill(net, picks, params)
    assert half.xc.dtype == torch.bfloat16 and half.nbytes < 0.6 * full.nbytes
    assert torch.equal(half.norm_sq, full.norm_sq) and torch.equal(half.mean, full.mean)
    assert torch.allclose(half.xc.float(), full.xc, rtol=1e-2, atol=1e-2)


def test_switches():
    assert not small_distiller().compiled  # the bench config passes compile=off
    assert small_distiller(compile="auto").compiled, "auto compiles a 10K-iteration run"
    short = small_distiller(compile="auto", distill__iterations=10)
    assert not short.compiled, "auto leaves short runs eager"
    assert not small_distiller(fast=False, compile="on").compiled, "the reference path is never compiled"
    bf16 = small_distiller(precision="bf16")
    terms = bf16.step()
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())
    for key, value in (("compile", "yes"), ("precision", "fp8"), ("cache_dtype", "int8")):
        with pytest.raises(DsdmError, match=key):
            small_distiller(**{key: value})
    with pytest.raises(DsdmError, match="cache_max_mb"):
        small_distiller(distill__cache_max_mb=-1)
    with pytest.raises(DsdmError, match="aug_refresh"):
        small_distiller(distill__aug_refresh=-1)


def test_chunked_forward_is_the_same_function():

    assert chunk_size(400, 40) == 40 and chunk_size(2000, 40) == 40 and chunk_size(30, 40) == 30
    assert chunk_size(400, 0) == 400 and chunk_size(256, 40) == 32 and 400 % chunk_size(400, 33) == 0
    assert chunk_size(4099, 40) == 40  # a prime-ish n: uneven last chunk
    ds = bench_dataset(SMALL)
    net = bench_zoo(ds, 1).model(0, 1)
    x = torch.rand(24, 3, 16, 16, requires_grad=True)
    whole = embed(net, x)
    parts = embed_chunked(embed, net, x, 8)
    assert torch.allclose(whole, parts, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(whole.square().sum(), x)
    g2, = torch.autograd.grad(parts.square().sum(), x)
    assert torch.allclose(g1, g2, rtol=1e-4, atol=1e-6)
    assert small_distiller().forward_chunk == 40, "auto: chunks of 40 on CPU"
    assert small_distiller(forward_chunk=7).forward_chunk == 7
    with pytest.raises(DsdmError, match="forward_chunk"):
        small_distiller(forward_chunk=-1)


def test_nchw_fixes_one_channel_channels_last_strides():

    x = torch.rand(4, 8, 8, 1).permute(0, 3, 1, 2)  # what DSA's crop returns for 1-channel images
    assert x.is_contiguous() and x.stride() != (64, 64, 8, 1)
    y = nchw(x)
    assert y.stride() == (64, 64, 8, 1) and torch.equal(x, y)
    z = torch.rand(2, 3, 4, 4)
    assert nchw(z) is z
