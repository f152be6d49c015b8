"""Mini Speech Commands -> 1x64x64 log-magnitude spectrograms in [0, 1], cached on disk.

Layout: ``<dir>/<word>/<speaker>_nohash_<i>.wav`` (16 kHz mono, 1 s) for the 8 words below.
Train/test is split by speaker so that no voice is in both. The processed tensors are
cached under a key that hashes the file list and every processing parameter, so any
change of data or code parameters recomputes instead of silently reusing stale tensors.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

from dsdm.errors import DsdmError
from dsdm.io import atomic_torch_save

WORDS = ("down", "go", "left", "no", "right", "stop", "up", "yes")
SUBDIRS = ("mini_speech_commands", "spoken_commands")  # names accepted under a parent root
URL = "http://storage.googleapis.com/download.tensorflow.org/data/mini_speech_commands.zip"
PARAMS = dict(sample_rate=16000, n_fft=255, hop=128, size=64, test_fraction=0.2, split_seed=0,
              version=1)  # bump version when the processing code changes meaning
CACHE_ENV = "DSDM_CACHE_DIR"


def find_speech_dir(root: Path) -> Path:
    """The folder holding the word folders: ``root`` itself or a known subfolder of it."""
    for cand in (root, *(root / s for s in SUBDIRS)):
        present = [w for w in WORDS if (cand / w).is_dir()]
        if len(present) == len(WORDS):
            return cand
        if present:  # a partial copy would silently change the class count
            missing = ", ".join(w for w in WORDS if w not in present)
            raise DsdmError(f"speech folder {cand} lacks word folders: {missing}; "
                            f"use a complete Mini Speech Commands copy ({URL})")
    raise DsdmError(
        f"speechcommands not found at {root}: expected {root}/mini_speech_commands/<word>/*.wav "
        f"or {root}/<word>/*.wav for words {','.join(WORDS)}; pass --data-root DIR or set "
        f"DSDM_DATA (download and unzip {URL})")


def speaker_of(path: str | Path) -> str:
    """Speaker id: the file name part before ``_nohash_``."""
    return Path(path).name.split("_nohash_")[0]


def list_files(speech_dir: Path) -> list[str]:
    """Sorted ``word/file.wav`` paths relative to ``speech_dir``."""
    files = sorted(f"{w}/{p.name}" for w in WORDS for p in (speech_dir / w).glob("*.wav"))
    empty = [w for w in WORDS if not any(f.startswith(w + "/") for f in files)]
    if empty:
        raise DsdmError(f"no .wav files in {speech_dir} for: {', '.join(empty)}")
    return files


def split_speakers(files: list[str]) -> set[str]:
    """Test speakers: a fixed seeded draw of ~20% of the sorted speaker ids (>= 1 each side)."""
    speakers = sorted({speaker_of(f) for f in files})
    if len(speakers) < 2:
        raise DsdmError(f"speech data needs at least 2 speakers for a speaker-wise split, "
                        f"found {len(speakers)}")
    n_test = min(max(round(PARAMS["test_fraction"] * len(speakers)), 1), len(speakers) - 1)
    g = torch.Generator().manual_seed(PARAMS["split_seed"])
    order = torch.randperm(len(speakers), generator=g)[:n_test]
    return {speakers[i] for i in order.tolist()}


# The compiled trio torch / torchvision / torchaudio only loads as the exact set pyproject.toml pins:
# a torchaudio built for another torch installs cleanly and then fails at import (undefined symbol).
TORCHAUDIO_PIN = "torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"


def torchaudio_module():
    """torchaudio, imported on first use (only speech needs it), or a one-line DsdmError naming the pin."""
    try:
        return importlib.import_module("torchaudio")
    except (OSError, ImportError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DsdmError(f"torchaudio does not load beside torch {torch.__version__} ({first}); "
                        f"install the pinned set: pip install {TORCHAUDIO_PIN} "
                        "(or pip install -c constraints.txt -e .)") from None


def read_wave(path: Path) -> torch.Tensor:
    """Mono float32 waveform at 16 kHz, zero-padded/trimmed to exactly 1 s."""
    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = torch.from_numpy(np.ascontiguousarray(wav.mean(axis=1)))
    if sr != PARAMS["sample_rate"]:
        x = torchaudio_module().functional.resample(x, sr, PARAMS["sample_rate"])
    n = PARAMS["sample_rate"]
    return F.pad(x[:n], (0, max(0, n - x.numel())))


def spectrograms(waves: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """(N, 16000) waveforms -> (N, 1, 64, 64) log1p magnitude spectrograms (unscaled)."""
    spec = torchaudio_module().transforms.Spectrogram(n_fft=PARAMS["n_fft"], hop_length=PARAMS["hop"], power=1.0)
    size = (PARAMS["size"], PARAMS["size"])
    out = [F.interpolate(torch.log1p(spec(w)).unsqueeze(1), size=size, mode="bilinear",
                         align_corners=False) for w in waves.split(chunk)]  # chunks bound memory
    return torch.cat(out) if out else torch.empty(0, 1, *size)


def _process(speech_dir: Path, files: list[str]) -> dict:
    """Read, transform, split by speaker and scale to [0, 1] with train min/max."""
    test_spk = split_speakers(files)
    parts = {"train": [f for f in files if speaker_of(f) not in test_spk],
             "test": [f for f in files if speaker_of(f) in test_spk]}
    out: dict = {}
    for split, fs in parts.items():
        waves = torch.stack([read_wave(speech_dir / f) for f in fs])
        out[f"{split}_x"] = spectrograms(waves)
        out[f"{split}_y"] = torch.tensor([WORDS.index(f.split("/")[0]) for f in fs], dtype=torch.int64)
        out[f"{split}_files"] = fs
    lo, hi = out["train_x"].min().item(), out["train_x"].max().item()
    for split in parts:  # test can fall outside the train range: clamp keeps the [0, 1] contract
        out[f"{split}_x"] = ((out[f"{split}_x"] - lo) / max(hi - lo, 1e-12)).clamp_(0, 1)
    out.update(spec_min=lo, spec_max=hi,
               mean=out["train_x"].mean().item(), std=out["train_x"].std().item())
    return out


def _cache_key(speech_dir: Path, files: list[str]) -> str:
    listing = [(f, (speech_dir / f).stat().st_size) for f in files]
    blob = json.dumps({"files": listing, "params": PARAMS}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _writable(d: Path) -> bool:
    """Honour read-only permission bits even when running as root (which bypasses them)."""
    p = d if d.exists() else d.parent
    try:
        return os.access(p, os.W_OK) and bool(p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    except OSError:
        return False


def cache_dirs(speech_dir: Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Where the cache may live, in order: explicit dir / $DSDM_CACHE_DIR, else next to the
    data (``<speech_dir>/.dsdm_cache``) when writable, then ``~/.cache/dsdm``."""
    explicit = cache_dir or os.environ.get(CACHE_ENV)
    if explicit:
        return [Path(explicit)]
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsdm"
    local = speech_dir / ".dsdm_cache"
    return [local, home] if _writable(speech_dir) else [home]


def load_speech_commands(root: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Processed speaker-split data as a dict: ``train_x/train_y/test_x/test_y`` tensors,
    ``train_files/test_files``, ``spec_min/spec_max`` (train range used for scaling),
    ``mean/std`` (of scaled train), ``cache_path`` and ``from_cache``."""
    speech_dir = find_speech_dir(Path(root).expanduser())
    files = list_files(speech_dir)
    name = f"speechcommands_{_cache_key(speech_dir, files)}.pt"
    dirs = cache_dirs(speech_dir, cache_dir)
    for d in dirs:
        if (d / name).is_file():
            try:
                data = torch.load(d / name, weights_only=True)
                return {**data, "cache_path": str(d / name), "from_cache": True}
            except Exception:  # truncated/corrupt cache: recompute below
                pass
    data = _process(speech_dir, files)
    for d in dirs:
        try:
            atomic_torch_save(data, d / name, mode=0o644)  # shared next to the data: readable by all
            return {**data, "cache_path": str(d / name), "from_cache": False}
        except OSError:
            continue  # try the next location; data is still usable uncached
    return {**data, "cache_path": None, "from_cache": False}
