"""Pictures of distilled sets: the class-by-class grid (the paper's Figure 8)."""
from __future__ import annotations

from pathlib import Path

import torch

from dsdm.synthetic import SyntheticSet


def save_grid(synset: SyntheticSet, path: str | Path, decoded: bool = True,
              class_names: list[str] | None = None, cell_px: int = 64, dpi: int = 100) -> Path:
    """One row per class: the decoded images the classifier trains on (or, `decoded=False`, the stored
    images with their l x l tiles), each enlarged by an integer factor with nearest-neighbour pixels to
    at least `cell_px` pixels, and the figure sized so that no pixel is resampled again."""
    # imported here, not at the top: torchvision brings torch._dynamo (~1.2 s a process), which the
    # processes that import this module without drawing (a search's driver, the CLIs) never need
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    images, labels = synset.decoded() if decoded else (synset.images, synset.labels)
    order = torch.argsort(labels, stable=True)
    images, labels = images[order].clamp(0, 1), labels[order]
    scale = max(1, -(-cell_px // images.shape[-1]))  # ceil: an 8x8 digit becomes 64x64
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    per_row = int((labels == labels[0]).sum())
    grid = make_grid(images, nrow=per_row, padding=2 * scale, pad_value=1.0)  # (3, H', W')
    rows = len(labels) // per_row
    cell = grid.shape[1] / rows
    margin = 0.8  # inches for the class names and the title
    fig = plt.figure(figsize=(grid.shape[2] / dpi + margin, grid.shape[1] / dpi + margin), dpi=dpi)
    ax = fig.add_axes((margin * 0.7 / (grid.shape[2] / dpi + margin), 0.1 * margin / (grid.shape[1] / dpi + margin),
                       grid.shape[2] / dpi / (grid.shape[2] / dpi + margin), grid.shape[1] / dpi / (grid.shape[1] / dpi + margin)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    names = class_names or [str(int(c)) for c in labels[::per_row]]
    ax.set_yticks([cell * (i + 0.5) for i in range(rows)], names)
    ax.set_xticks([])
    what = (f"decoded images ({synset.grid[0] * synset.grid[1]} per stored image, as trained on)" if decoded
            else f"stored images, tiles {synset.grid[0]}x{synset.grid[1]}")
    ax.set_title(f"{synset.dataset}: {synset.ipc} per class, {what}, x{scale}", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
