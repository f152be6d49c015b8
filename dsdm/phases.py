"""Seconds and peak memory per named phase of a run (zoo, cache fill, distillation, evaluation).

    clock = PhaseClock(device)
    with clock.phase("zoo"):
        zoo = train_zoo(...)
    with clock.phase("distill"):
        synset = distiller.run()
    clock.carve("distill", "cache_fill", distiller.cache.fill_seconds)  # a part timed inside a phase
    clock.metrics()  # {"phase_seconds/zoo": ..., "phase_seconds/cache_fill": ..., "peak_rss_mb": ...}

Peak resident memory comes from `getrusage` (the process's high-water mark: it only grows, so
the value recorded at the end of a phase is the peak of the process up to then). Peak CUDA
memory is per phase: the allocator's peak is reset when a phase starts.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch

PHASES = ("zoo", "cache_fill", "distill", "eval")  # the phases a trial record carries, in order


def peak_rss_mb() -> float:
    """The process's peak resident memory so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PhaseClock:
    """Wall seconds per phase (summed when a phase is entered again) and memory high-water marks."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = {}
        self.rss_mb: dict[str, float] = {}  # process peak RSS at the end of each phase
        self.cuda_mb: dict[str, float] = {}  # peak CUDA memory allocated within each phase

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize(self.device)
                self.cuda_mb[name] = max(self.cuda_mb.get(name, 0.0),
                                         torch.cuda.max_memory_allocated(self.device) / 2**20)
            self.add(name, time.perf_counter() - start)
            self.rss_mb[name] = peak_rss_mb()

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    def carve(self, parent: str, part: str, seconds: float) -> None:
        """Move `seconds` timed inside phase `parent` to their own phase `part` (e.g. the cache fill
        inside distillation), so the phases add up to the wall time."""
        seconds = min(float(seconds), self.seconds.get(parent, 0.0))
        self.add(parent, -seconds)
        self.add(part, seconds)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for a record (MLflow run, trial table row, JSON): seconds per phase, the
        process's peak RSS, and peak CUDA memory per phase and overall where a GPU was used."""
        out = {f"phase_seconds/{k}": round(v, 3) for k, v in self.seconds.items()}
        out["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if self.cuda_mb:
            out.update({f"peak_cuda_mb/{k}": round(v, 1) for k, v in self.cuda_mb.items()})
            out["peak_cuda_mb"] = round(max(self.cuda_mb.values()), 1)
        return out

    def summary(self) -> str:
        """One line: 'zoo 12.3 s, distill 45.6 s, ...; peak RSS 1234 MB' (for a CLI's last line)."""
        parts = [f"{k} {v:.1f} s" for k, v in self.seconds.items()]
        mem = f"peak RSS {peak_rss_mb():.0f} MB"
        if self.cuda_mb:
            mem += f", peak CUDA {max(self.cuda_mb.values()):.0f} MB"
        return ", ".join(parts) + "; " + mem
