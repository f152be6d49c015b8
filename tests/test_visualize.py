"""The image grid: decoded images at a readable size by default, the stored tiles on request."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dsdm.config import make_config
from dsdm.synthetic import SyntheticSet
from dsdm.visualize import save_grid


def factor2_digits(ipc=3, classes=4) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(classes * ipc, 1, 8, 8, generator=g)
    return SyntheticSet(images, torch.arange(classes).repeat_interleave(ipc), (2, 2), "digits", (0.3054,), (0.3761,),
                        make_config("smoke", {"distill.ipc": ipc}).plain())


def test_grid_shows_decoded_images_enlarged_with_whole_pixels(tmp_path):
    synset = factor2_digits()
    png = np.asarray(Image.open(save_grid(synset, tmp_path / "g.png")).convert("L"))
    per_row = 3 * 4  # ipc x l^2 decoded images per class
    assert png.shape[1] >= per_row * 64 and png.shape[0] >= 4 * 64  # each 8x8 image drawn at least 64 px
    # nearest-neighbour: the first decoded image's top-left source pixel is an 8x8 block of one value
    x, _ = synset.decoded()
    value = float(x[0, 0, 0, 0].clamp(0, 1)) * 255
    rows, cols = np.nonzero(np.abs(png.astype(float) - value) <= 1)
    assert len(rows) >= 64


def test_grid_of_stored_tiles_on_request(tmp_path):
    synset = factor2_digits()
    decoded = Image.open(save_grid(synset, tmp_path / "d.png")).size
    stored = Image.open(save_grid(synset, tmp_path / "s.png", decoded=False)).size
    assert stored[0] >= 3 * 64 and stored[0] < decoded[0]
