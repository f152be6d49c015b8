"""Tests for dsdm.data and dsdm.speech: real shared data where present, format-true fakes otherwise."""
from __future__ import annotations

import hashlib
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dsdm import speech
from dsdm.data import Dataset, group_holdout, load_dataset, stratified_holdout
from dsdm.errors import DsdmError

from conftest import SHARED  # noqa: E402  (one definition of the shared data path)
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def need_shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.is_dir():
        pytest.skip(f"shared data {sub} not found at {path}")
    return path


def check_basic(ds: Dataset, shape: tuple[int, ...], num_classes: int) -> None:
    for x, y in ((ds.train_x, ds.train_y), (ds.val_x, ds.val_y), (ds.test_x, ds.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape[1:]) == shape and len(x) == len(y)
        if len(x):
            assert 0 <= x.min() and x.max() <= 1
            assert 0 <= y.min() and y.max() < num_classes
    assert ds.num_classes == num_classes == len(ds.class_names)
    assert ds.channels == shape[0] and ds.image_size == shape[1:]
    assert len(ds.mean) == len(ds.std) == shape[0]


# --- real MNIST / FashionMNIST ------------------------------------------------------------

@pytest.fixture(scope="module", params=["mnist", "fashionmnist"])
def real_mnist(request):
    need_shared("MNIST" if request.param == "mnist" else "FashionMNIST")
    return load_dataset(request.param, SHARED, offline=True)


def test_mnist_like_sizes_and_stratified_val(real_mnist):
    ds = real_mnist
    check_basic(ds, (1, 28, 28), 10)
    assert len(ds.train_y) + len(ds.val_y) == 60000 and len(ds.test_y) == 10000
    tr, va = ds.train_y.bincount(minlength=10), ds.val_y.bincount(minlength=10)
    expected = MNIST_TRAIN_COUNTS if ds.name == "mnist" else [6000] * 10
    assert (tr + va).tolist() == expected
    assert all(abs(v - 0.1 * n) <= 1 for v, n in zip(va.tolist(), expected))
    assert ds.test_y.bincount(minlength=10).sum() == 10000
    assert [len(i) for i in ds.class_indices()] == tr.tolist()
    assert torch.equal(ds.class_images(3), ds.train_x[ds.train_y == 3])


# --- speech: real stand-in data and a tiny fake ------------------------------------------

def test_spoken_commands_real(tmp_path, monkeypatch):
    root = need_shared("spoken_commands")
    monkeypatch.setenv("DSDM_CACHE_DIR", str(tmp_path))  # cold start regardless of earlier runs
    t0 = time.perf_counter()
    cold = load_dataset("speechcommands", root.parent)  # parent holding spoken_commands/
    t1 = time.perf_counter()
    warm = load_dataset("speechcommands", root)  # the word folder itself
    t2 = time.perf_counter()
    assert not cold.info["from_cache"] and warm.info["from_cache"]
    assert (t1 - t0) >= 5 * (t2 - t1), f"cold {t1 - t0:.2f}s vs warm {t2 - t1:.2f}s"
    check_basic(warm, (1, 64, 64), 8)
    assert warm.kind == "speech" and warm.class_names == list(speech.WORDS)
    assert len(warm.train_y) + len(warm.val_y) + len(warm.test_y) == 960
    assert torch.equal(cold.test_x, warm.test_x) and torch.equal(cold.val_y, warm.val_y)
    d = speech.load_speech_commands(root, cache_dir=tmp_path)
    train_spk = {speech.speaker_of(f) for f in d["train_files"]}
    test_spk = {speech.speaker_of(f) for f in d["test_files"]}
    assert train_spk and test_spk and not train_spk & test_spk
    assert len(d["test_files"]) == len(warm.test_y)
    # validation is held out by speaker too: no voice in both train and validation
    val_spk = set(warm.info["val_groups"])
    assert val_spk and not val_spk & set(warm.train_groups) and not val_spk & test_spk
    assert len(warm.train_groups) == len(warm.train_y) and val_spk | set(warm.train_groups) == train_spk


def write_fake_speech(folder: Path, speakers=("aa11", "bb22", "cc33", "dd44", "ee55")) -> Path:
    """8 words x 5 speakers of short tones; odd lengths, one stereo, one at 8 kHz."""
    t = np.arange(16000) / 16000
    for wi, word in enumerate(speech.WORDS):
        (folder / word).mkdir(parents=True)
        for si, spk in enumerate(speakers):
            wav = 0.3 * np.sin(2 * np.pi * (200 + 100 * wi + 10 * si) * t)[: 12000 + 1000 * si]
            sr = 16000
            if wi == 0 and si == 0:
                wav = np.stack([wav, wav], axis=1)  # stereo -> averaged
            if wi == 1 and si == 0:
                wav, sr = wav[::2], 8000  # resampled to 16 kHz
            sf.write(folder / word / f"{spk}_nohash_0.wav", wav, sr)
    return folder


def test_fake_speech_folder_and_cache_locations(tmp_path, monkeypatch):
    data = write_fake_speech(tmp_path / "mini_speech_commands")
    monkeypatch.delenv("DSDM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ds = load_dataset("speechcommands", tmp_path, val_fraction=0)  # parent form
    check_basic(ds, (1, 64, 64), 8)
    assert len(ds.train_y) == 32 and len(ds.test_y) == 8  # 1 of 5 speakers held out
    assert ds.test_y.tolist() == list(range(8)) and ds.val_x.shape == (0, 1, 64, 64)
    assert Path(ds.info["cache_path"]).parent == data / ".dsdm_cache"  # writable: next to data
    assert ds.train_x.min() == 0 and ds.train_x.max() == 1
    data.chmod(0o555)  # read-only data folder (honoured even as root): user cache instead
    try:
        ro = load_dataset("speechcommands", data, val_fraction=0)
    finally:
        data.chmod(0o755)
    assert ro.info["from_cache"] is False
    assert Path(ro.info["cache_path"]).parent == tmp_path / "xdg" / "dsdm"
    assert torch.equal(ro.train_x, ds.train_x)


def test_speech_errors(tmp_path):
    with pytest.raises(DsdmError, match="mini_speech_commands"):
        load_dataset("speechcommands", tmp_path / "nothing")
    (tmp_path / "part" / "yes").mkdir(parents=True)
    with pytest.raises(DsdmError, match="lacks word folders: down"):
        load_dataset("speechcommands", tmp_path / "part")


# --- CIFAR-10 / CIFAR-100 / SVHN in their real on-disk formats ------------------------

def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_pickle(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj))
    return path


def fake_cifar(root: Path, monkeypatch, n_classes: int, n_per_file: int = 20) -> list[str]:
    """Write CIFAR-10 (or -100) pickles and point torchvision's md5 table at them."""
    import torchvision.datasets as tvd
    rng = np.random.default_rng(0)
    ten = n_classes == 10
    cls = tvd.CIFAR10 if ten else tvd.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if ten else "fine_labels"
    names = [f"class{i}" for i in range(n_classes)]

    def batch(fname: str) -> list[str]:
        data = rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8)
        labels = (np.arange(n_per_file) % n_classes).tolist()
        p = write_pickle(folder / fname, {"data": data, label_key: labels, "coarse_labels": labels})
        return [fname, md5(p)]

    train = [batch(f) for f, _ in cls.train_list]
    test = [batch(f) for f, _ in cls.test_list]
    meta = write_pickle(folder / cls.meta["filename"], {cls.meta["key"]: names})
    monkeypatch.setattr(cls, "train_list", train)
    monkeypatch.setattr(cls, "test_list", test)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(meta)})
    return names


@pytest.mark.parametrize("name,n_classes,n_train_files", [("cifar10", 10, 5), ("cifar100", 100, 1)])
def test_cifar_real_format(tmp_path, monkeypatch, name, n_classes, n_train_files):
    n = 200 if n_classes == 100 else 20
    names = fake_cifar(tmp_path, monkeypatch, n_classes, n)
    ds = load_dataset(name, tmp_path, offline=True, val_fraction=0.1 if n_classes == 10 else 0)
    check_basic(ds, (3, 32, 32), n_classes)
    assert len(ds.train_y) + len(ds.val_y) == n * n_train_files and len(ds.test_y) == n
    assert ds.class_names == names and len(ds.mean) == 3
    assert set(ds.test_y.tolist()) == set(range(n_classes))


def test_svhn_real_format(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets as tvd
    split_list = {k: list(v) for k, v in tvd.SVHN.split_list.items()}
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 10)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # labels 1..10, 10 = digit 0
        path = tmp_path / split_list[split][1]
        scipy.io.savemat(path, {"X": x, "y": y})
        split_list[split][2] = md5(path)
        if split == "train":
            first = torch.as_tensor(x[..., 0]).permute(2, 0, 1).float() / 255
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    ds = load_dataset("svhn", tmp_path, offline=True, val_fraction=0)
    check_basic(ds, (3, 32, 32), 10)
    assert ds.train_y[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert torch.allclose(ds.train_x[0], first)  # HWC-N .mat layout read as CHW
    assert ds.class_names == [str(i) for i in range(10)]


# --- digits, splits, errors -------------------------------------------------------------

def test_digits_deterministic():
    a, b = load_dataset("digits"), load_dataset("digits")
    check_basic(a, (1, 8, 8), 10)
    assert len(a.train_y) + len(a.val_y) + len(a.test_y) == 1797 and len(a.test_y) == 360
    for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    c = load_dataset("digits", seed=1)
    assert torch.equal(a.test_y, c.test_y) and not torch.equal(a.val_y, c.val_y)  # seed moves val only
    z = load_dataset("digits", val_fraction=0)
    assert z.val_x.shape == (0, 1, 8, 8) and z.val_y.shape == (0,) and len(z.train_y) == 1437


def test_stratified_holdout_partition():
    y = torch.arange(103) % 4
    keep, hold = stratified_holdout(y, 0.25, seed=3)
    assert sorted(keep.tolist() + hold.tolist()) == list(range(103))
    assert y[hold].bincount().tolist() == [round(0.25 * n) for n in y.bincount().tolist()]
    with pytest.raises(DsdmError):
        stratified_holdout(y, 1.0, seed=0)


def test_group_holdout_keeps_groups_whole():
    groups = [f"spk{i % 7}" for i in range(70)] + ["spk0"] * 5  # 7 speakers, one with 15 clips
    keep, hold = group_holdout(groups, 0.1, seed=1)
    assert sorted(keep.tolist() + hold.tolist()) == list(range(75))
    held, kept = {groups[i] for i in hold.tolist()}, {groups[i] for i in keep.tolist()}
    assert held and kept and not held & kept and len(hold) >= round(0.1 * 75)
    assert torch.equal(group_holdout(groups, 0.1, seed=1)[1], hold)  # seeded
    assert len(group_holdout(groups, 0.0, seed=1)[1]) == 0
    assert len(group_holdout(groups, 0.9, seed=1)[0]) > 0  # >= 1 speaker stays in train
    with pytest.raises(DsdmError, match="needs >= 2 training speakers"):
        group_holdout(["only"] * 10, 0.1, seed=0)


def test_unknown_dataset():
    with pytest.raises(DsdmError, match=r"unknown dataset 'foo'; choose one of: cifar10, cifar100, "
                                        r"digits, fashionmnist, mnist, speechcommands, svhn"):
        load_dataset("foo")


@pytest.mark.parametrize("name,expect", [("mnist", "MNIST/raw/"), ("cifar10", "cifar-10-batches-py/"),
                                         ("cifar100", "cifar-100-python/"), ("svhn", "train_32x32.mat"),
                                         ("speechcommands", "mini_speech_commands")])
def test_missing_offline_is_one_line(tmp_path, name, expect):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(DsdmError) as e:
        load_dataset(name, missing, offline=True)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg and expect in msg


def test_corrupt_file_offline_and_failed_download(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvc
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"not a pickle")  # md5 mismatch = corrupted
    with pytest.raises(DsdmError, match="run once without --offline"):
        load_dataset("cifar10", tmp_path, offline=True)

    def no_network(*args, **kwargs):
        raise OSError("network unreachable\nsecond line")
    monkeypatch.setattr(tvc, "download_and_extract_archive", no_network)
    with pytest.raises(DsdmError, match=r"download failed \(network unreachable\)") as e:
        load_dataset("cifar10", tmp_path, offline=False)
    assert "\n" not in str(e.value)
