"""The fast path's real side and batching: a pool of (real batch, augmentation draw) slots per
zoo model, the cache of their real features, and the chunked NCHW forward.

Slot (m, k) of the pool holds, for zoo model m, a real batch of every class and one Siamese
augmentation draw. Its entry at generation g (how often the slot was redrawn) is a pure function
of (seed, m, k, g), so a resumed run recomputes exactly what it had, and an entry evicted by the
cache's memory cap is recomputed bit-identically. With `distill.aug_refresh` R > 0 a slot is
redrawn (new real batches, new draw) after R uses: R = 1 gives every iteration a fresh real batch
and draw, as the reference loop has, at the cost of one cache fill per iteration; R = 0 keeps the
K x M slots fixed for the whole run.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch

from dsdm.augment import AugParams, augment, nchw, sample_aug_params
from dsdm.data import Dataset
from dsdm.losses import RealSide, precompute_real

EmbedFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


# --- the forward ------------------------------------------------------------------------------

def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """g(x) on an NCHW batch: the CPU GroupNorm (the ConvNet's instance norm) is 5-20x slower on
    channels_last than on NCHW, forward and backward (measured; docs/benchmarks.md)."""
    return net.embed(nchw(x))


def embed_as_is(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """g(x) on whatever strides x has (`distill.nchw_input=false`: the lever's 'before')."""
    return net.embed(x)


def chunk_size(n: int, target: int) -> int:
    """Images per forward for a batch of n: n if target <= 0 or n <= target, else a divisor of n
    near target (equal chunks: one compiled graph), else target itself."""
    if target <= 0 or n <= target:
        return n
    divisors = [c for c in range(max(1, target // 2), int(target * 1.5) + 1) if n % c == 0]
    return min(divisors, key=lambda c: (abs(c - target), c)) if divisors else target


def embed_chunked(fn: EmbedFn, net: torch.nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn(net, x) over chunks of x (samples are independent: instance norm), concatenated."""
    size = chunk_size(x.shape[0], chunk)
    if size >= x.shape[0]:
        return fn(net, x)
    return torch.cat([fn(net, part) for part in x.split(size)])


# --- the pool of slots ------------------------------------------------------------------------

def _seed(*parts: int) -> int:
    """A generator seed mixed from integers (numpy's SeedSequence: no collisions by arithmetic)."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class DrawPool:
    """K slots per zoo model; which real batches and which augmentation draw each slot holds now.

    Generation 0 of slot (m, k) is the pool of the first fast path (draw k shared by all
    models, real batch seeded by (seed, m, k)), so runs without refresh are unchanged.
    State (checkpointed): per slot its generation and its uses since the last redraw.
    """

    def __init__(self, dataset: Dataset, ops, size: int, models: int, batch_real: int, seed: int,
                 refresh: int, device: torch.device):
        self.dataset, self.ops, self.batch_real, self.seed = dataset, ops, batch_real, seed
        self.refresh, self.device = int(refresh), device
        pool_gen = torch.Generator().manual_seed(seed + 7919)
        self.first_draws = [sample_aug_params(ops, 1, pool_gen, device=device) for _ in range(size)]
        self.generation = torch.zeros(max(models, 1), size, dtype=torch.long)  # (M, K)
        self.uses = torch.zeros_like(self.generation)

    @property
    def size(self) -> int:
        return len(self.first_draws)

    def params(self, m: int, k: int) -> AugParams:
        """The Siamese augmentation draw slot (m, k) holds now."""
        g = int(self.generation[m, k])
        if g == 0:
            return self.first_draws[k]
        gen = torch.Generator().manual_seed(_seed(self.seed, 1, m, k, g))
        return sample_aug_params(self.ops, 1, gen, device=self.device)

    def real_batch(self, m: int, k: int) -> list[torch.Tensor]:
        """Indices into train_x of the real batch of every class slot (m, k) holds now."""
        g = int(self.generation[m, k])
        seed = self.seed * 1_000_003 + m * 1009 + k if g == 0 else _seed(self.seed, 0, m, k, g)
        gen = torch.Generator().manual_seed(seed)
        return [idx[torch.randperm(len(idx), generator=gen)[: self.batch_real]] for idx in self.dataset.class_indices()]

    def used(self, m: int, k: int) -> None:
        """Count one use of slot (m, k); after `refresh` uses it holds a new generation."""
        self.uses[m, k] += 1
        if self.refresh and int(self.uses[m, k]) >= self.refresh:
            self.generation[m, k] += 1
            self.uses[m, k] = 0

    def state_dict(self) -> dict:
        return {"generation": self.generation.clone(), "uses": self.uses.clone()}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the slots' generations; None (a checkpoint from before refresh existed) = all 0."""
        if state is None:
            self.generation.zero_(), self.uses.zero_()
            return
        self.generation, self.uses = state["generation"].clone(), state["uses"].clone()


# --- the cache of real features -----------------------------------------------------------------

class RealStats:
    """The real side of every class's loss for one slot, stacked over classes.

    mean (C, d) float32; xc (C, n, d) centred features in the cache's storage dtype, zero rows
    past counts[c] (a class with fewer than batch_real images: zero rows change no Gram product);
    norm_sq (C,) = ||Cov_T,c||_F^2 (float32, computed before any down-cast); dof (C,) = max(n_c - 1, 1).
    Indexing gives per-class (mean, xc, norm_sq) as `losses.precompute_real` would.
    """

    __slots__ = ("mean", "xc", "norm_sq", "dof", "counts", "generation")

    def __init__(self, mean, xc, norm_sq, dof, counts, generation: int = 0):
        self.mean, self.xc, self.norm_sq, self.dof, self.counts = mean, xc, norm_sq, dof, counts
        self.generation = generation

    @property
    def side(self) -> RealSide:
        return RealSide(self.mean, self.xc, self.norm_sq, self.dof)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, c: int):
        return self.mean[c], self.xc[c, : self.counts[c]], self.norm_sq[c]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.xc, self.norm_sq, self.dof))


class RealFeatureCache:
    """Per slot (m, k) of a DrawPool, the real side of every class's loss under zoo model m.

    An entry is refilled when its slot moves to a new generation (refresh) and, beyond
    `max_bytes`, evicted least recently used first (recomputed bit-identically when needed).
    Size: K x M entries of C x batch_real x d values (CIFAR-10, K=16, M=10, n=256, d=2048:
    160 x 21 MB = 3.4 GB in float32, half in bfloat16/float16).
    """

    def __init__(self, pool: DrawPool, dtype: torch.dtype = torch.float32, max_bytes: int = 0, chunk: int = 0,
                 embed_fn: EmbedFn = embed):
        self.pool, self.dtype, self.max_bytes, self.chunk, self.embed_fn = pool, dtype, int(max_bytes), int(chunk), embed_fn
        self.entries: OrderedDict[tuple[int, int], RealStats] = OrderedDict()
        self.fills = self.hits = self.evictions = 0
        self.fill_seconds = 0.0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def get(self, m: int, k: int, net: torch.nn.Module) -> RealStats:
        key, generation = (m, k), int(self.pool.generation[m, k])
        entry = self.entries.get(key)
        if entry is not None and entry.generation == generation:
            self.hits += 1
            self.entries.move_to_end(key)
            return entry
        start = time.perf_counter()
        entry = self.fill(net, self.pool.real_batch(m, k), self.pool.params(m, k), generation)
        self.entries[key] = entry
        self.entries.move_to_end(key)
        self.fills += 1
        while self.max_bytes and len(self.entries) > 1 and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)
            self.evictions += 1
        if self.pool.device.type == "cuda":
            torch.cuda.synchronize(self.pool.device)
        self.fill_seconds += time.perf_counter() - start
        return entry

    @torch.no_grad()
    def fill(self, net: torch.nn.Module, picks: list[torch.Tensor], params: AugParams, generation: int = 0) -> RealStats:
        """Real features of every class's batch `picks[c]` under draw `params`, centred and stacked."""
        ds, device = self.pool.dataset, self.pool.device
        means, xcs, norms, counts = [], [], [], []
        for pick in picks:
            x = augment(ds.train_x[pick].to(device), ds.mean, ds.std, params)
            f = embed_chunked(self.embed_fn, net, x, self.chunk).float()
            xc, norm_sq = precompute_real(f)  # norm in float32, before storage rounding
            means.append(f.mean(0))
            xcs.append(xc)
            norms.append(norm_sq)
            counts.append(len(pick))
        xc = torch.zeros(len(counts), max(counts), xcs[0].shape[1], dtype=self.dtype, device=device)
        for c, x in enumerate(xcs):
            xc[c, : len(x)] = x
        dof = torch.tensor([float(max(c - 1, 1)) for c in counts], device=device)
        return RealStats(torch.stack(means), xc, torch.stack(norms), dof, counts, generation)
