"""Tests for dsdm.memory: EMA recurrence, warm-up gating, checkpointing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsdm.errors import DsdmError
from dsdm.memory import MemoryBank, ema_update


def test_update_follows_ema_recurrence_exactly():
    C, d, alpha = 4, 7, 0.99
    rng = np.random.default_rng(0)
    bank = MemoryBank(C, d, alpha=alpha, dtype=torch.float64)
    ref = np.zeros((C, d))
    seen = [False] * C
    for _ in range(60):
        c = int(rng.integers(C))
        p = rng.normal(size=d)
        bank.update(c, torch.from_numpy(p))
        if not seen[c]:
            ref[c] = p  # first update sets h = p
            seen[c] = True
        else:
            for j in range(d):
                ref[c, j] = alpha * ref[c, j] + (1.0 - alpha) * p[j]
    np.testing.assert_allclose(bank.h.numpy(), ref, rtol=1e-14, atol=0)
    assert bank.initialised.tolist() == seen
    for c in range(C):
        if seen[c]:
            np.testing.assert_allclose(bank.get(c).numpy(), ref[c], rtol=1e-14, atol=0)


def test_update_all_matches_loop():
    C, d, alpha = 3, 5, 0.9
    rng = np.random.default_rng(1)
    bank = MemoryBank(C, d, alpha=alpha, dtype=torch.float64)
    ref = None
    for _ in range(10):
        p = rng.normal(size=(C, d))
        bank.update_all(torch.from_numpy(p))
        ref = p.copy() if ref is None else alpha * ref + (1.0 - alpha) * p
    np.testing.assert_allclose(bank.h.numpy(), ref, rtol=1e-14, atol=0)
    assert bool(bank.initialised.all())


def test_update_all_respects_partial_initialisation():
    bank = MemoryBank(2, 3, alpha=0.5, dtype=torch.float64)
    bank.update(0, torch.ones(3, dtype=torch.float64))
    bank.update_all(torch.full((2, 3), 3.0, dtype=torch.float64))
    assert bank.h[0].tolist() == [2.0, 2.0, 2.0]  # 0.5*1 + 0.5*3
    assert bank.h[1].tolist() == [3.0, 3.0, 3.0]  # first update of class 1 sets h = p


def test_ema_update_is_pure():
    h = torch.ones(2, 3)
    p = torch.zeros(2, 3)
    out = ema_update(h, p, 0.75, torch.tensor([True, False]))
    assert torch.equal(h, torch.ones(2, 3)) and torch.equal(p, torch.zeros(2, 3))
    assert out[0].tolist() == [0.75] * 3 and out[1].tolist() == [0.0] * 3
    assert ema_update(torch.ones(3), torch.zeros(3), 0.75, True).tolist() == [0.75] * 3


def test_warmup_gating():
    bank = MemoryBank(2, 3)
    assert bank.alpha == 0.99 and bank.warmup == 2000
    assert not bank.active(0) and not bank.active(1999)
    assert bank.active(2000) and bank.active(5000)
    assert MemoryBank(2, 3, warmup=0).active(0)


def test_update_does_not_keep_graph():
    bank = MemoryBank(2, 4)
    w = torch.randn(4, requires_grad=True)
    bank.update(0, w * 2)
    bank.update(0, w * 3)
    bank.update_all(torch.stack([w, w]) * 1.5)
    assert bank.h.grad_fn is None and not bank.h.requires_grad
    assert bank.get(1).grad_fn is None


def test_get_returns_stable_value_after_later_updates():
    bank = MemoryBank(1, 2, alpha=0.5)
    bank.update(0, torch.tensor([2.0, 2.0]))
    h0 = bank.get(0)
    bank.update(0, torch.tensor([0.0, 0.0]))
    assert h0.tolist() == [2.0, 2.0] and bank.get(0).tolist() == [1.0, 1.0]


def test_state_dict_round_trip_bit_exact(tmp_path):
    bank = MemoryBank(5, 6, alpha=0.97, warmup=123)
    g = torch.Generator().manual_seed(0)
    for c in (0, 2, 2, 4):
        bank.update(c, torch.randn(6, generator=g))
    path = tmp_path / "bank.pt"
    torch.save(bank.state_dict(), path)
    other = MemoryBank(5, 6)
    other.load_state_dict(torch.load(path))
    assert torch.equal(other.h, bank.h) and other.h.dtype == bank.h.dtype
    assert torch.equal(other.initialised, bank.initialised)
    assert other.alpha == 0.97 and other.warmup == 123
    # state_dict holds copies: later updates do not change a saved state
    sd = bank.state_dict()
    bank.update(1, torch.randn(6, generator=g))
    assert not bool(sd["initialised"][1])


def test_load_state_dict_shape_mismatch():
    with pytest.raises(DsdmError):
        MemoryBank(3, 4).load_state_dict(MemoryBank(2, 4).state_dict())


def test_to_device_and_errors():
    bank = MemoryBank(2, 3).to("cpu")
    assert bank.device.type == "cpu" and bank.initialised.device.type == "cpu"
    with pytest.raises(DsdmError):
        bank.get(0)  # not initialised yet
    with pytest.raises(DsdmError):
        bank.update(2, torch.zeros(3))
    with pytest.raises(DsdmError):
        bank.update(0, torch.zeros(4))
    with pytest.raises(DsdmError):
        MemoryBank(2, 3, alpha=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_round_trip():
    bank = MemoryBank(2, 3).to("cuda")
    bank.update(0, torch.ones(3))  # CPU prototype is moved to the bank's device
    assert bank.h.is_cuda
    back = MemoryBank(2, 3)
    back.load_state_dict(bank.state_dict())
    assert not back.h.is_cuda and back.h[0].tolist() == [1.0] * 3
