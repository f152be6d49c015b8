"""Differentiable Siamese augmentation (DSA), CutMix, and the factor decode ("partition and expand").

Sampling is separate from applying, so one draw can be applied to several batches
(Siamese: real and synthetic images of a class see the same transform) and cached:

    params = sample_aug_params(MATCH_OPS, 1, generator)  # n=1: one draw for a whole batch
    real = augment(x_real, mean, std, params)            # (N, C, H, W), normalised + augmented
    syn = augment(x_syn, mean, std, params)              # same transform, differentiable in x_syn

With n = batch size every sample gets its own draw (training evaluation nets). Each op's
parameters are stored once and mapped to pixels at apply time, so a draw does not depend
on the image size. DSA constants are those of the DSA/DM code.

Composition follows the IDC code the DSDM reference builds on: flip, colour, then the
geometric ops, then cutout last. With ``one_geometric=True`` (the IDC default) a draw keeps
one of the requested crop/scale/rotate at random instead of chaining all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dsdm.errors import DsdmError

# DSA parameters (DSA/DM code)
FLIP_P = 0.5
SCALE_RATIO = 1.2
ROTATE_DEG = 15.0
CROP_PAD_RATIO = 0.125
CUTOUT_RATIO = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


class Op(str, Enum):
    """Augmentation ops; declaration order is the order they are applied in."""
    FLIP = "flip"
    COLOR = "color"  # brightness + saturation + contrast, as in DSA
    CROP = "crop"
    SCALE = "scale"
    ROTATE = "rotate"
    CUTOUT = "cutout"


GEOMETRIC = (Op.CROP, Op.SCALE, Op.ROTATE)
MATCH_OPS = (Op.COLOR, Op.CROP, Op.CUTOUT)  # distillation matching
EVAL_OPS = (Op.COLOR, Op.CROP, Op.FLIP, Op.SCALE, Op.ROTATE)  # training evaluation nets
NO_FLIP_DATASETS = frozenset({"mnist", "svhn", "digits", "speechcommands"})


def ops_for(dataset_name: str, ops: Iterable[Op | str]) -> tuple[Op, ...]:
    """`ops` minus FLIP where mirroring changes meaning (digits, and time in spectrograms)."""
    key = dataset_name.lower().replace("-", "").replace("_", "")
    ops = tuple(Op(o) for o in ops)
    return tuple(o for o in ops if o is not Op.FLIP) if key in NO_FLIP_DATASETS else ops


_FIELD = {op: op.value for op in Op} | {Op.COLOR: "brightness"}  # the field that marks an op on


@dataclass
class AugParams:
    """One draw. Each field is None (op off) or a tensor with leading dim n (1 = shared)."""
    n: int
    flip: torch.Tensor | None = None  # (n,) bool: mirror along width
    brightness: torch.Tensor | None = None  # (n,) additive shift in [-0.5, 0.5) * BRIGHTNESS
    saturation: torch.Tensor | None = None  # (n,) factor in [0, SATURATION)
    contrast: torch.Tensor | None = None  # (n,) factor in [CONTRAST, CONTRAST + 1)
    crop: torch.Tensor | None = None  # (n, 2) uniforms (row, col) -> integer shift at apply time
    scale: torch.Tensor | None = None  # (n, 2) (sx, sy) in [1/SCALE_RATIO, SCALE_RATIO)
    rotate: torch.Tensor | None = None  # (n,) angle in radians, |angle| <= ROTATE_DEG
    cutout: torch.Tensor | None = None  # (n, 2) uniforms (row, col) -> box centre at apply time

    @property
    def ops(self) -> tuple[Op, ...]:
        """The ops this draw applies, in application order."""
        return tuple(op for op in Op if getattr(self, _FIELD[op]) is not None)

    def to(self, device: torch.device | str) -> "AugParams":
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if f.name != "n" and getattr(self, f.name) is not None}
        return replace(self, **moved)


def sample_aug_params(ops: Iterable[Op | str], n: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None, one_geometric: bool = True) -> AugParams:
    """Draw parameters for `ops`; n=1 gives one transform for a whole batch (Siamese).

    Draws happen on the generator's device in a fixed order, so a seed fixes the draw.
    """
    if n < 1:
        raise DsdmError(f"an augmentation draw needs n >= 1 (1 = shared by the batch), got n={n}")
    ops = {Op(o) for o in ops}
    gen_device = generator.device if generator is not None else torch.device("cpu")

    def u(*shape: int) -> torch.Tensor:  # uniforms in [0, 1)
        return torch.rand(n, *shape, generator=generator, device=gen_device)

    geometric = [op for op in GEOMETRIC if op in ops]
    if one_geometric and len(geometric) > 1:
        keep = geometric[int(torch.randint(len(geometric), (1,), generator=generator, device=gen_device))]
        ops -= set(geometric) - {keep}
    p = AugParams(n=n)
    if Op.FLIP in ops:
        p.flip = u() < FLIP_P
    if Op.COLOR in ops:
        p.brightness = (u() - 0.5) * BRIGHTNESS
        p.saturation = u() * SATURATION
        p.contrast = u() + CONTRAST
    if Op.CROP in ops:
        p.crop = u(2)
    if Op.SCALE in ops:
        p.scale = u(2) * (SCALE_RATIO - 1.0 / SCALE_RATIO) + 1.0 / SCALE_RATIO
    if Op.ROTATE in ops:
        p.rotate = (u() - 0.5) * 2 * math.radians(ROTATE_DEG)
    if Op.CUTOUT in ops:
        p.cutout = u(2)
    return p.to(device) if device is not None else p


# --- applying a draw --------------------------------------------------------------------------

def _col(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)  # (n,) -> (n, 1, 1, 1) to broadcast over (N, C, H, W)


def _color(x: torch.Tensor, p: AugParams) -> torch.Tensor:
    """DSA colour: brightness shift, saturation around the pixel's channel mean,
    contrast around the image mean (1-channel images: saturation is a no-op)."""
    x = x + _col(p.brightness).to(x.dtype)
    gray = x.mean(1, keepdim=True)  # (N, 1, H, W)
    x = (x - gray) * _col(p.saturation).to(x.dtype) + gray
    mean = x.mean((1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return (x - mean) * _col(p.contrast).to(x.dtype) + mean


def _crop(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Translate by an integer shift in [-pad, pad] with zero fill (DSA's pad-and-crop)."""
    N, C, H, W = x.shape
    ph, pw = int(H * CROP_PAD_RATIO + 0.5), int(W * CROP_PAD_RATIO + 0.5)
    dy = (u[:, 0] * (2 * ph + 1)).long() - ph  # (n,)
    dx = (u[:, 1] * (2 * pw + 1)).long() - pw
    rows = (torch.arange(H, device=x.device) + ph + dy[:, None]).expand(N, H)  # (N, H) in padded coords
    cols = (torch.arange(W, device=x.device) + pw + dx[:, None]).expand(N, W)  # (N, W)
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (N, H+2ph, W+2pw, C)
    b = torch.arange(N, device=x.device)[:, None, None]
    return xp[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, C, H, W)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros_like(s[:, 0])
    theta = torch.stack([torch.stack([s[:, 0], zero, zero], 1),
                         torch.stack([zero, s[:, 1], zero], 1)], 1)  # (n, 2, 3)
    return _affine(x, theta)


def _rotate(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                         torch.stack([sin, cos, zero], 1)], 1)  # (n, 2, 3)
    return _affine(x, theta)


def _cutout(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Zero a (ratio*H) x (ratio*W) box; a multiplicative mask, so grads pass elsewhere."""
    _, _, H, W = x.shape
    ch, cw = int(H * CUTOUT_RATIO + 0.5), int(W * CUTOUT_RATIO + 0.5)
    top = (u[:, 0] * (H + 1 - ch % 2)).long() - ch // 2  # (n,) box centre range as in DSA
    left = (u[:, 1] * (W + 1 - cw % 2)).long() - cw // 2
    r, c = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    in_r = (r >= top[:, None]) & (r < top[:, None] + ch)  # (n, H)
    in_c = (c >= left[:, None]) & (c < left[:, None] + cw)  # (n, W)
    mask = 1.0 - (in_r[:, :, None] & in_c[:, None, :]).to(x.dtype)  # (n, H, W)
    return x * mask[:, None]


def apply_aug(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """Apply one draw to x (N, C, H, W); differentiable in x. params.n must be 1 or N."""
    if params.n not in (1, x.shape[0]):
        raise DsdmError(f"augmentation draw has n={params.n} but the batch has {x.shape[0]} images; "
                        "sample with n=1 (shared) or n=batch size")
    p = params.to(x.device)
    if p.flip is not None:
        x = torch.where(_col(p.flip), x.flip(3), x)
    if p.brightness is not None:
        x = _color(x, p)
    if p.crop is not None:
        x = _crop(x, p.crop)
    if p.scale is not None:
        x = _scale(x, p.scale)
    if p.rotate is not None:
        x = _rotate(x, p.rotate)
    if p.cutout is not None:
        x = _cutout(x, p.cutout)
    return x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel; x in [0, 1] (N, C, H, W)."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def augment(x01: torch.Tensor, mean: Sequence[float], std: Sequence[float],
            params: AugParams | None) -> torch.Tensor:
    """normalise -> DSA, identically for real and synthetic images (as the DM code does)."""
    x = normalize(x01, mean, std)
    return x if params is None else apply_aug(x, params)


# --- CutMix -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CutMixDraw:
    """One CutMix draw for a batch: the pasted box [y0:y1, x0:x1] and the partner permutation."""
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1), already clipped to the image
    perm: torch.Tensor  # (N,) image i receives the box of image perm[i]
    area: int  # H * W

    @property
    def lam(self) -> float:
        """Fraction of each image still its own (the clipped box's true area)."""
        return 1.0 - (self.box[1] - self.box[0]) * (self.box[3] - self.box[2]) / self.area


def sample_cutmix(n: int, size: tuple[int, int], generator: torch.Generator | None = None,
                  beta: float = 1.0) -> CutMixDraw:
    """The draws of `cutmix` (same generator calls, same order), without touching images."""
    H, W = size
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if beta == 1.0:  # Beta(1, 1) is uniform; torch has no seeded Beta sampler
        lam = float(torch.rand((), generator=generator, device=gen_device))
    else:
        seed = int(torch.randint(2**62, (1,), generator=generator, device=gen_device))
        lam = float(np.random.default_rng(seed).beta(beta, beta))
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(H * cut), int(W * cut)
    cy = int(torch.randint(H, (1,), generator=generator, device=gen_device))
    cx = int(torch.randint(W, (1,), generator=generator, device=gen_device))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
    perm = torch.randperm(n, generator=generator, device=gen_device)
    return CutMixDraw((y0, y1, x0, x1), perm, H * W)


def apply_cutmix(x: torch.Tensor, y: torch.Tensor, draw: CutMixDraw):
    """Paste draw's box from the permuted batch; returns (x_mixed, y_a, y_b, lam) as `cutmix`."""
    y0, y1, x0, x1 = draw.box
    perm = draw.perm.to(x.device)
    mixed = x.clone()
    mixed[:, :, y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return mixed, y, y[perm], draw.lam


def cutmix(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None, beta: float = 1.0):
    """Paste a random box from a shuffled batch (CutMix/IDC). Returns (x_mixed, y_a, y_b, lam):
    lam is the fraction of each image still its own, so the loss weights are lam / 1 - lam."""
    return apply_cutmix(x, y, sample_cutmix(x.shape[0], tuple(x.shape[2:]), generator, beta))


def mixed_cross_entropy(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * F.cross_entropy(logits, y_a) + (1.0 - lam) * F.cross_entropy(logits, y_b)


# --- factor: partition and expand (IDC) -------------------------------------------------------

def _tile_size(size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(size[0] / grid[0]), math.ceil(size[1] / grid[1])


def decode(images: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int]):
    """Cut each stored image (n, C, H, W) into gh x gw tiles and upsample each to H x W.

    Order: stored image 0's tiles row-major, then image 1's, ...; labels repeat per tile.
    When H or W is not divisible, the image is padded with 0.5 first (as IDC) so every
    tile is ceil(H/gh) x ceil(W/gw). Differentiable; grid (1, 1) returns the inputs.
    """
    gh, gw = grid
    if (gh, gw) == (1, 1):
        return images, labels
    n, C, H, W = images.shape
    th, tw = _tile_size((H, W), grid)
    x = F.pad(images, (0, gw * tw - W, 0, gh * th - H), value=0.5)  # (n, C, gh*th, gw*tw)
    tiles = x.view(n, C, gh, th, gw, tw).permute(0, 2, 4, 1, 3, 5)  # (n, gh, gw, C, th, tw)
    tiles = tiles.reshape(n * gh * gw, C, th, tw)
    out = F.interpolate(tiles, size=(H, W), mode="bilinear", align_corners=False)  # (n*gh*gw, C, H, W)
    return out, labels.repeat_interleave(gh * gw)


def encode_tiles(real: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Initialisation: (n*gh*gw, C, H, W) real images -> (n, C, H, W) stored images whose
    tiles are those images area-downscaled, in decode's order (decode inverts it, blurred)."""
    gh, gw = grid
    N, C, H, W = real.shape
    if N % (gh * gw):
        raise DsdmError(f"encode_tiles needs a multiple of {gh * gw} images for grid {grid}, got {N}")
    if (gh, gw) == (1, 1):
        return real.clone()
    th, tw = _tile_size((H, W), grid)
    small = F.interpolate(real, size=(th, tw), mode="area")  # (N, C, th, tw)
    canvas = small.view(N // (gh * gw), gh, gw, C, th, tw).permute(0, 3, 1, 4, 2, 5)  # (n, C, gh, th, gw, tw)
    canvas = canvas.reshape(-1, C, gh * th, gw * tw)
    return canvas[:, :, :H, :W].contiguous()  # drop the padding decode would add back


def nchw(x: torch.Tensor) -> torch.Tensor:
    """x with exactly the NCHW strides (C*H*W, H*W, W, 1). DSA's crop returns channels_last
    strides; for 1-channel images those are also "contiguous", so .contiguous() keeps them, and
    a conv then still picks channels_last and hands GroupNorm a channels_last tensor."""
    if x.dim() != 4:
        return x.contiguous()
    n, c, h, w = x.shape
    if x.stride() == (c * h * w, h * w, w, 1):
        return x
    return x.clone(memory_format=torch.contiguous_format)
