"""Datasets as in-memory tensors: ``load_dataset(name, root, offline, val_fraction, seed)``.

Every loader returns images as float32 ``(N, C, H, W)`` in [0, 1] and int64 labels; the
validation hold-out (stratified, seeded) is carved from the training split here, once, so
every dataset gets it the same way (speech: whole speakers, like its train/test split).
Normalisation constants are carried, not applied.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from dsdm.errors import DsdmError


@dataclass(eq=False, repr=False)
class Dataset:
    """Train (minus val), val and test tensors plus the metadata the pipeline needs."""
    name: str
    kind: str  # "image" or "speech"
    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict[str, Any] = field(default_factory=dict)  # loader extras (e.g. speech cache path)
    # speaker of each train sample (speech): validation is then held out speaker-wise, so no
    # voice is in both train and validation, as train/test already are
    train_groups: list[str] | None = None
    _class_idx: list[Tensor] | None = field(default=None, init=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train_x.shape[2]), int(self.train_x.shape[3])

    def class_indices(self) -> list[Tensor]:
        """Per class, the indices into ``train_x`` (cached; don't reassign ``train_y``)."""
        if self._class_idx is None:
            self._class_idx = [torch.nonzero(self.train_y == c).flatten() for c in range(self.num_classes)]
        return self._class_idx

    def class_images(self, c: int) -> Tensor:
        return self.train_x[self.class_indices()[c]]

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, kind={self.kind}, train={len(self.train_y)}, "
                f"val={len(self.val_y)}, test={len(self.test_y)}, "
                f"shape={tuple(self.train_x.shape[1:])}, classes={self.num_classes})")


def stratified_holdout(y: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(keep, hold) sorted index tensors; each class gives round(fraction * n_c) to ``hold``."""
    if not 0 <= fraction < 1:
        raise DsdmError(f"val_fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    hold = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        hold.append(idx[torch.randperm(len(idx), generator=g)[: round(fraction * len(idx))]])
    mask = torch.zeros(len(y), dtype=torch.bool)
    if hold:
        mask[torch.cat(hold)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def group_holdout(groups: list[str], fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(keep, hold) sorted index tensors with whole groups held out: a seeded draw of groups
    until at least round(fraction * n) samples are held (>= 1 group each side)."""
    if not 0 <= fraction < 1:
        raise DsdmError(f"val_fraction must be in [0, 1), got {fraction}")
    names = sorted(set(groups))
    target = round(fraction * len(groups))
    if target and len(names) < 2:
        raise DsdmError(f"a validation split held out by speaker needs >= 2 training speakers, found {len(names)}; "
                        "add speakers or pass val_fraction=0")
    count = {g: 0 for g in names}
    for g in groups:
        count[g] += 1
    held: set[str] = set()
    for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist():
        if sum(count[g] for g in held) >= target or len(held) == len(names) - 1:
            break
        held.add(names[i])
    mask = torch.tensor([g in held for g in groups], dtype=torch.bool)
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


# --- torchvision image datasets -------------------------------------------------------

def _open(make: Callable[[bool], Any], name: str, root: Path, offline: bool, need: str) -> Any:
    """Build a torchvision dataset; on missing/corrupt files download, or fail in one line."""
    try:
        return make(False)
    except RuntimeError:  # torchvision's "not found or corrupted"
        pass
    fix = "pass --data-root DIR or set DSDM_DATA to the folder that holds them"
    if offline:
        raise DsdmError(f"{name} not found in {root} (expected {need}); {fix}, "
                        "or run once without --offline to download")
    try:
        return make(True)
    except Exception as e:  # network errors come in many types
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DsdmError(f"{name} not found in {root} (expected {need}) and download failed ({reason}); {fix}") from e


def _images(data: Any, layout: str) -> Tensor:
    """uint8 array in ``layout`` ("NHW", "NHWC" or "NCHW") -> float32 NCHW in [0, 1]."""
    x = torch.as_tensor(np.asarray(data))
    x = {"NHW": lambda t: t.unsqueeze(1), "NHWC": lambda t: t.permute(0, 3, 1, 2),
         "NCHW": lambda t: t}[layout](x)
    return x.contiguous().float().div_(255)


# name -> (torchvision class, files expected under root, layout, mean, std)
_TV = {
    "mnist": ("MNIST", "MNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*)",
              "NHW", (0.1307,), (0.3081,)),
    "fashionmnist": ("FashionMNIST",
                     "FashionMNIST/raw/ (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*)",
                     "NHW", (0.2861,), (0.3530,)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
                "NHWC", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ("CIFAR100", "cifar-100-python/ (train, test, meta)",
                 "NHWC", (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ("SVHN", "train_32x32.mat and test_32x32.mat",
             "NCHW", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}


def _torchvision_loader(name: str) -> Callable[[Path, bool], Dataset]:
    cls_name, need, layout, mean, std = _TV[name]

    def load(root: Path, offline: bool) -> Dataset:
        import torchvision.datasets as tvd  # deferred: importing torchvision costs ~1 s
        cls = getattr(tvd, cls_name)
        parts = {}
        for train in (True, False):
            # SVHN takes split=, the others train=; reading .data/.targets avoids PIL per item
            kw = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
            ds = _open(lambda dl: cls(str(root), download=dl, **kw), name, root, offline, need)
            labels = ds.labels if name == "svhn" else ds.targets
            parts[train] = (_images(ds.data, layout), torch.as_tensor(np.asarray(labels), dtype=torch.int64))
        names = [str(i) for i in range(10)] if name == "svhn" else list(ds.classes)
        (tx, ty), (sx, sy) = parts[True], parts[False]
        return Dataset(name, "image", tx, ty, tx[:0], ty[:0], sx, sy, names, mean, std)
    return load


# --- embedded and speech datasets -------------------------------------------------------

def _digits(root: Path, offline: bool) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, bundled): no files, no network."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).div_(16).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    tr, te = torch.as_tensor(np.sort(tr)), torch.as_tensor(np.sort(te))
    # mean/std of the 1437 train images, measured once
    return Dataset("digits", "image", x[tr], y[tr], x[:0], y[:0], x[te], y[te],
                   [str(i) for i in range(10)], (0.3054,), (0.3761,))


def _speechcommands(root: Path, offline: bool) -> Dataset:
    from dsdm import speech
    d = speech.load_speech_commands(root)  # never downloads: offline changes nothing
    info = {k: d[k] for k in ("spec_min", "spec_max", "cache_path", "from_cache")}
    return Dataset("speechcommands", "speech", d["train_x"], d["train_y"], d["train_x"][:0],
                   d["train_y"][:0], d["test_x"], d["test_y"], list(speech.WORDS),
                   (d["mean"],), (d["std"],), info, [speech.speaker_of(f) for f in d["train_files"]])


LOADERS: dict[str, Callable[[Path, bool], Dataset]] = {
    **{n: _torchvision_loader(n) for n in _TV},
    "digits": _digits,
    "speechcommands": _speechcommands,
}


def default_root() -> Path:
    """``$DSDM_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("DSDM_DATA") or "data")


def load_dataset(name: str, root: str | Path | None = None, offline: bool = False,
                 val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load ``name`` from ``root`` and hold out ``val_fraction`` of train (seeded): stratified by
    class, or by speaker where the loader knows them (speech)."""
    key = name.lower()
    if key not in LOADERS:
        raise DsdmError(f"unknown dataset '{name}'; choose one of: {', '.join(sorted(LOADERS))}")
    ds = LOADERS[key](Path(root).expanduser() if root is not None else default_root(), offline)
    if ds.train_groups is None:
        keep, hold = stratified_holdout(ds.train_y, val_fraction, seed)
    else:
        keep, hold = group_holdout(ds.train_groups, val_fraction, seed)
        ds.info["val_groups"] = sorted({ds.train_groups[i] for i in hold.tolist()})
        ds.train_groups = [ds.train_groups[i] for i in keep.tolist()]
    ds.val_x, ds.val_y = ds.train_x[hold], ds.train_y[hold]
    ds.train_x, ds.train_y = ds.train_x[keep], ds.train_y[keep]
    return ds
