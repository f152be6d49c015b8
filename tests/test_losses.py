"""Tests for dsdm.losses against independent float64 numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dsdm.errors import DsdmError
from dsdm.losses import (
    class_covariance,
    class_mean,
    covariance_loss,
    covariance_loss_from_centred,
    covariance_sq_norm,
    dsdm_class_loss,
    historical_loss,
    precompute_real,
    prototype_loss,
)

SHAPES = [(5, 3, 4), (17, 6, 33), (256, 40, 2048)]  # (n_real, n_syn, d)


# ----------------------------------------------------------------------------- references
def ref_mean(x: np.ndarray) -> np.ndarray:
    acc = np.zeros(x.shape[1])
    for row in x:  # explicit loop over samples
        acc += row
    return acc / x.shape[0]


def ref_proto(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((ref_mean(x) - ref_mean(y)) ** 2))


def ref_cov(x: np.ndarray) -> np.ndarray:
    if x.shape[0] == 1:  # documented definition: one sample -> zero covariance
        return np.zeros((x.shape[1], x.shape[1]))
    return np.cov(x, rowvar=False, ddof=1)  # direct (d, d)


def ref_sd(x: np.ndarray, y: np.ndarray) -> float:
    diff = ref_cov(x) - ref_cov(y)
    return float(np.sum(diff * diff) / x.shape[1])


def ref_hist(y: np.ndarray, h: np.ndarray) -> float:
    return float(np.sum((ref_mean(y) - h) ** 2) / y.shape[1])


def features(n: int, d: int, seed: int, dtype=torch.float64, shift: float = 0.0) -> torch.Tensor:
    """ReLU features with N(0,1)-ish magnitudes, like a ConvNet embedding."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift).relu().to(dtype)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# ----------------------------------------------------------------------------- float64 values
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_losses_match_float64_reference(n, m, d):
    x, y = features(n, d, 0), features(m, d, 1, shift=0.3)
    h = features(1, d, 2)[0]
    xn, yn, hn = x.numpy(), y.numpy(), h.numpy()
    assert rel(prototype_loss(x, y).item(), ref_proto(xn, yn)) < 1e-5
    assert rel(covariance_loss(x, y).item(), ref_sd(xn, yn)) < 1e-5
    assert rel(historical_loss(y, h).item(), ref_hist(yn, hn)) < 1e-5
    xc, nsq = precompute_real(x)
    assert rel(covariance_loss_from_centred(xc, nsq, y).item(), ref_sd(xn, yn)) < 1e-5
    assert rel(nsq.item(), float(np.sum(ref_cov(xn) ** 2))) < 1e-5


@pytest.mark.parametrize("n,d", [(7, 5), (30, 12)])
def test_class_statistics(n, d):
    x = features(n, d, 3)
    np.testing.assert_allclose(class_mean(x).numpy(), ref_mean(x.numpy()), rtol=1e-12)
    np.testing.assert_allclose(class_covariance(x).numpy(), ref_cov(x.numpy()), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(
        covariance_sq_norm(x - x.mean(0)).item(), np.sum(ref_cov(x.numpy()) ** 2), rtol=1e-10
    )


def test_covariance_loss_zero_for_identical_sets():
    x = features(9, 6, 4)
    assert covariance_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert covariance_loss(x, x.clone()).item() >= 0.0


# ----------------------------------------------------------------------------- float32 precision
@pytest.mark.parametrize("shift", [0.0, 3.0])
def test_float32_gram_form_close_to_float64_reference(shift):
    n, m, d = 256, 40, 2048
    x64, y64 = features(n, d, 10, shift=shift), features(m, d, 11, shift=shift)
    ref = ref_sd(x64.numpy(), y64.numpy())
    got = covariance_loss(x64.float(), y64.float())
    assert got.dtype == torch.float32
    assert rel(got.item(), ref) < 1e-3
    assert rel(prototype_loss(x64.float(), y64.float()).item(), ref_proto(x64.numpy(), y64.numpy())) < 1e-3


def test_float32_syn_drawn_from_real():
    # Hardest realistic case: synthetic = subset of the real batch (Cov_S close to Cov_T).
    n, m, d = 256, 40, 2048
    x64 = features(n, d, 12)
    y64 = x64[:m].clone()
    ref = ref_sd(x64.numpy(), y64.numpy())
    assert rel(covariance_loss(x64.float(), y64.float()).item(), ref) < 1e-3


# ----------------------------------------------------------------------------- gradients
def _gc_inputs():
    x = features(6, 5, 20)
    y = (features(4, 5, 21) + 0.1).requires_grad_(True)
    h = features(1, 5, 22)[0]
    return x, y, h


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y, h: prototype_loss(x, y),
        lambda x, y, h: covariance_loss(x, y),
        lambda x, y, h: covariance_loss_from_centred(*precompute_real(x), y),
        lambda x, y, h: historical_loss(y, h),
        lambda x, y, h: dsdm_class_loss(x, y, h, 50.0, 0.2)[0],
    ],
    ids=["proto", "sd", "sd_cached", "hist", "total"],
)
def test_gradcheck_wrt_f_syn(fn):
    x, y, h = _gc_inputs()
    assert torch.autograd.gradcheck(lambda yy: fn(x, yy, h), (y,))


def test_gradients_flow_to_synthetic_only():
    x = features(32, 16, 30, dtype=torch.float32)
    y = features(8, 16, 31, dtype=torch.float32).requires_grad_(True)
    h = torch.randn(16, requires_grad=True)  # the bank prototype must be treated as constant
    total, terms = dsdm_class_loss(x, y, h, 50.0, 0.2)
    total.backward()
    assert not x.requires_grad and x.grad is None
    assert h.grad is None
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(not t.requires_grad for t in terms.values())


# ----------------------------------------------------------------------------- n_syn = 1
@pytest.mark.parametrize("d", [4, 2048])
def test_single_synthetic_sample_covariance_is_zero(d):
    x = features(20, d, 40)
    y = features(1, d, 41).requires_grad_(True)
    loss = covariance_loss(x, y)
    assert torch.isfinite(loss)
    expected = float(np.sum(ref_cov(x.numpy()) ** 2) / d)  # ||Cov_T||_F^2 / d
    assert rel(loss.item(), expected) < 1e-10
    loss.backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() == 0
    assert torch.equal(class_covariance(y.detach()), torch.zeros(d, d, dtype=torch.float64))
    total, terms = dsdm_class_loss(x, y, None, 50.0, 0.2)
    assert torch.isfinite(total) and all(torch.isfinite(t) for t in terms.values())


def test_single_sample_float32_not_nan():
    x = features(1, 8, 42, dtype=torch.float32)
    y = features(1, 8, 43, dtype=torch.float32)
    assert covariance_loss(x, y).item() == 0.0


# ----------------------------------------------------------------------------- combination
def test_lambdas_zero_equals_prototype_loss_exactly():
    x, y = features(40, 64, 50, dtype=torch.float32), features(10, 64, 51, dtype=torch.float32)
    h = torch.randn(64)
    for hh in (h, None):
        total, _ = dsdm_class_loss(x, y, hh, 0.0, 0.0)
        assert torch.equal(total, prototype_loss(x, y))


def test_dsdm_class_loss_combination_and_terms():
    x, y = features(40, 64, 52), features(10, 64, 53)
    h = features(1, 64, 54)[0]
    total, terms = dsdm_class_loss(x, y, h, 50.0, 0.2)
    xn, yn, hn = x.numpy(), y.numpy(), h.numpy()
    expected = ref_proto(xn, yn) + 50.0 * ref_sd(xn, yn) + 0.2 * ref_hist(yn, hn)
    assert rel(total.item(), expected) < 1e-10
    assert set(terms) == {"proto", "sd", "h", "total"}
    assert rel(terms["sd"].item(), ref_sd(xn, yn)) < 1e-10
    assert rel(terms["h"].item(), ref_hist(yn, hn)) < 1e-10
    # h = None -> L_h term 0
    total_none, terms_none = dsdm_class_loss(x, y, None, 50.0, 0.2)
    assert terms_none["h"].item() == 0.0
    assert rel(total_none.item(), ref_proto(xn, yn) + 50.0 * ref_sd(xn, yn)) < 1e-10
    # cached real side gives the same result
    total_cached, _ = dsdm_class_loss(x, y, h, 50.0, 0.2, real=precompute_real(x))
    assert rel(total_cached.item(), total.item()) < 1e-12


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_dsdm_error():
    x = torch.randn(5, 4)
    with pytest.raises(DsdmError):
        prototype_loss(x, torch.randn(3, 5))
    with pytest.raises(DsdmError):
        covariance_loss(x, torch.randn(0, 4))
    with pytest.raises(DsdmError):
        covariance_loss(x, torch.randn(4))
    with pytest.raises(DsdmError):
        historical_loss(x, torch.randn(3))
    with pytest.raises(DsdmError):
        covariance_loss(x, torch.randn(3, 4, dtype=torch.float64))
