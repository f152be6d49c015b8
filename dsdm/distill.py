"""Algorithm 1 of DSDM (and DM as a special case): optimise the synthetic set.

Per iteration: pick a zoo model (or a fresh random ConvNet for DM), push a real and the
synthetic batch of every class through the same Siamese augmentation, match prototypes
(L_proto), covariances (L_SD, Eq. for semantic diversity) and the memory-bank prototype
(L_h), step the synthetic pixels, then update the memory bank.

Two paths compute the same objective:
- `reference`: the straightforward loop of the reference code (fresh real batch and
  augmentation per class per iteration, one optimiser step per class, a separate
  memory-bank forward after the update);
- `fast` (default): real features of each zoo snapshot are computed once over a fixed
  pool of K Siamese augmentation draws and cached as centred matrices (the covariance
  term uses a Gram identity, never a d x d matrix); all classes go through one forward,
  one joint step; the memory bank takes the prototypes of that same forward.
  docs/benchmarks.md says where this objective differs and what it costs in accuracy.
"""
from __future__ import annotations

import math
import time
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
LogFn = Callable[[dict, int], None]


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


class RealFeatureCache:
    """Fast path: per (zoo model, augmentation draw) the real side of every class's loss.

    Entry (m, k) holds, per class, (mean, centred features, ||Cov||_F^2) of a fixed real
    batch under draw k. Each entry is a pure function of (seed, m, k), so a resumed run
    recomputes exactly what it had.
    """

    def __init__(self, dataset: Dataset, batch_real: int, seed: int, device: torch.device):
        self.dataset, self.batch_real, self.seed, self.device = dataset, batch_real, seed, device
        self.entries: dict[tuple[int, int], list] = {}

    @torch.no_grad()
    def get(self, m: int, k: int, net: torch.nn.Module, params) -> list:
        if (m, k) not in self.entries:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + m * 1009 + k)
            stats = []
            for idx in self.dataset.class_indices():
                pick = idx[torch.randperm(len(idx), generator=g)[: self.batch_real]]
                x = self.dataset.train_x[pick].to(self.device)
                f = net.embed(augment(x, self.dataset.mean, self.dataset.std, params))
                xc, norm_sq = precompute_real(f)
                stats.append((f.mean(0), xc, norm_sq))
            self.entries[(m, k)] = stats
        return self.entries[(m, k)]


class Distiller:
    """Holds the synthetic set, its optimiser, the memory bank and the RNG; `step()` is one
    iteration of Algorithm 1; `state_dict()` captures all of it for exact resume."""

    def __init__(self, dataset: Dataset, cfg: Config, zoo: ModelZoo | None, device: torch.device | str = "cpu"):
        d = cfg.distill
        self.dataset, self.cfg, self.zoo, self.device = dataset, cfg, zoo, torch.device(device)
        if d.pretrained and zoo is None:
            raise DsdmError("distillation with pre-trained models needs a zoo; pass --zoo DIR or let distill pre-train one")
        if d.pretrained:
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
        self.ops = ops_for(dataset.name, MATCH_OPS)
        pool_gen = torch.Generator().manual_seed(d.seed + 7919)
        self.aug_pool = [sample_aug_params(self.ops, 1, pool_gen, device=self.device) for _ in range(d.aug_pool)]
        self.cache = RealFeatureCache(dataset, d.batch_real, d.seed, self.device)
        self.class_slices = [slice(c * d.ipc, (c + 1) * d.ipc) for c in range(dataset.num_classes)]
        self.iteration = 0
        self._nets: dict[int, torch.nn.Module] = {}

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

    def _class_loss(self, c: int, f_real, f_syn, real=None):
        d = self.cfg.distill
        h = self.bank.get(c) if d.lambda2 > 0 and self.bank.active(self.iteration) else None
        return dsdm_class_loss(f_real, f_syn, h, d.lambda1, d.lambda2, real=real)

    def _syn_batch(self, c: int):
        x, _ = decode(self.images[self.class_slices[c]], self.labels[self.class_slices[c]], self.grid)
        return x  # (ipc * tiles, ch, H, W)

    def _step_reference(self, net) -> dict[str, float]:
        d, ds = self.cfg.distill, self.dataset
        totals: dict[str, float] = {}
        joint = 0.0
        for c, idx in enumerate(ds.class_indices()):
            params = sample_aug_params(self.ops, 1, self.generator, device=self.device)  # Siamese draw
            pick = idx[torch.randperm(len(idx), generator=self.generator)[: d.batch_real]]
            with torch.no_grad():
                f_real = net.embed(augment(ds.train_x[pick].to(self.device), ds.mean, ds.std, params))
            f_syn = net.embed(augment(self._syn_batch(c), ds.mean, ds.std, params))
            loss, terms = self._class_loss(c, f_real, f_syn)
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
                    self.bank.update(c, net.embed(augment(self._syn_batch(c), ds.mean, ds.std, params)).mean(0))
        return totals

    def _step_fast(self, m: int, net) -> dict[str, float]:
        ds = self.dataset
        k = int(torch.randint(len(self.aug_pool), (), generator=self.generator))
        params = self.aug_pool[k]
        real = self.cache.get(m, k, net, params)
        x, _ = decode(self.images, self.labels, self.grid)  # all classes, one forward
        f_syn = net.embed(augment(x, ds.mean, ds.std, params))  # (C*ipc*tiles, d)
        per_class = f_syn.shape[0] // ds.num_classes
        totals: dict[str, float] = {}
        loss = 0.0
        for c in range(ds.num_classes):
            f_c = f_syn[c * per_class:(c + 1) * per_class]
            mean_real, xc, norm_sq = real[c]
            loss_c, terms = self._class_loss(c, mean_real[None], f_c, real=(xc, norm_sq))
            loss = loss + loss_c
            _accumulate(totals, terms)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.cfg.distill.lambda2 > 0:  # reuse this forward's prototypes (one step behind)
            protos = f_syn.detach().view(ds.num_classes, per_class, -1).mean(1)
            self.bank.update_all(protos)
        return totals

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
        if payload["config"] != self.cfg.plain():
            raise DsdmError(f"checkpoint '{path}' was written by a different config; delete it or rerun with that config")
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


def _accumulate(totals: dict, terms: dict) -> None:
    """Sum loss terms (over classes within a step, over steps within a log window)."""
    for key, value in terms.items():
        totals[key] = totals.get(key, 0.0) + float(value)

