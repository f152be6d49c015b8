"""Coreset baselines on digits in a zoo model's embedding: counts, provenance, selection quality."""
from __future__ import annotations

import pytest
import torch

from dsdm.coreset import embed_all, select_coreset
from dsdm.errors import DsdmError

IPC = 5


@pytest.fixture(scope="module")
def net(tiny_zoo):
    return tiny_zoo.model(0, 2)


@pytest.fixture(scope="module")
def class_features(digits, net):
    return [embed_all(net, digits.class_images(c), digits.mean, digits.std) for c in range(digits.num_classes)]


@pytest.fixture(scope="module")
def sets(digits, net):
    return {m: select_coreset(m, digits, IPC, seed=0, model=net) for m in ("random", "herding", "kcenter")}


def train_rows(ds, images: torch.Tensor) -> torch.Tensor:
    """Index of the training image equal to each selected image (-1 if none)."""
    flat = ds.train_x.flatten(1)
    w = torch.rand(flat.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = flat.double() @ w  # a fingerprint; candidates are then compared exactly
    out = []
    for img in images.flatten(1):
        cand = torch.nonzero((keys - img.double() @ w).abs() < 1e-6).flatten()
        hits = [int(i) for i in cand if torch.equal(flat[i], img)]
        out.append(hits[0] if hits else -1)
    return torch.tensor(out)


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_counts_labels_and_real_images(digits, sets, method):
    s = sets[method]
    assert s.images.shape == (IPC * 10, 1, 8, 8) and s.grid == (1, 1)
    assert s.labels.bincount(minlength=10).tolist() == [IPC] * 10
    rows = train_rows(digits, s.images)
    assert (rows >= 0).all(), "every selected image is a real training image"
    assert torch.equal(digits.train_y[rows], s.labels), "and carries its own label"
    assert len(rows.unique()) == len(rows), "no image is picked twice (digits train has no duplicates)"
    assert s.dataset == "digits" and s.mean == digits.mean


def mean_gap(feats: torch.Tensor, pick: torch.Tensor) -> float:
    return float((feats[pick].mean(0) - feats.mean(0)).norm())


def min_pairwise(feats: torch.Tensor) -> float:
    d = torch.cdist(feats, feats)
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def picks_per_class(digits, s, feats):
    """Positions (within each class's feature matrix) of the selected images."""
    out = []
    for c in range(10):
        x_c = digits.class_images(c).flatten(1)
        sel = s.images[s.labels == c].flatten(1)
        out.append(torch.tensor([int(torch.nonzero((x_c == img).all(1)).flatten()[0]) for img in sel]))
    return out


def test_herding_matches_class_mean_better_than_random(digits, sets, class_features):
    herd = picks_per_class(digits, sets["herding"], class_features)
    g = torch.Generator().manual_seed(1)
    herd_gap = sum(mean_gap(f, p) for f, p in zip(class_features, herd)) / 10
    # random baseline averaged over several draws so the comparison is not a coin flip
    rand_gap = sum(mean_gap(f, torch.randperm(len(f), generator=g)[:IPC])
                   for _ in range(5) for f in class_features) / 50
    assert herd_gap < 0.85 * rand_gap, (herd_gap, rand_gap)  # measured 0.083 vs 0.133


def test_kcenter_spreads_out_more_than_random(digits, sets, class_features):
    kc = picks_per_class(digits, sets["kcenter"], class_features)
    rnd = picks_per_class(digits, sets["random"], class_features)
    kc_min = sum(min_pairwise(f[p]) for f, p in zip(class_features, kc)) / 10
    rnd_min = sum(min_pairwise(f[p]) for f, p in zip(class_features, rnd)) / 10
    assert kc_min > rnd_min, (kc_min, rnd_min)  # measured 0.46 vs 0.34


def test_same_seed_same_selection(digits, net, sets):
    again = select_coreset("random", digits, IPC, seed=0)
    assert torch.equal(again.images, sets["random"].images)
    other = select_coreset("random", digits, IPC, seed=1)
    assert not torch.equal(other.images, sets["random"].images)


def test_ipc_larger_than_a_class(digits, net):
    smallest = min(len(i) for i in digits.class_indices())
    with pytest.raises(DsdmError) as err:
        select_coreset("herding", digits, smallest + 1, model=net)
    msg = str(err.value)
    assert f"has {smallest}" in msg and "--ipc" in msg and "\n" not in msg
    assert select_coreset("random", digits, smallest).labels.bincount().min() == smallest  # the edge fits


def test_model_required_and_unknown_method(digits):
    with pytest.raises(DsdmError, match="zoo model"):
        select_coreset("kcenter", digits, 1)
    with pytest.raises(DsdmError, match="unknown coreset"):
        select_coreset("best", digits, 1)


def test_random_coreset_on_mnist_shapes(mnist):
    s = select_coreset("random", mnist, 2, seed=0)
    assert s.images.shape == (20, 1, 28, 28) and s.labels.bincount().tolist() == [2] * 10
    rows = train_rows(mnist, s.images)
    assert (rows >= 0).all() and torch.equal(mnist.train_y[rows], s.labels)
