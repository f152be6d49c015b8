"""The distilled set: stored images in [0, 1] plus everything needed to use them later.

One artifact file holds the images (float16 in [0, 1]), labels, the tile grid of the
factor, the dataset name and normalisation, and the flat config that made it. It is
written atomically and read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsdm.io import atomic_torch_save, plain, safe_torch_load

FORMAT = "dsdm-synthetic-set"
VERSION = 1


def tile_grid(factor: int, kind: str) -> tuple[int, int]:
    """Images split into factor x factor tiles; spectrograms only along time (width)."""
    return (1, factor) if kind == "speech" else (factor, factor)


@dataclass
class SyntheticSet:
    images: torch.Tensor  # (C * ipc, ch, H, W) stored images in [0, 1]
    labels: torch.Tensor  # (C * ipc,) int64
    grid: tuple[int, int]  # tiles per stored image (rows, cols); (1, 1) = no factor
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict[str, Any] = field(default_factory=dict)  # flat config that made it

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def ipc(self) -> int:
        return len(self.labels) // max(self.num_classes, 1)

    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images: every tile up-sampled to full size, labels repeated."""
        from dsdm.augment import decode

        with torch.no_grad():
            return decode(self.images.float(), self.labels, self.grid)

    # --- artifact I/O -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "images": self.images.detach().clamp(0, 1).to(torch.float16).cpu(),
            "labels": self.labels.detach().to(torch.int64).cpu(),
            "grid": list(self.grid),
            "dataset": self.dataset,
            "mean": list(self.mean),
            "std": list(self.std),
            "config": plain(self.config),
        }
        return atomic_torch_save(payload, path)

    @classmethod
    def load(cls, path: str | Path) -> "SyntheticSet":
        payload = safe_torch_load(path, expect=FORMAT, what="distilled set",
                                  fix="pass a file written by `python -m dsdm distill`", max_version=VERSION)
        return cls(
            images=payload["images"].float(),
            labels=payload["labels"],
            grid=tuple(payload["grid"]),
            dataset=payload["dataset"],
            mean=tuple(payload["mean"]),
            std=tuple(payload["std"]),
            config=dict(payload["config"]),
        )


