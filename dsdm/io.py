"""File I/O every module shares: one atomic writer, one safe loader, one checksum.

Every file dsdm writes goes through `atomic_write` (a uniquely named temp file in the same
folder, fsync, then `os.replace`), so a crash or a full disk never leaves a torn file and
two writers of the same path never share a temp file: the last rename wins whole.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

from dsdm.errors import DsdmError


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], mode: int | None = None) -> Path:
    """Call `write(fh)` on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    return atomic_write(path, lambda fh: fh.write(data), mode)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode(), mode)


def atomic_torch_save(obj: Any, path: str | Path, mode: int | None = None) -> Path:
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh), mode)


def safe_torch_load(path: str | Path, expect: str, what: str, fix: str, max_version: int = 1) -> dict:
    """Load a dsdm file with weights_only=True; foreign, truncated or newer files get one line."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise DsdmError(f"{what} '{path}' does not exist; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of foreign objects, not a torch file
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise DsdmError(f"'{path}' is not a readable {what} ({reason}); {fix}") from None
    if not isinstance(payload, dict) or payload.get("format") != expect:
        raise DsdmError(f"'{path}' is not a dsdm {what} (format tag missing or different); {fix}")
    if payload.get("version", 0) > max_version:
        raise DsdmError(f"'{path}' was written by a newer dsdm (version {payload['version']}); upgrade dsdm")
    return payload


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plain(value: Any) -> Any:
    """Nested config values as plain types: tuples become lists, keys strings (what JSON and
    `weights_only` loading both accept)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
