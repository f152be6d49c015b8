"""The distillation checkpoint: its file format, and which config changes a resume may take.

A checkpoint holds the flat config that wrote it and `Distiller.state_dict()` (images,
optimiser, memory bank, draw pool, generator): resuming it continues bit for bit. It is
refused, in one line naming the keys, when the current config would continue differently.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dsdm.config import Config
from dsdm.errors import DsdmError
from dsdm.io import atomic_torch_save, safe_torch_load
from dsdm.zoo import SPEED_LEVERS

FORMAT = "dsdm-distill-checkpoint"
# Revision of what a checkpoint's trajectory means (the file format itself is still version 1):
# 2 = the fast path replays per-class steps, the pool's refresh state, per-dataset matching ops.
REVISION = 2
# Keys a checkpoint may be resumed under with another value: they change when and what is
# logged or evaluated, how far to iterate, or float rounding only -- never the trajectory so far.
RESUMABLE_KEYS = frozenset({"budget", "distill.iterations", "distill.log_every", "distill.checkpoint_every",
                            "distill.compile", "distill.forward_chunk", "distill.cache_max_mb",
                            "distill.nchw_input", "distill.batched_loss", *(f"zoo.{k}" for k in SPEED_LEVERS)})


def save(path: str | Path, cfg: Config, state: dict) -> None:
    atomic_torch_save({"format": FORMAT, "version": 1, "revision": REVISION, "config": cfg.plain(), "state": state}, path)


def load(path: str | Path, cfg: Config, revision1_changes: Callable[[], list[str]]) -> dict:
    """The saved state, if `cfg` continues the saved trajectory; else one DsdmError naming the keys.
    `revision1_changes()` says what a revision-1 file would continue differently (asked only for one)."""
    payload = safe_torch_load(path, expect=FORMAT, what="distillation checkpoint",
                              fix="delete it to start over, or pass the checkpoint of this run")
    differ = config_mismatch(payload["config"], cfg)
    if payload.get("revision", 1) < REVISION:
        differ += revision1_changes()
    if differ:
        raise DsdmError(f"checkpoint '{path}' was written by a different config ({', '.join(differ)}); "
                        "delete it or rerun with that config")
    return payload["state"]


def config_mismatch(saved: dict, cfg: Config) -> list[str]:
    """'key: saved -> now' for each setting that would change the trajectory on resume.

    A key the checkpoint lacks (added to Config since) counts as its default value, except
    distill.match_protocol: before it existed, eval.protocol chose the matching augmentation.
    No eval key changes the trajectory."""
    now, defaults = cfg.plain(), Config().plain()
    if "distill.match_protocol" not in saved:
        saved = {**saved, "distill.match_protocol": saved.get("eval.protocol", defaults["eval.protocol"])}
    return [f"{k}: {saved.get(k, defaults[k])!r} -> {v!r}" for k, v in now.items()
            if not k.startswith("eval.") and k not in RESUMABLE_KEYS and saved.get(k, defaults[k]) != v]
