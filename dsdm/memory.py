"""Memory bank of historical synthetic prototypes (the ``h_c`` of L_h).

After each distillation iteration the synthetic prototype of every class,
``p_c = mean g(aug(decode(S_c)))`` (computed without grad), is folded into an exponential
moving average::

    h_c <- p_c                               at the first update of class c
    h_c <- alpha * h_c + (1 - alpha) * p_c   afterwards (alpha = 0.99)

One bank per class, shared across zoo models. The bank enters the loss (L_h) only once
``iteration >= warmup`` (2000 in the reference code); see :meth:`MemoryBank.active`.

:func:`ema_update` is the pure functional core; :class:`MemoryBank` is a thin stateful
wrapper that checkpoints through ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dsdm.errors import DsdmError

__all__ = ["ema_update", "MemoryBank"]


def ema_update(h: Tensor, p: Tensor, alpha: float, initialised: Tensor | bool) -> Tensor:
    """Return the new prototype(s): ``p`` where not initialised, else ``alpha*h + (1-alpha)*p``.

    Args:
        h: ``(d,)`` or ``(C, d)`` current bank value(s).
        p: same shape as ``h``, new prototype(s); detached and cast to ``h``'s dtype/device.
        alpha: EMA decay in [0, 1].
        initialised: bool, 0-d bool tensor, or ``(C,)`` bool tensor (per row of ``h``).

    Pure: neither input is modified; the result carries no autograd graph.
    """
    if h.shape != p.shape:
        raise DsdmError(f"prototype shape {tuple(p.shape)} does not match bank shape {tuple(h.shape)}")
    with torch.no_grad():
        p = p.detach().to(dtype=h.dtype, device=h.device)
        blended = alpha * h + (1.0 - alpha) * p
        init = torch.as_tensor(initialised, dtype=torch.bool, device=h.device)
        if init.dim() == 1:
            init = init.unsqueeze(-1)  # (C, 1): broadcast over d
        return torch.where(init, blended, p).detach()


class MemoryBank:
    """Per-class EMA of synthetic prototypes.

    Attributes:
        h: ``(C, d)`` bank values (zeros for classes never updated).
        initialised: ``(C,)`` bool, whether class c has received its first update.
        alpha: EMA decay. warmup: first iteration at which L_h is used.
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int,
        alpha: float = 0.99,
        warmup: int = 2000,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_classes < 1 or feature_dim < 1:
            raise DsdmError(f"MemoryBank needs num_classes >= 1 and feature_dim >= 1, got {num_classes}, {feature_dim}")
        if not 0.0 <= alpha <= 1.0:
            raise DsdmError(f"memory alpha must be in [0, 1], got {alpha}; set distill.alpha to e.g. 0.99")
        if warmup < 0:
            raise DsdmError(f"memory warmup must be >= 0, got {warmup}")
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.alpha = float(alpha)
        self.warmup = int(warmup)
        self.h = torch.zeros(num_classes, feature_dim, device=device, dtype=dtype)  # (C, d)
        self.initialised = torch.zeros(num_classes, dtype=torch.bool, device=device)  # (C,)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.h.device

    @property
    def dtype(self) -> torch.dtype:
        return self.h.dtype

    def _check_class(self, c: int) -> int:
        c = int(c)
        if not 0 <= c < self.num_classes:
            raise DsdmError(f"class index {c} out of range for a memory bank of {self.num_classes} classes")
        return c

    # ------------------------------------------------------------------ updates
    def update(self, c: int, prototype: Tensor) -> None:
        """Fold the ``(d,)`` prototype of class ``c`` into the bank (no grad, detached copy)."""
        c = self._check_class(c)
        if prototype.shape != (self.feature_dim,):
            raise DsdmError(f"prototype must have shape ({self.feature_dim},), got {tuple(prototype.shape)}")
        with torch.no_grad():
            row = ema_update(self.h[c], prototype, self.alpha, self.initialised[c])  # (d,)
            h = self.h.clone()  # out of place: tensors handed out by get() never change
            h[c] = row
            init = self.initialised.clone()
            init[c] = True
        self.h, self.initialised = h, init

    def update_all(self, prototypes: Tensor) -> None:
        """Fold ``(C, d)`` prototypes (one per class) into the bank in one vectorised step."""
        if prototypes.shape != self.h.shape:
            raise DsdmError(f"prototypes must have shape {tuple(self.h.shape)}, got {tuple(prototypes.shape)}")
        self.h = ema_update(self.h, prototypes, self.alpha, self.initialised)
        self.initialised = torch.ones_like(self.initialised)

    # ------------------------------------------------------------------ queries
    def get(self, c: int) -> Tensor:
        """``h_c`` (d,), no grad. Raises DsdmError if class ``c`` was never updated."""
        c = self._check_class(c)
        if not bool(self.initialised[c]):
            raise DsdmError(f"memory bank class {c} has no prototype yet; call update() before get()")
        return self.h[c]

    def active(self, iteration: int) -> bool:
        """Whether L_h is used at ``iteration``: ``iteration >= warmup``."""
        return iteration >= self.warmup

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: cloned tensors plus hyper-parameters."""
        return {
            "h": self.h.detach().clone(),
            "initialised": self.initialised.clone(),
            "alpha": self.alpha,
            "warmup": self.warmup,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (bit-exact; keeps the saved dtype, moves to this bank's device)."""
        h, init = state["h"], state["initialised"]
        if tuple(h.shape) != (self.num_classes, self.feature_dim) or tuple(init.shape) != (self.num_classes,):
            raise DsdmError(
                f"memory bank checkpoint has shape {tuple(h.shape)}, expected ({self.num_classes}, {self.feature_dim}); "
                "use the same dataset and model as the checkpoint"
            )
        self.h = h.detach().clone().to(self.device)
        self.initialised = init.clone().to(device=self.device, dtype=torch.bool)
        self.alpha = float(state["alpha"])
        self.warmup = int(state["warmup"])

    def to(self, device: torch.device | str) -> "MemoryBank":
        """Move the bank to ``device`` in place; returns self."""
        self.h = self.h.to(device)
        self.initialised = self.initialised.to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"MemoryBank(num_classes={self.num_classes}, feature_dim={self.feature_dim}, alpha={self.alpha}, "
            f"warmup={self.warmup}, initialised={int(self.initialised.sum())}/{self.num_classes}, device={self.device})"
        )
