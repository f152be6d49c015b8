"""DSA (gradients, Siamese sharing, determinism), CutMix, and the factor decode/encode."""
import math

import pytest
import torch
import torch.nn.functional as F

from dsdm.augment import (EVAL_OPS, MATCH_OPS, AugParams, Op, apply_aug, augment, cutmix, decode,
                          encode_tiles, mixed_cross_entropy, normalize, ops_for, sample_aug_params)
from dsdm.errors import DsdmError


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


ALL_OPS = tuple(Op)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def draw(ops, n, seed=0):
    return sample_aug_params(ops, n, gen(seed), one_geometric=False)


# --- DSA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", list(Op))
def test_gradient_flows_through_each_op(op):
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    params = draw([op], 4)
    assert params.ops == (op,)
    out = apply_aug(x, params)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradient_through_normalise_and_all_ops():
    x = torch.rand(4, 3, 16, 16, requires_grad=True)
    out = augment(x, (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), draw(ALL_OPS, 1))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_siamese_draw_is_one_transform_for_any_batch():
    params = draw(ALL_OPS, 1, seed=1)
    a, b = torch.rand(3, 3, 16, 16), torch.rand(5, 3, 16, 16)
    assert torch.equal(apply_aug(a, params), apply_aug(a.clone(), params))
    # the same draw is the same transform whichever batch an image sits in
    both = apply_aug(torch.cat([a, b]), params)
    assert torch.allclose(both, torch.cat([apply_aug(a, params), apply_aug(b, params)]), atol=1e-6)
    copies = apply_aug(a[:1].expand(6, -1, -1, -1), params)
    assert torch.allclose(copies, copies[:1].expand_as(copies), atol=1e-6)


@pytest.mark.parametrize("op", list(Op))
def test_per_sample_draws_differ(op):
    x = torch.rand(1, 3, 16, 16).expand(16, -1, -1, -1)
    out = apply_aug(x, draw([op], 16, seed=2))
    distinct = {tuple(o.flatten()[:300].tolist()) for o in out}
    assert len(distinct) > 1


def test_same_seed_same_params():
    p, q, r = draw(ALL_OPS, 8, seed=5), draw(ALL_OPS, 8, seed=5), draw(ALL_OPS, 8, seed=6)
    for name in ("flip", "brightness", "saturation", "contrast", "crop", "scale", "rotate", "cutout"):
        assert torch.equal(getattr(p, name), getattr(q, name))
    assert not torch.equal(p.brightness, r.brightness)
    x = torch.rand(8, 3, 16, 16)
    assert torch.equal(apply_aug(x, p), apply_aug(x, q))


def test_param_ranges():
    p = draw(ALL_OPS, 4096)
    assert p.brightness.abs().max() <= 0.5
    assert 0 <= p.saturation.min() and p.saturation.max() < 2.0
    assert 0.5 <= p.contrast.min() and p.contrast.max() < 1.5
    assert 1 / 1.2 <= p.scale.min() and p.scale.max() < 1.2
    assert p.rotate.abs().max() <= math.radians(15)
    assert 0.4 < p.flip.float().mean() < 0.6


def test_one_geometric_keeps_a_single_geometric_op():
    for seed in range(10):
        ops = sample_aug_params(EVAL_OPS, 2, gen(seed)).ops
        assert Op.FLIP in ops and Op.COLOR in ops
        assert sum(o in (Op.CROP, Op.SCALE, Op.ROTATE) for o in ops) == 1
    assert sample_aug_params(MATCH_OPS, 1, gen()).ops == (Op.COLOR, Op.CROP, Op.CUTOUT)


def test_crop_identity_and_shift():
    x = torch.rand(2, 1, 16, 16)
    centre = AugParams(n=1, crop=torch.tensor([[0.5, 0.5]]))  # shift 0
    assert torch.equal(apply_aug(x, centre), x)
    down = AugParams(n=1, crop=torch.tensor([[0.0, 0.5]]))  # rows shifted by -pad = -2
    out = apply_aug(x, down)
    assert torch.equal(out[:, :, 2:], x[:, :, :-2]) and (out[:, :, :2] == 0).all()


def test_cutout_zeroes_a_half_size_box():
    x = torch.ones(1, 1, 16, 16)
    out = apply_aug(x, AugParams(n=1, cutout=torch.tensor([[0.5, 0.5]])))  # centred box
    assert (out == 0).sum() == 8 * 8


def test_draw_size_must_match_batch():
    with pytest.raises(DsdmError, match="n=3"):
        apply_aug(torch.rand(4, 3, 8, 8), draw(MATCH_OPS, 3))


def test_empty_ops_and_none_params_only_normalise():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(apply_aug(x, sample_aug_params((), 2, gen())), x)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.5, 0.25)
    assert torch.allclose(augment(x, mean, std, None), normalize(x, mean, std))
    assert torch.allclose(normalize(x, mean, std)[:, 2], (x[:, 2] - 0.3) / 0.25)


def test_ops_for_drops_flip_for_digits_and_speech():
    for name in ("mnist", "svhn", "digits", "speechcommands", "MNIST"):
        assert Op.FLIP not in ops_for(name, EVAL_OPS)
    assert ops_for("cifar10", EVAL_OPS) == EVAL_OPS
    assert ops_for("mnist", ["color", "crop"]) == (Op.COLOR, Op.CROP)


# --- CutMix -------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_cutmix_box_area_matches_lam(beta):
    g = gen(7)
    for _ in range(20):
        x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 12, 10).contiguous()  # image i is all i
        y = torch.arange(8)
        mixed, ya, yb, lam = cutmix(x, y, g, beta=beta)
        assert 0.0 <= lam <= 1.0 and torch.equal(ya, y)
        for i in range(8):
            pasted = (mixed[i, 0] != x[i, 0]).float().mean().item()
            assert (mixed[i, 0][mixed[i, 0] != x[i, 0]] == yb[i]).all()  # pasted from image y_b
            if yb[i] != i:
                assert pasted == pytest.approx(1.0 - lam)


def test_mixed_cross_entropy_weights():
    logits, ya, yb = torch.randn(5, 4), torch.randint(4, (5,)), torch.randint(4, (5,))
    assert torch.allclose(mixed_cross_entropy(logits, ya, ya, 0.3), F.cross_entropy(logits, ya))
    expected = 0.3 * F.cross_entropy(logits, ya) + 0.7 * F.cross_entropy(logits, yb)
    assert torch.allclose(mixed_cross_entropy(logits, ya, yb, 0.3), expected)


# --- factor decode / encode ---------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(2, 2), (1, 2), (3, 3)])
def test_decode_equals_independent_tile_upsampling(grid):
    gh, gw = grid
    images, labels = torch.rand(3, 2, 12, 8), torch.tensor([4, 0, 2])
    out, out_labels = decode(images, labels, grid)
    assert out.shape == (3 * gh * gw, 2, 12, 8)
    assert torch.equal(out_labels, labels.repeat_interleave(gh * gw))
    th, tw = math.ceil(12 / gh), math.ceil(8 / gw)
    padded = F.pad(images, (0, gw * tw - 8, 0, gh * th - 12), value=0.5)
    k = 0
    for i in range(3):
        for r in range(gh):
            for c in range(gw):
                tile = padded[i:i + 1, :, r * th:(r + 1) * th, c * tw:(c + 1) * tw]
                ref = F.interpolate(tile, size=(12, 8), mode="bilinear", align_corners=False)[0]
                assert torch.equal(out[k], ref), (i, r, c)
                k += 1


def test_decode_identity_and_gradient():
    images, labels = torch.rand(2, 3, 8, 8, requires_grad=True), torch.tensor([0, 1])
    same, same_labels = decode(images, labels, (1, 1))
    assert same is images and same_labels is labels
    out, _ = decode(images, labels, (2, 2))
    out.sum().backward()
    assert torch.isfinite(images.grad).all() and (images.grad > 0).all()


def test_grid_1x2_splits_width_only():
    rows = torch.linspace(0, 1, 8).view(1, 1, 8, 1)
    image = torch.cat([rows.expand(1, 1, 8, 4), 2 + rows.expand(1, 1, 8, 4)], dim=3)  # (1, 1, 8, 8)
    out, labels = decode(image, torch.tensor([3]), (1, 2))
    assert out.shape == (2, 1, 8, 8) and labels.tolist() == [3, 3]
    assert torch.allclose(out[0], rows.expand(1, 1, 8, 8)[0], atol=1e-6)  # left half, full height
    assert torch.allclose(out[1], 2 + rows.expand(1, 1, 8, 8)[0], atol=1e-6)


def test_encode_tiles_places_downscaled_images_in_decode_order():
    real = torch.rand(8, 3, 16, 16)  # n=2 stored images of 2x2 tiles
    stored = encode_tiles(real, (2, 2))
    assert stored.shape == (2, 3, 16, 16)
    small = F.interpolate(real, size=(8, 8), mode="area")
    assert torch.allclose(stored[0, :, :8, :8], small[0]) and torch.allclose(stored[0, :, :8, 8:], small[1])
    assert torch.allclose(stored[0, :, 8:, :8], small[2]) and torch.allclose(stored[1, :, 8:, 8:], small[7])
    assert encode_tiles(real, (1, 2)).shape == (4, 3, 16, 16)
    with pytest.raises(DsdmError, match="multiple of 4"):
        encode_tiles(real[:6], (2, 2))


@pytest.mark.parametrize("grid", [(2, 2), (1, 2)])
def test_decode_encode_roundtrip_at_low_resolution(grid):
    gh, gw = grid
    smooth = F.interpolate(torch.rand(8, 3, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    out, _ = decode(encode_tiles(smooth, grid), torch.zeros(8 // (gh * gw), dtype=torch.long), grid)
    assert out.shape == smooth.shape
    err = (out - smooth).abs().mean()
    assert err < 0.05
    assert err < 0.3 * (out - smooth.roll(1, dims=0)).abs().mean()  # each decoded image is *its* source
