"""Pictures of distilled sets: the class-by-class grid (the paper's Figure 8)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from dsdm.synthetic import SyntheticSet  # noqa: E402


def save_grid(synset: SyntheticSet, path: str | Path, decoded: bool = False,
              class_names: list[str] | None = None) -> Path:
    """One row per class; stored images (or their decoded tiles) side by side."""
    images, labels = synset.decoded() if decoded else (synset.images, synset.labels)
    order = torch.argsort(labels, stable=True)
    images, labels = images[order].clamp(0, 1), labels[order]
    per_row = int((labels == labels[0]).sum())
    grid = make_grid(images, nrow=per_row, padding=2, pad_value=1.0)  # (3, H', W')
    rows = len(labels) // per_row
    cell = grid.shape[1] / rows
    fig, ax = plt.subplots(figsize=(max(4, per_row * 0.6), max(3, rows * 0.6)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    names = class_names or [str(int(c)) for c in labels[::per_row]]
    ax.set_yticks([cell * (i + 0.5) for i in range(rows)], names)
    ax.set_xticks([])
    ax.set_title(f"{synset.dataset}: {synset.ipc} per class, tiles {synset.grid[0]}x{synset.grid[1]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
