"""DSDM matching losses: pure functions on per-class feature matrices.

Every function takes feature matrices of shape ``(N, d)`` (one row per image of ONE class,
``d`` = feature dimension, 2048 for ConvNet-3 on 32x32 input) and returns a 0-d tensor in
the input dtype. Gradients flow through all arguments that require grad; in distillation
only the synthetic features do.

Paper terms (spec section 2; ``lambda1 = 50``, ``lambda2 = 0.2`` by default)::

    L_proto = ||mu_T - mu_S||^2                    (sum of squares, not divided by d)
    L_SD    = ||Cov_T - Cov_S||_F^2 / d
    L_h     = ||mu_S - h||^2 / d                   (h: memory-bank prototype, constant)
    L       = L_proto + lambda1 * L_SD + lambda2 * L_h

Covariance convention: ``Cov = Xc^T Xc / (n - 1)`` with ``Xc`` the centred features (the
unbiased estimator of the reference code). For a single sample (``n = 1``) that estimator
is undefined (0/0); here the covariance of one sample is DEFINED as the ``(d, d)`` zero
matrix (its centred features are exactly zero, so the denominator is taken as
``max(n - 1, 1)``). Consequently, with one synthetic image per class,
``covariance_loss(f_real, f_syn) == ||Cov_T||_F^2 / d``, a finite constant with zero
gradient w.r.t. ``f_syn``. No function here ever returns NaN for ``n >= 1``; ``n = 0``
raises :class:`DsdmError`.

``covariance_loss`` never forms a ``(d, d)`` matrix. It uses the Gram identity, with
``A = Xc^T Xc / (n-1)`` and ``B = Yc^T Yc / (m-1)``::

    ||A - B||_F^2 = ||Xc Xc^T||_F^2 / (n-1)^2
                  - 2 ||Xc Yc^T||_F^2 / ((n-1)(m-1))
                  + ||Yc Yc^T||_F^2 / (m-1)^2

which costs O((n + m)^2 d) instead of O((n + m) d^2). The real side (``Xc`` and the
constant ``||A||_F^2``) can be computed once per class and model with
:func:`precompute_real` and reused through :func:`covariance_loss_from_centred`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsdm.errors import DsdmError

__all__ = [
    "class_mean",
    "centre",
    "class_covariance",
    "covariance_sq_norm",
    "precompute_real",
    "prototype_loss",
    "covariance_loss",
    "covariance_loss_from_centred",
    "historical_loss",
    "dsdm_class_loss",
]


# ----------------------------------------------------------------------------- checks
def _check_features(f: Tensor, name: str) -> None:
    if f.dim() != 2:
        raise DsdmError(f"{name} must be a (N, d) feature matrix, got shape {tuple(f.shape)}; flatten features first")
    if f.shape[0] < 1:
        raise DsdmError(f"{name} has no rows; every class needs at least one real and one synthetic sample")


def _check_pair(f_real: Tensor, f_syn: Tensor) -> None:
    _check_features(f_real, "f_real")
    _check_features(f_syn, "f_syn")
    if f_real.shape[1] != f_syn.shape[1]:
        raise DsdmError(
            f"feature dims differ: f_real has d={f_real.shape[1]}, f_syn has d={f_syn.shape[1]}; "
            "embed both with the same network"
        )
    if f_real.dtype != f_syn.dtype:
        raise DsdmError(f"dtype mismatch: f_real is {f_real.dtype}, f_syn is {f_syn.dtype}; cast both to one dtype")


def _dof(n: int) -> int:
    """Denominator of the unbiased covariance, ``max(n - 1, 1)`` (n = 1 -> zero covariance)."""
    return max(n - 1, 1)


# ----------------------------------------------------------------------------- statistics
def class_mean(f: Tensor) -> Tensor:
    """Class prototype ``mu = mean_i f_i``.  ``(n, d) -> (d,)``."""
    _check_features(f, "f")
    return f.mean(dim=0)  # (d,)


def centre(f: Tensor) -> Tensor:
    """Centred features ``Xc = f - mu``.  ``(n, d) -> (n, d)``."""
    _check_features(f, "f")
    return f - f.mean(dim=0, keepdim=True)  # (n, d)


def class_covariance(f: Tensor) -> Tensor:
    """Unbiased class covariance ``Cov = Xc^T Xc / (n - 1)``.  ``(n, d) -> (d, d)``.

    Forms the full ``(d, d)`` matrix: for inspection and tests, not for the training loop.
    With ``n = 1`` it returns the zero matrix (see module docstring).
    """
    xc = centre(f)  # (n, d)
    return xc.T @ xc / _dof(f.shape[0])  # (d, d)


def covariance_sq_norm(xc: Tensor) -> Tensor:
    """``||Cov||_F^2`` from centred features ``xc`` (n, d), without forming ``(d, d)``.

    ``||Xc^T Xc||_F = ||Xc Xc^T||_F``, so this is ``||Xc Xc^T||_F^2 / (n-1)^2``.
    """
    _check_features(xc, "xc")
    gram = xc @ xc.T  # (n, n)
    return gram.square().sum() / float(_dof(xc.shape[0])) ** 2


def precompute_real(f_real: Tensor) -> tuple[Tensor, Tensor]:
    """Cacheable real side of L_SD: ``(xc_real (n, d), ||Cov_T||_F^2 (0-d))``.

    Pass the pair to :func:`covariance_loss_from_centred` (or to ``dsdm_class_loss`` as
    ``real=``) to skip recomputing it while the real batch and model are unchanged.
    """
    xc_real = centre(f_real)  # (n, d)
    return xc_real, covariance_sq_norm(xc_real)


# ----------------------------------------------------------------------------- losses
def prototype_loss(f_real: Tensor, f_syn: Tensor) -> Tensor:
    """L_proto = ||mu_T - mu_S||^2 (sum of squares over d, not divided by d)."""
    _check_pair(f_real, f_syn)
    diff = f_real.mean(dim=0) - f_syn.mean(dim=0)  # (d,)
    return diff.square().sum()


def covariance_loss_from_centred(xc_real: Tensor, norm_real_sq: Tensor, f_syn: Tensor) -> Tensor:
    """L_SD = ||Cov_T - Cov_S||_F^2 / d from a precomputed real side.

    Args:
        xc_real: ``(n, d)`` CENTRED real features ``f_real - mean(f_real)``
            (uncentred input gives a wrong result; use :func:`precompute_real`).
        norm_real_sq: 0-d tensor ``||Cov_T||_F^2 = ||xc_real xc_real^T||_F^2 / (n-1)^2``,
            i.e. ``covariance_sq_norm(xc_real)``.
        f_syn: ``(m, d)`` raw (uncentred) synthetic features; centred here.

    Returns a 0-d tensor in the input dtype, clamped at 0 (rounding of the three-term
    Gram identity can otherwise produce a tiny negative value when ``Cov_S ~= Cov_T``).
    ``m = 1`` gives ``norm_real_sq / d`` (zero synthetic covariance, see module docstring).
    """
    _check_pair(xc_real, f_syn)
    n, d = xc_real.shape
    m = f_syn.shape[0]
    yc = f_syn - f_syn.mean(dim=0, keepdim=True)  # (m, d)
    dn, dm = float(_dof(n)), float(_dof(m))
    cross = (xc_real @ yc.T).square().sum() / (dn * dm)  # ||Xc Yc^T||_F^2 / ((n-1)(m-1))
    syn = (yc @ yc.T).square().sum() / (dm * dm)  # ||Yc Yc^T||_F^2 / (m-1)^2
    sq = norm_real_sq.to(f_syn.dtype) - 2.0 * cross + syn
    return sq.clamp_min(0.0) / d


def covariance_loss(f_real: Tensor, f_syn: Tensor) -> Tensor:
    """L_SD = ||Cov_T - Cov_S||_F^2 / d, via the Gram identity (no ``(d, d)`` matrix).

    ``Cov`` is the unbiased covariance; a single synthetic sample (``m = 1``) has zero
    covariance by definition, so then the loss is ``||Cov_T||_F^2 / d`` (finite, zero
    gradient w.r.t. ``f_syn``). Never NaN.
    """
    _check_pair(f_real, f_syn)
    xc_real, norm_real_sq = precompute_real(f_real)
    return covariance_loss_from_centred(xc_real, norm_real_sq, f_syn)


def historical_loss(f_syn: Tensor, h: Tensor) -> Tensor:
    """L_h = ||mu_S - h||^2 / d, with ``h`` (d,) the memory-bank prototype (treated as constant)."""
    _check_features(f_syn, "f_syn")
    d = f_syn.shape[1]
    if h.shape != (d,):
        raise DsdmError(f"memory prototype h must have shape ({d},), got {tuple(h.shape)}; use MemoryBank.get(c)")
    diff = f_syn.mean(dim=0) - h.detach().to(f_syn.dtype)  # (d,)
    return diff.square().sum() / d


def dsdm_class_loss(
    f_real: Tensor,
    f_syn: Tensor,
    h: Tensor | None,
    lambda1: float,
    lambda2: float,
    *,
    real: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-class DSDM loss L = L_proto + lambda1 * L_SD + lambda2 * L_h.

    Args:
        f_real: ``(n, d)`` real features of class c.
        f_syn: ``(m, d)`` synthetic features of class c.
        h: ``(d,)`` memory-bank prototype of class c, or ``None`` (before warm-up):
            then L_h is 0.
        lambda1, lambda2: weights of L_SD and L_h.
        real: optional cached ``precompute_real(f_real)``; when given, L_SD uses it.

    Returns ``(total, terms)``: ``total`` is a 0-d tensor carrying the graph;
    ``terms`` = ``{"proto", "sd", "h", "total"}``, detached 0-d tensors (unweighted
    terms, plus the weighted total) for logging. L_SD is always computed so it can be
    logged; with ``lambda1 = lambda2 = 0`` the total equals ``prototype_loss`` exactly.
    """
    _check_pair(f_real, f_syn)
    l_proto = prototype_loss(f_real, f_syn)
    xc_real, norm_real_sq = real if real is not None else precompute_real(f_real)
    l_sd = covariance_loss_from_centred(xc_real, norm_real_sq, f_syn)
    l_h = historical_loss(f_syn, h) if h is not None else f_syn.new_zeros(())
    total = l_proto
    if lambda1 != 0:  # skip zero weights: 0 * inf would be NaN, and the total stays exact
        total = total + lambda1 * l_sd
    if lambda2 != 0 and h is not None:
        total = total + lambda2 * l_h
    terms = {
        "proto": l_proto.detach(),
        "sd": l_sd.detach(),
        "h": l_h.detach(),
        "total": total.detach(),
    }
    return total, terms
