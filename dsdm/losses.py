"""DSDM matching losses: pure functions, each formula written once, batched over classes.

The primary functions take a class axis: synthetic features ``(C, m, d)`` (class c in row c),
the real side stacked as a :class:`RealSide`, and return one value per class ``(C,)``. The
per-class functions (``prototype_loss``, ``covariance_loss``, ... on ``(N, d)`` matrices of ONE
class) are the batched ones with ``C = 1``; the reference loop and the tests use them. Inputs
keep their dtype; gradients flow through every argument that requires grad; in distillation
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

L_SD never forms a ``(d, d)`` matrix. It uses the Gram identity, with
``A = Xc^T Xc / (n-1)`` and ``B = Yc^T Yc / (m-1)``::

    ||A - B||_F^2 = ||Xc Xc^T||_F^2 / (n-1)^2
                  - 2 ||Xc Yc^T||_F^2 / ((n-1)(m-1))
                  + ||Yc Yc^T||_F^2 / (m-1)^2

which costs O((n + m)^2 d) instead of O((n + m) d^2). The real side (``Xc`` and the
constant ``||A||_F^2``) is computed once per class and model (:func:`precompute_real`,
:func:`real_side`) and reused. Zero rows appended to ``Xc`` change no Gram product, so
classes with fewer real images than the others stack exactly (their ``dof`` says their n).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dsdm.errors import DsdmError

__all__ = [
    "RealSide",
    "real_side",
    "prototype_losses",
    "covariance_sq_norms",
    "covariance_losses",
    "historical_losses",
    "dsdm_losses",
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

TERMS = ("proto", "sd", "h", "total")


class RealSide(NamedTuple):
    """The real side of every class's loss, stacked over classes (C = 1 for one class)."""
    mean: Tensor  # (C, d) real prototypes mu_T
    xc: Tensor  # (C, n, d) centred real features; zero rows past a class's own count
    norm_sq: Tensor  # (C,) ||Cov_T||_F^2
    dof: Tensor  # (C,) max(n_c - 1, 1), the covariance denominator of each class


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


# ----------------------------------------------------------------------------- the formulas (batched)
def prototype_losses(mu_real: Tensor, mu_syn: Tensor) -> Tensor:
    """L_proto per class: ``||mu_T - mu_S||^2``.  ``(C, d), (C, d) -> (C,)``."""
    return (mu_real.to(mu_syn.dtype) - mu_syn).square().sum(-1)


def covariance_sq_norms(xc: Tensor, dof: Tensor) -> Tensor:
    """``||Cov||_F^2 = ||Xc Xc^T||_F^2 / dof^2`` per class, never forming (d, d).  ``(C, n, d) -> (C,)``."""
    gram = torch.bmm(xc, xc.transpose(1, 2))  # (C, n, n)
    return gram.square().sum((1, 2)) / dof.to(xc.dtype).square()


def covariance_losses(xc_real: Tensor, norm_real_sq: Tensor, dof_real: Tensor, f_syn: Tensor) -> Tensor:
    """L_SD per class from the cached real side and raw synthetic features ``(C, m, d)``; ``(C,)``.

    Clamped at 0: rounding of the three-term Gram identity can otherwise produce a tiny
    negative value when ``Cov_S ~= Cov_T``. ``m = 1`` gives ``||Cov_T||^2 / d``.
    """
    _, m, d = f_syn.shape
    yc = f_syn - f_syn.mean(1, keepdim=True)  # (C, m, d)
    dn, dm = dof_real.to(f_syn.dtype), float(_dof(m))
    cross = torch.bmm(xc_real.to(f_syn.dtype), yc.transpose(1, 2)).square().sum((1, 2)) / (dn * dm)  # ||Xc Yc^T||^2/((n-1)(m-1))
    syn = torch.bmm(yc, yc.transpose(1, 2)).square().sum((1, 2)) / (dm * dm)  # ||Yc Yc^T||^2/(m-1)^2
    return (norm_real_sq.to(f_syn.dtype) - 2.0 * cross + syn).clamp_min(0.0) / d


def historical_losses(mu_syn: Tensor, h: Tensor) -> Tensor:
    """L_h per class: ``||mu_S - h||^2 / d``; h (C, d) is the memory bank, treated as constant."""
    return (mu_syn - h.detach().to(mu_syn.dtype)).square().sum(-1) / mu_syn.shape[-1]


def dsdm_losses(f_syn: Tensor, real: RealSide, h: Tensor | None, lambda1: float,
                lambda2: float) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_proto + lambda1 L_SD + lambda2 L_h for every class at once.

    f_syn: ``(C, m, d)`` synthetic features, class c in row c; real: the classes' RealSide;
    h: ``(C, d)`` memory-bank prototypes or None (before warm-up: L_h is 0).
    Returns ``(total (C,) carrying the graph, {"proto", "sd", "h", "total"}: detached (C,))``.
    L_SD is always computed so it can be logged; zero weights are skipped (0 * inf would be
    NaN), so with ``lambda1 = lambda2 = 0`` the total equals L_proto exactly.
    """
    mu = f_syn.mean(1)  # (C, d)
    l_proto = prototype_losses(real.mean, mu)
    l_sd = covariance_losses(real.xc, real.norm_sq, real.dof, f_syn)
    l_h = historical_losses(mu, h) if h is not None else torch.zeros_like(l_proto)
    total = l_proto
    if lambda1 != 0:
        total = total + lambda1 * l_sd
    if lambda2 != 0 and h is not None:
        total = total + lambda2 * l_h
    return total, {"proto": l_proto.detach(), "sd": l_sd.detach(), "h": l_h.detach(), "total": total.detach()}


# ----------------------------------------------------------------------------- one class (C = 1)
def class_mean(f: Tensor) -> Tensor:
    """Class prototype ``mu = mean_i f_i``.  ``(n, d) -> (d,)``."""
    _check_features(f, "f")
    return f[None].mean(1)[0]  # (d,): the same reduction as the batched losses


def centre(f: Tensor) -> Tensor:
    """Centred features ``Xc = f - mu``.  ``(n, d) -> (n, d)``."""
    return f - class_mean(f)


def class_covariance(f: Tensor) -> Tensor:
    """Unbiased class covariance ``Cov = Xc^T Xc / (n - 1)``.  ``(n, d) -> (d, d)``.

    Forms the full ``(d, d)`` matrix: for inspection and tests, not for the training loop.
    With ``n = 1`` it returns the zero matrix (see module docstring).
    """
    xc = centre(f)  # (n, d)
    return xc.T @ xc / _dof(f.shape[0])  # (d, d)


def _dof_tensor(n: int, like: Tensor) -> Tensor:
    return torch.full((1,), float(_dof(n)), dtype=like.dtype, device=like.device)


def covariance_sq_norm(xc: Tensor) -> Tensor:
    """``||Cov||_F^2`` from centred features ``xc`` (n, d), without forming ``(d, d)``."""
    _check_features(xc, "xc")
    return covariance_sq_norms(xc[None], _dof_tensor(xc.shape[0], xc))[0]


def precompute_real(f_real: Tensor) -> tuple[Tensor, Tensor]:
    """Cacheable real side of L_SD for one class: ``(xc_real (n, d), ||Cov_T||_F^2 (0-d))``."""
    xc_real = centre(f_real)  # (n, d)
    return xc_real, covariance_sq_norm(xc_real)


def real_side(f_real: Tensor, real: tuple[Tensor, Tensor] | None = None) -> RealSide:
    """The RealSide of one class (C = 1) from its features ``(n, d)`` (or a cached precompute_real)."""
    xc, norm_sq = real if real is not None else precompute_real(f_real)
    return RealSide(class_mean(f_real)[None], xc[None], norm_sq.reshape(1), _dof_tensor(xc.shape[0], xc))


def prototype_loss(f_real: Tensor, f_syn: Tensor) -> Tensor:
    """L_proto = ||mu_T - mu_S||^2 (sum of squares over d, not divided by d)."""
    _check_pair(f_real, f_syn)
    return prototype_losses(class_mean(f_real)[None], f_syn[None].mean(1))[0]


def covariance_loss_from_centred(xc_real: Tensor, norm_real_sq: Tensor, f_syn: Tensor) -> Tensor:
    """L_SD = ||Cov_T - Cov_S||_F^2 / d from a precomputed real side.

    ``xc_real`` (n, d) must be CENTRED real features and ``norm_real_sq`` their
    ``covariance_sq_norm`` (use :func:`precompute_real`); ``f_syn`` (m, d) raw synthetic features.
    """
    _check_pair(xc_real, f_syn)
    dof = _dof_tensor(xc_real.shape[0], f_syn)
    return covariance_losses(xc_real[None], norm_real_sq.reshape(1), dof, f_syn[None])[0]


def covariance_loss(f_real: Tensor, f_syn: Tensor) -> Tensor:
    """L_SD = ||Cov_T - Cov_S||_F^2 / d, via the Gram identity (no ``(d, d)`` matrix). Never NaN."""
    _check_pair(f_real, f_syn)
    return covariance_loss_from_centred(*precompute_real(f_real), f_syn)


def historical_loss(f_syn: Tensor, h: Tensor) -> Tensor:
    """L_h = ||mu_S - h||^2 / d, with ``h`` (d,) the memory-bank prototype (treated as constant)."""
    _check_features(f_syn, "f_syn")
    d = f_syn.shape[1]
    if h.shape != (d,):
        raise DsdmError(f"memory prototype h must have shape ({d},), got {tuple(h.shape)}; use MemoryBank.get(c)")
    return historical_losses(f_syn[None].mean(1), h[None])[0]


def dsdm_class_loss(f_real: Tensor, f_syn: Tensor, h: Tensor | None, lambda1: float, lambda2: float, *,
                    real: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-class DSDM loss: :func:`dsdm_losses` with C = 1.

    f_real ``(n, d)``, f_syn ``(m, d)`` of class c; h ``(d,)`` or None (L_h off); ``real`` an
    optional cached ``precompute_real(f_real)``. Returns ``(total 0-d, terms 0-d detached)``.
    """
    _check_pair(f_real, f_syn)
    if h is not None and h.shape != (f_syn.shape[1],):
        raise DsdmError(f"memory prototype h must have shape ({f_syn.shape[1]},), got {tuple(h.shape)}")
    total, terms = dsdm_losses(f_syn[None], real_side(f_real, real), None if h is None else h[None], lambda1, lambda2)
    return total[0], {k: v[0] for k, v in terms.items()}
