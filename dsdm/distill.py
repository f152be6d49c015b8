"""Algorithm 1 of DSDM (and DM as a special case): optimise the synthetic set.

Per iteration: pick a zoo model (or a fresh random ConvNet for DM), push a real and the
synthetic batch of every class through the same Siamese augmentation, match prototypes
(L_proto), covariances (L_SD, Eq. for semantic diversity) and the memory-bank prototype
(L_h), step the synthetic pixels, then update the memory bank.

Two paths compute the same objective:
- `reference` (`distill.fast=False`, `dsdm distill --reference`): the straightforward loop
  of the reference code (fresh real batch and augmentation per class per iteration, one
  optimiser step per class, a separate memory-bank forward after the update);
- `fast` (default): real features of each zoo snapshot are computed once over a fixed
  pool of K Siamese augmentation draws (and K fixed real batches) and cached as centred
  matrices (the covariance term uses a Gram identity, never a d x d matrix); all classes
  go through one synthetic pass (instance norm keeps samples independent; on CPU in chunks of
  ~40 images, which keeps the memory-bound ops in cache) and the per-class losses are computed
  batched over classes; one joint step; the memory bank
  takes the prototypes of that same forward (same draw, one step behind). Optional:
  torch.compile of the synthetic forward (`distill.compile`), bf16 autocast
  (`distill.precision`), reduced-precision storage and an LRU cap of the cache
  (`distill.cache_dtype`, `distill.cache_max_mb`).
  docs/benchmarks.md says where this objective differs, what it costs in accuracy and
  what each speed lever gave (`python -m dsdm.bench`).
"""
from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch

from dsdm.augment import MATCH_OPS, augment, decode, encode_tiles, ops_for, sample_aug_params
from dsdm.config import Config
from dsdm.coreset import check_ipc
from dsdm.data import Dataset
from dsdm.errors import DsdmError
from dsdm.losses import dsdm_class_loss, precompute_real
from dsdm.memory import MemoryBank
from dsdm.synthetic import SyntheticSet, atomic_torch_save, safe_torch_load, tile_grid
from dsdm.train import build_model
from dsdm.zoo import ModelZoo, zoo_arch

CHECKPOINT_FORMAT = "dsdm-distill-checkpoint"
# Keys a checkpoint may be resumed under with another value: they change when and what is
# logged or evaluated, how far to iterate, or float rounding only -- never the trajectory so far.
RESUMABLE_KEYS = frozenset({"budget", "distill.iterations", "distill.log_every", "distill.checkpoint_every",
                            "distill.compile", "distill.forward_chunk", "distill.cache_max_mb"})
LogFn = Callable[[dict, int], None]
TERMS = ("proto", "sd", "h", "total")
# distill.compile=auto compiles the fast path's synthetic forward only for runs long enough to
# amortise the compile (about 1-3 min on 2 CPU cores; ~0.4 s saved per CIFAR-shape iteration).
COMPILE_AUTO_MIN_ITERATIONS = 1000
# distill.forward_chunk=0 (auto): images per synthetic forward on CPU. The memory-bound ops
# (instance norm, ReLU, pooling, their backward) run ~1.6x faster on 40-image chunks that stay in
# cache than on one 400-image batch (measured; docs/benchmarks.md). On GPU: one forward.
CPU_FORWARD_CHUNK = 40
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = ("fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")


def image_lr(cfg: Config) -> float:
    """Spec: base 0.1 scaled by IPC/10 for DSDM (CIFAR: 0.01/0.1/0.5); DM uses 1.0."""
    d = cfg.distill
    if d.lr_img > 0:
        return d.lr_img
    return 1.0 if d.method == "dm" else 0.1 * d.ipc / 10


def init_synthetic(dataset: Dataset, ipc: int, grid: tuple[int, int], generator: torch.Generator):
    """Every tile of every stored image starts as a different real image of its class."""
    tiles = grid[0] * grid[1]
    check_ipc(dataset, ipc, per_image=tiles)
    images, labels = [], []
    for c, idx in enumerate(dataset.class_indices()):
        pick = idx[torch.randperm(len(idx), generator=generator)[: ipc * tiles]]
        images.append(encode_tiles(dataset.train_x[pick], grid))  # (ipc, C, H, W)
        labels.append(torch.full((ipc,), c, dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """x with exactly the NCHW strides (C*H*W, H*W, W, 1). DSA's crop returns channels_last
    strides; for 1-channel images those are also "contiguous", so .contiguous() keeps them, and
    a conv then still picks channels_last and hands GroupNorm a channels_last tensor."""
    if x.dim() != 4:
        return x.contiguous()
    n, c, h, w = x.shape
    if x.stride() == (c * h * w, h * w, w, 1):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """g(x) on an NCHW batch: the CPU GroupNorm (the ConvNet's instance norm) is 5-20x slower on
    channels_last than on NCHW, forward and backward (measured; docs/benchmarks.md)."""
    return net.embed(nchw(x))


def chunk_size(n: int, target: int) -> int:
    """Images per forward for a batch of n: n if target <= 0 or n <= target, else a divisor of n
    near target (equal chunks: one compiled graph), else target itself."""
    if target <= 0 or n <= target:
        return n
    divisors = [c for c in range(max(1, target // 2), int(target * 1.5) + 1) if n % c == 0]
    return min(divisors, key=lambda c: (abs(c - target), c)) if divisors else target


def embed_chunked(fn, net: torch.nn.Module, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn(net, x) over chunks of x (samples are independent: instance norm), concatenated."""
    size = chunk_size(x.shape[0], chunk)
    if size >= x.shape[0]:
        return fn(net, x)
    return torch.cat([fn(net, part) for part in x.split(size)])


# --- the real side, cached -------------------------------------------------------------------

class RealStats:
    """The real side of every class's loss for one (zoo model, draw), stacked over classes.

    mean (C, d) float32; xc (C, n, d) centred features in the cache's storage dtype, zero rows
    past counts[c] (a class with fewer than batch_real images: zero rows change no Gram product);
    norm_sq (C,) = ||Cov_T,c||_F^2 (float32, computed before any down-cast); dof (C,) = max(n_c - 1, 1).
    Indexing/iterating gives per-class (mean, xc, norm_sq) as `losses.precompute_real` would.
    """

    __slots__ = ("mean", "xc", "norm_sq", "dof", "counts")

    def __init__(self, mean, xc, norm_sq, dof, counts):
        self.mean, self.xc, self.norm_sq, self.dof, self.counts = mean, xc, norm_sq, dof, counts

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, c: int):
        return self.mean[c], self.xc[c, : self.counts[c]], self.norm_sq[c]

    def __iter__(self):
        return (self[c] for c in range(len(self)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mean, self.xc, self.norm_sq, self.dof))


class RealFeatureCache:
    """Fast path: per (zoo model m, augmentation draw k) the real side of every class's loss.

    Entry (m, k) holds, for a fixed real batch per class, its mean, centred features and
    ||Cov||_F^2 under draw k. Each entry is a pure function of (seed, m, k), so a resumed run
    recomputes exactly what it had, and an entry evicted under `max_bytes` (least recently used
    first) is recomputed bit-identically when needed again.
    Size: K x M entries of C x batch_real x d values (CIFAR-10, K=16, M=10, n=256, d=2048:
    160 x 21 MB = 3.4 GB in float32, half in bfloat16/float16).
    """

    def __init__(self, dataset: Dataset, batch_real: int, seed: int, device: torch.device,
                 dtype: torch.dtype = torch.float32, max_bytes: int = 0, chunk: int = 0):
        self.dataset, self.batch_real, self.seed, self.device = dataset, batch_real, seed, device
        self.dtype, self.max_bytes, self.chunk = dtype, int(max_bytes), int(chunk)
        self.entries: OrderedDict[tuple[int, int], RealStats] = OrderedDict()
        self.fills = self.hits = self.evictions = 0
        self.fill_seconds = 0.0

    def real_batch(self, m: int, k: int) -> list[torch.Tensor]:
        """Indices into train_x of the fixed real batch of every class for entry (m, k)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + m * 1009 + k)
        return [idx[torch.randperm(len(idx), generator=g)[: self.batch_real]] for idx in self.dataset.class_indices()]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @torch.no_grad()
    def get(self, m: int, k: int, net: torch.nn.Module, params) -> RealStats:
        key = (m, k)
        if key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        start = time.perf_counter()
        ds = self.dataset
        means, xcs, norms, counts = [], [], [], []
        for pick in self.real_batch(m, k):
            x = augment(ds.train_x[pick].to(self.device), ds.mean, ds.std, params)
            f = embed_chunked(embed, net, x, self.chunk).float()
            xc, norm_sq = precompute_real(f)  # norm in float32, before storage rounding
            means.append(f.mean(0))
            xcs.append(xc)
            norms.append(norm_sq)
            counts.append(len(pick))
        n = max(counts)
        xc = torch.zeros(len(counts), n, xcs[0].shape[1], dtype=self.dtype, device=self.device)
        for c, x in enumerate(xcs):
            xc[c, : len(x)] = x
        dof = torch.tensor([float(max(c - 1, 1)) for c in counts], device=self.device)
        entry = RealStats(torch.stack(means), xc, torch.stack(norms), dof, counts)
        self.entries[key] = entry
        self.fills += 1
        while self.max_bytes and len(self.entries) > 1 and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)
            self.evictions += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.fill_seconds += time.perf_counter() - start
        return entry


def batched_class_losses(f_syn: torch.Tensor, real: RealStats, h: torch.Tensor | None,
                         lambda1: float, lambda2: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`losses.dsdm_class_loss` for all classes at once (same formulas, bmm instead of a loop).

    f_syn: (C, m, d) synthetic features, class c in row c; real: cached RealStats; h: (C, d)
    memory-bank prototypes or None (L_h off). Returns per-class totals (C,) carrying the graph
    and per-class detached terms {"proto", "sd", "h", "total"} of shape (C,).
    """
    C, m, d = f_syn.shape
    mu = f_syn.mean(1)  # (C, d)
    l_proto = (real.mean.to(f_syn.dtype) - mu).square().sum(1)  # (C,)
    yc = f_syn - mu[:, None]  # (C, m, d)
    dm = float(max(m - 1, 1))
    xc = real.xc.to(f_syn.dtype)
    cross = torch.bmm(xc, yc.transpose(1, 2)).square().sum((1, 2)) / (real.dof * dm)  # ||Xc Yc^T||^2/((n-1)(m-1))
    syn = torch.bmm(yc, yc.transpose(1, 2)).square().sum((1, 2)) / (dm * dm)  # ||Yc Yc^T||^2/(m-1)^2
    l_sd = (real.norm_sq - 2.0 * cross + syn).clamp_min(0.0) / d
    l_h = (mu - h.detach().to(f_syn.dtype)).square().sum(1) / d if h is not None else torch.zeros_like(l_proto)
    total = l_proto
    if lambda1 != 0:  # as dsdm_class_loss: zero weights are skipped, so the total stays exact
        total = total + lambda1 * l_sd
    if lambda2 != 0 and h is not None:
        total = total + lambda2 * l_h
    return total, {"proto": l_proto.detach(), "sd": l_sd.detach(), "h": l_h.detach(), "total": total.detach()}


def _maybe_compile(fn, enabled: bool):
    """torch.compile(fn), falling back to eager (once, with a warning) if the backend fails."""
    if not enabled:
        return fn
    compiled = torch.compile(fn, dynamic=False)
    state = {"fn": compiled}

    def call(*args):
        try:
            return state["fn"](*args)
        except DsdmError:
            raise
        except Exception as exc:  # inductor/compiler missing or failing: eager computes the same
            if state["fn"] is fn:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          "running the fast path eagerly (set distill.compile=off to skip the attempt)")
            state["fn"] = fn
            return fn(*args)

    return call


class Distiller:
    """Holds the synthetic set, its optimiser, the memory bank and the RNG; `step()` is one
    iteration of Algorithm 1; `state_dict()` captures all of it for exact resume."""

    def __init__(self, dataset: Dataset, cfg: Config, zoo: ModelZoo | None, device: torch.device | str = "cpu"):
        d = cfg.distill
        self.dataset, self.cfg, self.zoo, self.device = dataset, cfg, zoo, torch.device(device)
        if d.pretrained and zoo is None:
            raise DsdmError("distillation with pre-trained models needs a zoo; pass --zoo DIR or let distill pre-train one")
        if d.pretrained:
            if zoo.dataset.lower() != dataset.name.lower():
                raise DsdmError(f"the zoo was pre-trained on {zoo.dataset}, not {dataset.name}; "
                                f"pass a zoo pre-trained on {dataset.name}")
            if d.num_models > zoo.num_models:
                raise DsdmError(f"M={d.num_models} is larger than the zoo ({zoo.num_models} models); lower --models or pre-train more")
            if d.pretrain_epochs not in zoo.epochs:
                raise DsdmError(f"E={d.pretrain_epochs} is not a snapshot of the zoo {zoo.epochs}; pick one of those epochs")
        if d.compile not in COMPILE_MODES:
            raise DsdmError(f"distill.compile must be one of {', '.join(COMPILE_MODES)} (got '{d.compile}')")
        if d.precision not in PRECISIONS:
            raise DsdmError(f"distill.precision must be one of {', '.join(PRECISIONS)} (got '{d.precision}')")
        if d.cache_dtype not in CACHE_DTYPES:
            raise DsdmError(f"distill.cache_dtype must be one of {', '.join(CACHE_DTYPES)} (got '{d.cache_dtype}')")
        if d.cache_max_mb < 0:
            raise DsdmError(f"distill.cache_max_mb must be >= 0 (0 = no cap), got {d.cache_max_mb}")
        if d.forward_chunk < 0:
            raise DsdmError(f"distill.forward_chunk must be >= 0 (0 = auto), got {d.forward_chunk}")
        self.generator = torch.Generator().manual_seed(d.seed)
        self.grid = tile_grid(d.factor, dataset.kind)
        images, self.labels = init_synthetic(dataset, d.ipc, self.grid, self.generator)
        self.images = images.to(self.device).requires_grad_(True)  # (C*ipc, ch, H, W) in [0, 1]
        self.optimizer = torch.optim.SGD([self.images], lr=image_lr(cfg), momentum=d.momentum)
        self.arch = zoo.arch if zoo is not None else zoo_arch(cfg.zoo, dataset)
        probe = build_model(self.arch, dataset.channels, dataset.num_classes, dataset.image_size, 0)
        self.bank = MemoryBank(dataset.num_classes, probe.feature_dim, d.alpha, d.warmup, device=self.device)
        self.ops = ops_for(dataset.name, MATCH_OPS)
        pool_gen = torch.Generator().manual_seed(d.seed + 7919)
        self.aug_pool = [sample_aug_params(self.ops, 1, pool_gen, device=self.device) for _ in range(d.aug_pool)]
        # images per synthetic (and cache-fill) forward of the fast path; 0 = all at once
        self.forward_chunk = d.forward_chunk or (0 if self.device.type == "cuda" else CPU_FORWARD_CHUNK)
        self.cache = RealFeatureCache(dataset, d.batch_real, d.seed, self.device, CACHE_DTYPES[d.cache_dtype],
                                      d.cache_max_mb * 2**20, self.forward_chunk)
        self.class_slices = [slice(c * d.ipc, (c + 1) * d.ipc) for c in range(dataset.num_classes)]
        self.iteration = 0
        self._nets: dict[int, torch.nn.Module] = {}
        self.compiled = d.fast and (d.compile == "on" or (d.compile == "auto" and d.iterations >= COMPILE_AUTO_MIN_ITERATIONS))
        self._syn_embed = _maybe_compile(embed, self.compiled)

    # --- Algorithm 1 ------------------------------------------------------------------------
    def pick_network(self) -> tuple[int, torch.nn.Module]:
        """A random zoo model at snapshot E, or (DM / no PM) a freshly initialised ConvNet."""
        d = self.cfg.distill
        if not d.pretrained:
            seed = int(torch.randint(2**31 - 1, (), generator=self.generator))
            net = build_model(self.arch, self.dataset.channels, self.dataset.num_classes, self.dataset.image_size, seed)
            return -1, net.to(self.device).eval().requires_grad_(False)
        m = int(torch.randint(d.num_models, (), generator=self.generator))
        if m not in self._nets:  # weights stay in memory: no disk read per iteration
            self._nets[m] = self.zoo.model(m, d.pretrain_epochs, self.device)
        return m, self._nets[m]

    def step(self) -> dict[str, float]:
        with torch.no_grad():
            self.images.clamp_(0, 1)  # pixels live in [0, 1]
        m, net = self.pick_network()
        use_fast = self.cfg.distill.fast and m >= 0
        terms = self._step_fast(m, net) if use_fast else self._step_reference(net)
        self.iteration += 1
        if not math.isfinite(terms["total"]):
            raise DsdmError(f"distillation loss became {terms['total']} at iteration {self.iteration}; "
                            "lower --lr-img or the lambdas (the last checkpoint is intact)")
        return terms

    def _use_h(self) -> bool:
        return self.cfg.distill.lambda2 > 0 and self.bank.active(self.iteration)

    def _class_loss(self, c: int, f_real, f_syn, real=None):
        d = self.cfg.distill
        # L_h needs h_c: not before the bank's first update (warmup=0 starts without one)
        h = self.bank.get(c) if self._use_h() and bool(self.bank.initialised[c]) else None
        return dsdm_class_loss(f_real, f_syn, h, d.lambda1, d.lambda2, real=real)

    def _syn_batch(self, c: int):
        x, _ = decode(self.images[self.class_slices[c]], self.labels[self.class_slices[c]], self.grid)
        return x  # (ipc * tiles, ch, H, W)

    def reference_class_loss(self, net, c: int, params, pick: torch.Tensor):
        """The straightforward loss of class c: real batch `pick` and the class's synthetic images
        through the same draw `params`, features, dsdm_class_loss. Returns (loss, terms)."""
        ds = self.dataset
        with torch.no_grad():
            f_real = embed(net, augment(ds.train_x[pick].to(self.device), ds.mean, ds.std, params))
        f_syn = embed(net, augment(self._syn_batch(c), ds.mean, ds.std, params))
        return self._class_loss(c, f_real, f_syn)

    def _step_reference(self, net) -> dict[str, float]:
        d, ds = self.cfg.distill, self.dataset
        totals: dict[str, float] = {}
        joint = 0.0
        for c, idx in enumerate(ds.class_indices()):
            params = sample_aug_params(self.ops, 1, self.generator, device=self.device)  # Siamese draw
            pick = idx[torch.randperm(len(idx), generator=self.generator)[: d.batch_real]]
            loss, terms = self.reference_class_loss(net, c, params, pick)
            if d.per_class_step:  # reference DSDM: one step per class
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            else:
                joint = joint + loss
            _accumulate(totals, terms)
        if not d.per_class_step:  # DM: one step on the summed loss
            self.optimizer.zero_grad(set_to_none=True)
            joint.backward()
            self.optimizer.step()
        if d.lambda2 > 0:  # memory bank: prototypes of the updated set under the same model
            with torch.no_grad():
                for c in range(ds.num_classes):
                    params = sample_aug_params(self.ops, 1, self.generator, device=self.device)
                    self.bank.update(c, embed(net, augment(self._syn_batch(c), ds.mean, ds.std, params)).mean(0))
        return totals

    def _autocast(self):
        if self.cfg.distill.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def fast_class_losses(self, m: int, net, k: int):
        """All classes' losses under zoo model m and pooled draw k, the real side from the cache.
        Returns (per-class losses (C,), per-class terms, synthetic features (C, ipc*tiles, d))."""
        d, ds = self.cfg.distill, self.dataset
        params = self.aug_pool[k]
        real = self.cache.get(m, k, net, params)
        x, _ = decode(self.images, self.labels, self.grid)  # all classes at once
        with self._autocast():
            x = augment(x, ds.mean, ds.std, params)
            f_syn = embed_chunked(self._syn_embed, net, x, self.forward_chunk)  # (C*ipc*tiles, d)
        f_syn = f_syn.float().view(ds.num_classes, -1, f_syn.shape[-1])  # (C, ipc*tiles, d), class-major
        h = self.bank.h if self._use_h() and bool(self.bank.initialised.all()) else None
        loss, terms = batched_class_losses(f_syn, real, h, d.lambda1, d.lambda2)
        return loss, terms, f_syn

    def _step_fast(self, m: int, net) -> dict[str, float]:
        d = self.cfg.distill
        k = int(torch.randint(len(self.aug_pool), (), generator=self.generator))
        loss, terms, f_syn = self.fast_class_losses(m, net, k)
        self.optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()  # one joint step: class c's loss depends on class c's pixels only
        self.optimizer.step()
        if d.lambda2 > 0:  # reuse this forward's prototypes (same draw, one step behind)
            self.bank.update_all(f_syn.detach().mean(1))
        sums = torch.stack([terms[key].sum() for key in TERMS]).tolist()  # one host sync
        return dict(zip(TERMS, sums))

    # --- outputs, checkpoints ----------------------------------------------------------------
    def synthetic_set(self) -> SyntheticSet:
        ds = self.dataset
        return SyntheticSet(self.images.detach().clamp(0, 1).cpu().clone(), self.labels.clone(), self.grid,
                            ds.name, ds.mean, ds.std, self.cfg.plain())

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "images": self.images.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict(), "bank": self.bank.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.bank.load_state_dict(state["bank"])
        self.generator.set_state(state["generator"])
        self.iteration = int(state["iteration"])

    def save_checkpoint(self, path: str | Path) -> None:
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": 1, "config": self.cfg.plain(),
                           "state": self.state_dict()}, path)

    def load_checkpoint(self, path: str | Path) -> None:
        payload = safe_torch_load(path, expect=CHECKPOINT_FORMAT, what="distillation checkpoint",
                                  fix="delete it to start over, or pass the checkpoint of this run")
        differ = config_mismatch(payload["config"], self.cfg)
        if differ:
            raise DsdmError(f"checkpoint '{path}' was written by a different config ({', '.join(differ)}); "
                            "delete it or rerun with that config")
        self.load_state_dict(payload["state"])

    def run(self, checkpoint: str | Path | None = None, log: LogFn | None = None) -> SyntheticSet:
        """Iterate to cfg.distill.iterations, resuming from and writing `checkpoint`."""
        d = self.cfg.distill
        if checkpoint is not None and Path(checkpoint).is_file():
            self.load_checkpoint(checkpoint)
        start, window, steps = time.time(), {}, 0
        while self.iteration < d.iterations:
            _accumulate(window, self.step())
            steps += 1
            if log is not None and (self.iteration % d.log_every == 0 or self.iteration == d.iterations):
                log({**{f"loss/{k}": v / steps for k, v in window.items()},
                     "seconds": time.time() - start}, self.iteration)
                window, steps = {}, 0
            if checkpoint is not None and (self.iteration % d.checkpoint_every == 0 or self.iteration == d.iterations):
                self.save_checkpoint(checkpoint)
        return self.synthetic_set()


def config_mismatch(saved: dict, cfg: Config) -> list[str]:
    """'key: saved -> now' for each setting that would change the trajectory on resume.

    A key the checkpoint lacks (added to Config since) counts as its default value."""
    now, defaults = cfg.plain(), Config().plain()
    return [f"{k}: {saved.get(k, defaults[k])!r} -> {v!r}" for k, v in now.items()
            if not k.startswith("eval.") and k not in RESUMABLE_KEYS and saved.get(k, defaults[k]) != v]


def _accumulate(totals: dict, terms: dict) -> None:
    """Sum loss terms (over classes within a step, over steps within a log window)."""
    for key, value in terms.items():
        totals[key] = totals.get(key, 0.0) + float(value)
