"""`python -m dsdm export`: every format read back by the library that reads it, pixels and labels
compared with the set decoded here independently (uint8 exact, floats to float32 rounding)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsdm.augment import decode
from dsdm.config import make_config
from dsdm.errors import DsdmError
from dsdm.export import FORMATS, class_folder, decoded_arrays, export_set, sha256_path
from dsdm.synthetic import SyntheticSet

NAMES = ["T-shirt/top", "Trouser", "Pullover"]  # not alphabetical, one with a '/'


def make_set(channels: int = 1, grid=(2, 2), ipc: int = 2, classes: int = 3, size: int = 8) -> SyntheticSet:
    g = torch.Generator().manual_seed(channels)
    images = torch.rand(classes * ipc, channels, size, size, generator=g)
    labels = torch.arange(classes).repeat(ipc)  # interleaved: the export must sort by class
    mean, std = (0.3, 0.4, 0.5)[:channels], (0.2, 0.25, 0.3)[:channels]
    cfg = make_config("smoke", {"distill.ipc": ipc}).plain()
    s = SyntheticSet(images, labels, grid, "fashionmnist" if channels == 1 else "cifar10", mean, std, cfg)
    return s


def reference(s: SyntheticSet, tmp_path: Path):
    """The stored (float16) set decoded and sorted by class without dsdm.export: float64 normalised."""
    loaded = SyntheticSet.load(s.save(tmp_path / "ref.pt"))
    x, y = decode(loaded.images.double(), loaded.labels, loaded.grid)
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    mean = torch.tensor(loaded.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(loaded.std, dtype=torch.float64).view(1, -1, 1, 1)
    return loaded, x, (x * 255).round().to(torch.uint8), (x - mean) / std, y


@pytest.fixture(params=[1, 3], ids=["grey", "rgb"])
def case(request, tmp_path):
    return reference(make_set(channels=request.param), tmp_path)


def test_decoded_arrays_are_sorted_by_class_and_normalised_once(case):
    s, raw, u8, norm, y = case
    d = decoded_arrays(s, NAMES)
    assert torch.equal(d.labels, y) and torch.equal(d.uint8, u8)
    assert torch.allclose(d.raw.double(), raw, atol=1e-6) and torch.allclose(d.normalised.double(), norm, atol=1e-5)
    assert d.labels.tolist() == sorted(d.labels.tolist())
    # tile bookkeeping: 4 tiles per stored image, stored image labels match
    assert d.tile.tolist()[:4] == [0, 1, 2, 3] and torch.equal(s.labels[d.stored_index], d.labels)


def test_imagefolder_round_trip_through_torchvision(case, tmp_path):
    from torchvision.datasets import ImageFolder

    s, _, u8, _, y = case
    out = export_set(s, "imagefolder", tmp_path / "if", NAMES)
    ds = ImageFolder(str(out))  # default loader: RGB
    assert ds.classes == [class_folder(i, n) for i, n in enumerate(NAMES)] == ["00_T-shirt-top", "01_Trouser", "02_Pullover"]
    assert [label for _, label in ds.samples] == y.tolist()
    for i, (img, label) in enumerate(ds):
        pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)  # (3, H, W)
        assert torch.equal(pixels, u8[i].expand(3, -1, -1)), i  # grey PNGs load as 3 equal channels
    with open(out / "metadata.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["label"]) for r in rows] == y.tolist() and rows[0]["class_name"] == NAMES[0]
    assert all((out / r["file_name"]).is_file() for r in rows)


def test_imagefolder_round_trip_through_hugging_face_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    s, _, u8, _, y = reference(make_set(channels=1), tmp_path)
    out = export_set(s, "imagefolder", tmp_path / "if", NAMES)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(y)
    for i, row in enumerate(ds):
        assert row["label"] == int(y[i]) and row["class_name"] == NAMES[int(y[i])]
        assert torch.equal(torch.from_numpy(np.array(row["image"])), u8[i, 0]), i  # mode L: (H, W)


def test_npz_round_trip_through_numpy(case, tmp_path):
    s, raw, u8, norm, y = case
    path = export_set(s, "npz", tmp_path / "set.npz", NAMES)
    with np.load(path, allow_pickle=False) as z:
        assert np.array_equal(z["images_uint8"], u8.numpy()) and z["images_uint8"].dtype == np.uint8
        assert z["images_raw"].dtype == np.float32 and np.allclose(z["images_raw"], raw.numpy(), atol=1e-6)
        assert np.allclose(z["images_normalised"], norm.numpy(), atol=1e-5)
        assert np.array_equal(z["labels"], y.numpy()) and list(z["class_names"]) == NAMES
        assert np.allclose(z["mean"], s.mean) and np.allclose(z["std"], s.std) and list(z["grid"]) == [2, 2]


def test_tuple_round_trip_through_torch_load_weights_only(case, tmp_path):
    s, _, _, norm, y = case
    data, target = torch.load(export_set(s, "tuple", tmp_path / "set.pt"), weights_only=True)
    assert data.dtype == torch.float32 and torch.allclose(data.double(), norm, atol=1e-5)
    assert target.dtype == torch.int64 and torch.equal(target, y)


def test_ddranking_round_trip_through_torch_load_weights_only(case, tmp_path):
    s, _, _, norm, y = case
    out = export_set(s, "ddranking", tmp_path / "dd")
    images = torch.load(out / "images.pt", weights_only=True)
    labels = torch.load(out / "labels.pt", weights_only=True)
    lr = torch.load(out / "lr.pt", weights_only=True)
    assert torch.allclose(images.double(), norm, atol=1e-5) and torch.equal(labels, y)
    assert lr.item() == pytest.approx(0.01)  # protocol dsdm's learning rate
    assert sorted(p.name for p in out.iterdir()) == ["images.pt", "labels.pt", "lr.pt"]


def test_unknown_format_and_occupied_folder_are_one_line_errors(tmp_path):
    s = make_set()
    with pytest.raises(DsdmError, match="unknown export format 'hdf5'"):
        export_set(s, "hdf5", tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DsdmError, match="already exists; remove it"):
        export_set(s, "imagefolder", tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left


def test_folder_sha256_changes_with_any_file(tmp_path):
    out = export_set(make_set(), "imagefolder", tmp_path / "if")
    before = sha256_path(out)
    assert before == sha256_path(out)
    png = next(out.rglob("*.png"))
    png.write_bytes(png.read_bytes() + b"\0")
    assert sha256_path(out) != before


def test_cli_export_records_each_sha256_in_the_manifest(tmp_path, monkeypatch, capsys):
    """A real (smoke) distillation by `python -m dsdm distill`, then every format through the
    `export` command (in this process: the same `dsdm.cli.main` the console runs)."""
    from dsdm import cli

    env = {**os.environ, "DSDM_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "dsdm", "distill", "--dataset", "digits", "--budget", "smoke", "--ipc", "1",
                        "--out", "s.pt"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    monkeypatch.chdir(tmp_path)
    outs = {"imagefolder": "if", "npz": "s.npz", "ddranking": "dd", "tuple": "t.pt"}
    for fmt in ("imagefolder", "npz", "tuple", "ddranking"):
        assert cli.main(["export", "s.pt", "--to", fmt, outs[fmt]]) == 0
        out, err = capsys.readouterr()
        assert f"wrote {outs[fmt]}: 40 decoded images of digits ({fmt})" in out, err
    exports = json.loads((tmp_path / "s.manifest.json").read_text())["exports"]
    assert set(exports) == set(FORMATS)
    for fmt in FORMATS:
        assert exports[fmt] == {"path": outs[fmt], "sha256": sha256_path(tmp_path / outs[fmt])}
    assert "DD-Ranking scores 3-channel" in err  # digits is grey: the last (ddranking) export said so
    assert cli.main(["export", "s.pt", "--to", "imagefolder", "if"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err
