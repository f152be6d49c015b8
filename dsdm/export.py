"""A distilled set in the layouts other tools read: `python -m dsdm export SET --to FORMAT OUT`.

Every format holds the *decoded* set (each stored image cut into its factor's tiles, each tile
up-sampled to full size: the images dsdm's evaluation trains on), sorted by class. Decoding and
normalisation happen once, in `decoded_arrays`; the writers only lay the arrays out:

- `imagefolder`: OUT/NN_<class>/NNNNN.png (uint8, grey or RGB) plus OUT/metadata.csv; read by
  `torchvision.datasets.ImageFolder(OUT)` and Hugging Face `load_dataset("imagefolder", data_dir=OUT)`.
  The two-digit class prefix makes both loaders' sorted folder order the label order.
- `npz`: one numpy archive, NCHW: `images_uint8`, `images_raw` (float32 in [0, 1]),
  `images_normalised` ((raw - mean) / std), `labels`, `class_names`, `mean`, `std`, `grid`.
- `ddranking`: OUT/images.pt (normalised float32), OUT/labels.pt (int64 hard labels), OUT/lr.pt
  (the learning rate of this set's evaluation recipe), the three tensors DD-Ranking's
  `compute_metrics(image_tensor=..., hard_labels=..., syn_lr=...)` takes.
- `tuple`: one `.pt` holding `(data, target)`, normalised float32 and int64, as NCFM/IDC release sets.

Every file loads with `torch.load(..., weights_only=True)` or numpy without pickle.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dsdm.errors import DsdmError
from dsdm.io import atomic_torch_save, atomic_write_bytes, sha256_file
from dsdm.synthetic import SyntheticSet

FORMATS = ("imagefolder", "npz", "ddranking", "tuple")
# datasets DD-Ranking 0.2 evaluates on: 3-channel only
DDRANKING_DATASETS = ("cifar10", "cifar100", "tinyimagenet", "imagenet")


@dataclass(frozen=True)
class Decoded:
    """The decoded set, sorted by class; every export is a layout of these arrays."""
    raw: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    uint8: torch.Tensor  # (N, C, H, W) round(255 * raw)
    normalised: torch.Tensor  # (N, C, H, W) float32, (raw - mean) / std per channel
    labels: torch.Tensor  # (N,) int64
    stored_index: torch.Tensor  # (N,) which stored image each decoded image is a tile of
    tile: torch.Tensor  # (N,) which tile (row-major) of that stored image
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def decoded_arrays(synset: SyntheticSet, class_names: list[str] | None = None) -> Decoded:
    """Decode (factor) and normalise once; order by class, stored image, tile."""
    raw, labels = synset.decoded()
    raw = raw.float().clamp(0, 1).contiguous()
    tiles = synset.grid[0] * synset.grid[1]
    stored = torch.arange(len(synset.labels)).repeat_interleave(tiles)
    tile = torch.arange(tiles).repeat(len(synset.labels))
    order = torch.argsort(labels, stable=True)
    raw, labels, stored, tile = raw[order], labels[order], stored[order], tile[order]
    mean = torch.tensor(synset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(synset.std, dtype=torch.float32).view(1, -1, 1, 1)
    names = list(class_names) if class_names else [str(c) for c in range(synset.num_classes)]
    if len(names) < synset.num_classes:
        raise DsdmError(f"{len(names)} class names for a set of {synset.num_classes} classes; "
                        "pass one name per class or none")
    return Decoded(raw=raw, uint8=(raw * 255).round().to(torch.uint8), normalised=(raw - mean) / std,
                   labels=labels.to(torch.int64), stored_index=stored, tile=tile, class_names=names,
                   mean=tuple(synset.mean), std=tuple(synset.std))


def class_folder(label: int, name: str) -> str:
    """'03_Dress': the index prefix keeps sorted folder order equal to label order (FashionMNIST's
    names are not alphabetical); characters a file system may refuse become '-'."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "class"
    return f"{label:02d}_{safe}"


def export_set(synset: SyntheticSet, fmt: str, out: str | Path, class_names: list[str] | None = None) -> Path:
    """Write `synset` as `fmt` to `out` (a folder for imagefolder/ddranking, a file otherwise)."""
    if fmt not in FORMATS:
        raise DsdmError(f"unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    out = Path(out)
    d = decoded_arrays(synset, class_names)
    if fmt == "npz":
        return _write_npz(d, synset, out)
    if fmt == "tuple":
        return atomic_torch_save((d.normalised, d.labels), out)
    if fmt == "imagefolder":
        return _write_folder(out, lambda tmp: _imagefolder(d, tmp))
    return _write_folder(out, lambda tmp: _ddranking(d, tmp, evaluation_lr(synset)))


def export_file(set_path: str | Path, fmt: str, out: str | Path) -> tuple[Path, Path | None]:
    """Export the set file at `set_path` (class names from its manifest, if any) and record the
    export's sha256 in that manifest; returns (the export, the manifest updated or None)."""
    from dsdm import manifest as mf

    synset = SyntheticSet.load(set_path)
    beside = mf.manifest_path(set_path)
    names = mf.read_manifest(beside)["set"]["class_names"] if beside.is_file() else None
    out = export_set(synset, fmt, out, names)
    return out, mf.record_export(set_path, fmt, out, sha256_path(out))


def evaluation_lr(synset: SyntheticSet) -> float:
    """The learning rate dsdm's evaluation recipe trains this set with (its config's protocol)."""
    from dsdm.recipes import get_protocol

    return get_protocol(str(synset.config.get("eval.protocol", "dsdm"))).lr


def _write_npz(d: Decoded, synset: SyntheticSet, out: Path) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, images_uint8=d.uint8.numpy(), images_raw=d.raw.numpy(),
                        images_normalised=d.normalised.numpy(), labels=d.labels.numpy(),
                        class_names=np.array(d.class_names, dtype=np.str_), mean=np.array(d.mean, dtype=np.float32),
                        std=np.array(d.std, dtype=np.float32), grid=np.array(synset.grid, dtype=np.int64),
                        stored_index=d.stored_index.numpy(), tile=d.tile.numpy())
    return atomic_write_bytes(out, buf.getvalue())


def _write_folder(out: Path, fill) -> Path:
    """Fill a temp folder beside `out`, then rename it: no half-written export under `out`."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DsdmError(f"'{out}' already exists; remove it or pass another OUT")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        fill(tmp)
        tmp.chmod(0o755)  # mkdtemp makes 0700
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _imagefolder(d: Decoded, folder: Path) -> None:
    from torchvision.io import write_png

    rows = []
    for i in range(len(d.labels)):
        label = int(d.labels[i])
        name = d.class_names[label]
        rel = f"{class_folder(label, name)}/{i:05d}.png"
        (folder / rel).parent.mkdir(exist_ok=True)
        write_png(d.uint8[i], str(folder / rel), compression_level=9)
        rows.append({"file_name": rel, "label": label, "class_name": name,
                     "stored_index": int(d.stored_index[i]), "tile": int(d.tile[i])})
    with open(folder / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _ddranking(d: Decoded, folder: Path, lr: float) -> None:
    torch.save(d.normalised, folder / "images.pt")
    torch.save(d.labels, folder / "labels.pt")
    torch.save(torch.tensor(float(lr)), folder / "lr.pt")


def ddranking_takes(dataset: str) -> bool:
    return dataset.lower().replace("-", "").replace("_", "") in DDRANKING_DATASETS


def sha256_path(path: str | Path) -> str:
    """sha256 of a file; of a folder, sha256 over its sorted 'relative-path  file-sha256' lines."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = [f"{p.relative_to(path).as_posix()}  {sha256_file(p)}\n" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()
