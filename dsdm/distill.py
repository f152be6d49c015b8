"""Algorithm 1 of DSDM (and DM as a special case): optimise the synthetic set.

Per iteration: pick a zoo model (or a fresh random ConvNet for DM), push a real and the
synthetic batch of every class through the same Siamese augmentation, match prototypes
(L_proto), covariances (L_SD, Eq. for semantic diversity) and the memory-bank prototype
(L_h), step the synthetic pixels, then update the memory bank.

Two paths compute the same objective:
- `reference` (`distill.fast=False`, `dsdm distill --reference`): the straightforward loop
  of the reference code (fresh real batch and augmentation per class per iteration, one
  optimiser step per class, a separate memory-bank forward after the update);
- `fast` (default): real features of each zoo snapshot come from a pool of K (real batch,
  Siamese draw) slots per model, cached as centred matrices (`dsdm.fastpath`; the covariance
  term uses a Gram identity, never a d x d matrix); with `distill.aug_refresh` R > 0 a slot is
  redrawn after R uses (R = 1: a fresh batch and draw every iteration, as the reference). All
  classes go through one synthetic pass (instance norm keeps samples independent; on CPU in
  chunks of ~40 images) and the losses are computed batched over classes. With
  `distill.per_class_step` (DSDM's default) the C per-class optimiser steps of the reference are
  replayed exactly: class c's loss is taken at the pixels the reference would have after the
  steps of classes 0..c-1 (which move class c by its momentum alone), so one forward serves all
  C steps. The memory bank takes the prototypes of that same forward (same draw, before the
  step) unless `distill.bank_forward`. Optional: torch.compile of the synthetic forward
  (`distill.compile`), bf16 autocast (`distill.precision`), reduced-precision storage and an
  LRU cap of the cache (`distill.cache_dtype`, `distill.cache_max_mb`).
  docs/benchmarks.md says where this objective differs, what it costs in accuracy and
  what each speed lever gave (`python -m benchmarks.distill`).

`Distiller.run` is the only loop: the CLI and the Tune trainable call it with `RunHooks`.
Why one file over 350 lines: `Distiller` is one class (loop, checkpoint state, fast path) that shares its state.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dsdm import checkpoint as checkpoint_file
from dsdm.augment import augment, decode, encode_tiles, sample_aug_params
from dsdm.config import Config
from dsdm.coreset import check_ipc
from dsdm.data import Dataset
from dsdm.errors import DsdmError
from dsdm.fastpath import DrawPool, RealFeatureCache, embed, embed_as_is, embed_chunked
from dsdm.losses import TERMS, RealSide, dsdm_class_loss, dsdm_losses
from dsdm.memory import MemoryBank
from dsdm.recipes import match_ops
from dsdm.synthetic import SyntheticSet, tile_grid
from dsdm.train import compile_static
from dsdm.models import build_model
from dsdm.zoo import ModelZoo, zoo_arch

LogFn = Callable[[dict, int], None]
# distill.compile=auto compiles the fast path's synthetic forward only for runs long enough to
# amortise the compile (about 1-3 min on 2 CPU cores; ~0.4 s saved per CIFAR-shape iteration).
COMPILE_AUTO_MIN_ITERATIONS = 1000
# distill.forward_chunk=0 (auto): images per synthetic forward on CPU. The memory-bound ops
# (instance norm, ReLU, pooling, their backward) run ~1.6x faster on 40-image chunks that stay in
# cache than on one 400-image batch (measured; docs/benchmarks.md). On GPU: one forward.
CPU_FORWARD_CHUNK = 40
# names of distill.cache_dtype (validated by Config.validate) -> torch dtypes
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunHooks:
    """What `Distiller.run` calls besides iterating; all optional.

    A report step is an iteration that is a multiple of log_every or checkpoint_every, or the
    last one. At each: the proxy (when due), then `log(metrics, iteration)` with the loss terms
    averaged over exactly the iterations since the previous report (`loss/<term>`), `seconds`
    since this run started, `proxy_val_acc` when a proxy was evaluated; at checkpoint steps then
    the checkpoint file is written and `checkpoint(metrics, iteration)` called.
    """
    log: LogFn | None = None
    checkpoint: LogFn | None = None
    after_step: Callable[[int], None] | None = None  # after every iteration, before its report (fault points)
    proxy: Callable[["Distiller"], float] | None = None  # proxy accuracy of the current set
    proxy_every: int = 0  # evaluate the proxy at report steps that are multiples of this (0 = never)


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


def _maybe_compile(fn, enabled: bool):
    """torch.compile(fn), falling back to eager (once, with a warning) if the backend fails."""
    if not enabled:
        return fn
    compiled = compile_static(fn)
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
    """Holds the synthetic set, its optimiser, the memory bank, the draw pool and the RNG;
    `step()` is one iteration of Algorithm 1; `state_dict()` captures all of it for exact resume."""

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
        self.generator = torch.Generator().manual_seed(d.seed)
        self.grid = tile_grid(d.factor, dataset.kind)
        images, self.labels = init_synthetic(dataset, d.ipc, self.grid, self.generator)
        self.images = images.to(self.device).requires_grad_(True)  # (C*ipc, ch, H, W) in [0, 1]
        self.optimizer = torch.optim.SGD([self.images], lr=image_lr(cfg), momentum=d.momentum)
        self.arch = zoo.arch if zoo is not None else zoo_arch(cfg.zoo, dataset)
        probe = build_model(self.arch, dataset.channels, dataset.num_classes, dataset.image_size, 0)
        self.bank = MemoryBank(dataset.num_classes, probe.feature_dim, d.alpha, d.warmup, device=self.device)
        self.ops = match_ops(d.match_protocol, dataset.name, d.factor, d.ipc)  # the recipe table's row
        self.embed = embed if d.nchw_input else embed_as_is
        # images per synthetic (and cache-fill) forward of the fast path; 0 = all at once
        self.forward_chunk = d.forward_chunk or (0 if self.device.type == "cuda" else CPU_FORWARD_CHUNK)
        self.pool = DrawPool(dataset, self.ops, d.aug_pool, d.num_models, d.batch_real, d.seed, d.aug_refresh, self.device)
        self.cache = RealFeatureCache(self.pool, CACHE_DTYPES[d.cache_dtype], d.cache_max_mb * 2**20,
                                      self.forward_chunk, self.embed)
        self.class_slices = [slice(c * d.ipc, (c + 1) * d.ipc) for c in range(dataset.num_classes)]
        self.iteration = 0
        self._nets: dict[int, torch.nn.Module] = {}
        self.compiled = d.fast and (d.compile == "on" or (d.compile == "auto" and d.iterations >= COMPILE_AUTO_MIN_ITERATIONS))
        self._syn_embed = _maybe_compile(self.embed, self.compiled)

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

    def _syn_batch(self, c: int):
        x, _ = decode(self.images[self.class_slices[c]], self.labels[self.class_slices[c]], self.grid)
        return x  # (ipc * tiles, ch, H, W)

    def reference_class_loss(self, net, c: int, params, pick: torch.Tensor):
        """The straightforward loss of class c: real batch `pick` and the class's synthetic images
        through the same draw `params`, features, dsdm_class_loss. Returns (loss, terms)."""
        d, ds = self.cfg.distill, self.dataset
        with torch.no_grad():
            f_real = self.embed(net, augment(ds.train_x[pick].to(self.device), ds.mean, ds.std, params))
        f_syn = self.embed(net, augment(self._syn_batch(c), ds.mean, ds.std, params))
        # L_h needs h_c: not before the bank's first update (warmup=0 starts without one)
        h = self.bank.get(c) if self._use_h() and bool(self.bank.initialised[c]) else None
        return dsdm_class_loss(f_real, f_syn, h, d.lambda1, d.lambda2)

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
            self._bank_forward(net, per_class=True)
        return totals

    def _bank_forward(self, net, per_class: bool) -> None:
        """Fold the prototypes of the current set (a fresh draw per class, or one for all) into the bank."""
        ds = self.dataset
        with torch.no_grad():
            if per_class:
                for c in range(ds.num_classes):
                    params = sample_aug_params(self.ops, 1, self.generator, device=self.device)
                    self.bank.update(c, self.embed(net, augment(self._syn_batch(c), ds.mean, ds.std, params)).mean(0))
                return
            params = sample_aug_params(self.ops, 1, self.generator, device=self.device)
            x, _ = decode(self.images, self.labels, self.grid)
            f = embed_chunked(self.embed, net, augment(x, ds.mean, ds.std, params), self.forward_chunk)
            self.bank.update_all(f.view(ds.num_classes, -1, f.shape[-1]).mean(1))

    def _autocast(self):
        if self.cfg.distill.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def fast_class_losses(self, m: int, net, k: int, images: torch.Tensor | None = None):
        """All classes' losses under zoo model m and pool slot k, the real side from the cache.
        `images` (default: the set itself) are the stored pixels to match.
        Returns (per-class losses (C,), per-class terms, synthetic features (C, ipc*tiles, d))."""
        d, ds = self.cfg.distill, self.dataset
        real = self.cache.get(m, k, net)
        x, _ = decode(self.images if images is None else images, self.labels, self.grid)  # all classes at once
        with self._autocast():
            x = augment(x, ds.mean, ds.std, self.pool.params(m, k))
            f_syn = embed_chunked(self._syn_embed, net, x, self.forward_chunk)  # (C*ipc*tiles, d)
        f_syn = f_syn.float().view(ds.num_classes, -1, f_syn.shape[-1])  # (C, ipc*tiles, d), class-major
        h = self.bank.h if self._use_h() and bool(self.bank.initialised.all()) else None
        if d.batched_loss:
            loss, terms = dsdm_losses(f_syn, real.side, h, d.lambda1, d.lambda2)
        else:  # the lever's 'before': the same formula class by class
            side = real.side
            parts = [dsdm_losses(f_syn[c:c + 1], RealSide(*(t[c:c + 1] for t in side)),
                                 None if h is None else h[c:c + 1], d.lambda1, d.lambda2) for c in range(ds.num_classes)]
            loss = torch.cat([p[0] for p in parts])
            terms = {key: torch.cat([p[1][key] for p in parts]) for key in TERMS}
        return loss, terms, f_syn

    def _step_fast(self, m: int, net) -> dict[str, float]:
        d = self.cfg.distill
        k = int(torch.randint(self.pool.size, (), generator=self.generator))
        if d.per_class_step:
            at = self.per_class_pixels().requires_grad_(True)
            loss, terms, f_syn = self.fast_class_losses(m, net, k, at)
            grad, = torch.autograd.grad(loss.sum(), at)  # class c's loss depends on class c's pixels only
            self._per_class_steps(grad)
        else:  # one joint step on the summed loss
            loss, terms, f_syn = self.fast_class_losses(m, net, k)
            self.optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            self.optimizer.step()
        self.pool.used(m, k)
        if d.lambda2 > 0:
            if d.bank_forward:  # as the reference: a separate pass over the updated set, new draw
                self._bank_forward(net, per_class=False)
            else:  # reuse this forward's prototypes (same draw, before the step)
                self.bank.update_all(f_syn.detach().mean(1))
        sums = torch.stack([terms[key].sum() for key in TERMS]).tolist()  # one host sync
        return dict(zip(TERMS, sums))

    def _momentum(self) -> tuple[float, float, torch.Tensor | None]:
        group = self.optimizer.param_groups[0]
        return group["lr"], group["momentum"], self.optimizer.state.get(self.images, {}).get("momentum_buffer")

    def per_class_pixels(self) -> torch.Tensor:
        """The pixels the reference's per-class loop matches class c at: after the optimiser steps
        of classes 0..c-1, in which class c has zero gradient and moves by its momentum alone."""
        lr, mom, buf = self._momentum()
        x = self.images.detach().clone()
        if buf is None:  # first iteration: no momentum yet, nothing moves before its own step
            return x
        buf = buf.clone()
        for j in range(len(self.class_slices) - 1):  # step j moves the classes after j
            later = slice(self.class_slices[j + 1].start, None)
            buf[later].mul_(mom)  # SGD with a zero gradient: buf = mom * buf; x -= lr * buf
            x[later].add_(buf[later], alpha=-lr)
        return x

    def _per_class_steps(self, grad: torch.Tensor) -> None:
        """The reference's C optimiser steps, step c with class c's gradient only."""
        for s in self.class_slices:
            g = torch.zeros_like(self.images)
            g[s] = grad[s]
            self.images.grad = g
            self.optimizer.step()

    # --- outputs, checkpoints ----------------------------------------------------------------
    def synthetic_set(self) -> SyntheticSet:
        ds = self.dataset
        return SyntheticSet(self.images.detach().clamp(0, 1).cpu().clone(), self.labels.clone(), self.grid,
                            ds.name, ds.mean, ds.std, self.cfg.plain())

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "images": self.images.detach().cpu().clone(),
                "optimizer": self.optimizer.state_dict(), "bank": self.bank.state_dict(),
                "generator": self.generator.get_state(), "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"].to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.bank.load_state_dict(state["bank"])
        self.generator.set_state(state["generator"])
        self.pool.load_state_dict(state.get("pool"))
        self.iteration = int(state["iteration"])

    def save_checkpoint(self, path: str | Path) -> None:
        checkpoint_file.save(path, self.cfg, self.state_dict())

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(checkpoint_file.load(path, self.cfg, revision1_changes=lambda: revision1_changes(self)))

    def checkpoint_due(self, iteration: int) -> bool:
        d = self.cfg.distill
        return iteration % d.checkpoint_every == 0 or iteration == d.iterations

    def report_due(self, iteration: int) -> bool:
        return iteration % self.cfg.distill.log_every == 0 or self.checkpoint_due(iteration)

    def run(self, checkpoint: str | Path | None = None, log: LogFn | None = None,
            hooks: RunHooks | None = None) -> SyntheticSet:
        """Iterate to cfg.distill.iterations, resuming from and writing `checkpoint` (a path, or
        None: the caller loads and saves through `hooks`); `log` is short for RunHooks(log=log)."""
        if hooks is not None and log is not None:
            raise DsdmError("pass either log or hooks to Distiller.run, not both")
        hooks = hooks or RunHooks(log=log)
        if checkpoint is not None and Path(checkpoint).is_file():
            self.load_checkpoint(checkpoint)
        start, window, steps = time.time(), {}, 0
        while self.iteration < self.cfg.distill.iterations:
            _accumulate(window, self.step())
            steps += 1
            it = self.iteration
            if hooks.after_step is not None:
                hooks.after_step(it)
            if not self.report_due(it):
                continue
            metrics = {**{f"loss/{k}": v / steps for k, v in window.items()}, "seconds": time.time() - start}
            window, steps = {}, 0
            if hooks.proxy is not None and hooks.proxy_every and it % hooks.proxy_every == 0:
                metrics["proxy_val_acc"] = hooks.proxy(self)
            if hooks.log is not None:
                hooks.log(metrics, it)
            if self.checkpoint_due(it):
                if checkpoint is not None:
                    self.save_checkpoint(checkpoint)
                if hooks.checkpoint is not None:
                    hooks.checkpoint(metrics, it)
        return self.synthetic_set()


def revision1_changes(distiller: Distiller) -> list[str]:
    """What a revision-1 checkpoint (written before revision 2) would continue differently."""
    d, out = distiller.cfg.distill, []
    if d.fast and d.pretrained and d.per_class_step:
        out.append("revision 1 made one joint step per iteration on the fast path, now per-class steps")
    if distiller.ops != match_ops("dsdm-uniform", distiller.dataset.name, d.factor, d.ipc):
        out.append(f"revision 1 matched with the uniform augmentation, now {'_'.join(o.value for o in distiller.ops)}")
    return out


def _accumulate(totals: dict, terms: dict) -> None:
    """Sum loss terms (over classes within a step, over steps within a log window)."""
    for key, value in terms.items():
        totals[key] = totals.get(key, 0.0) + float(value)
