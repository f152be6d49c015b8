"""Supervised training shared by zoo pre-training and evaluation: one recipe, one loop.

Two loops train the same thing from the same seeds:

- ``baseline``: the original loop, kept as the reference the others are tested against;
- ``fast`` (default): per epoch, the data order, DSA draws and CutMix draws are taken first with
  exactly the generator calls ``baseline`` makes, in its order (`plan_epoch`), so every draw is the
  same by construction; the network gets NCHW strides (DSA's crop returns channels_last strides,
  which send conv and GroupNorm to ~3x slower kernels on CPU); the loss is checked for NaN/inf
  once per epoch instead of syncing every step; optionally `torch.compile`d, optionally in bf16
  (`precision`: autocast around the forward; weights, optimiser and the loss stay fp32).

`train_classifiers` trains N networks of one architecture as one stacked model (torch.func:
stack_module_state + functional_call + vmap), each with its own generator, so each keeps its
own data order, DSA and CutMix draws; SGD is elementwise, so one optimiser over the stacked
parameters is each network's own optimiser (momentum, weight decay, MultiStep lr).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from dsdm.augment import (AugParams, CutMixDraw, apply_cutmix, augment, cutmix, mixed_cross_entropy, nchw,
                          normalize, sample_aug_params, sample_cutmix)
from dsdm.config import PRECISIONS, SWITCH, TRAIN_PATHS
from dsdm.errors import DsdmError

MEMORY_FORMATS = ("nchw", "channels_last", "as_is")  # as_is: whatever strides DSA returns (baseline)
AUTO_COMPILE_STEPS = 10_000  # compile=auto: ~1 min of compiling pays back only over this many steps (CPU)


def compile_static(fn):
    """torch.compile(fn) for fixed shapes, as every compiled path here uses it. vec_isa_ok skips
    inductor's per-process checks that the C++ compiler builds each SIMD ISA the CPU reports (each
    one a `python -c "import torch"`): a cold compile of the training step took 51 s instead of 66,
    and they were half of a warm-cache scoring compile's ~30 s."""
    return torch.compile(fn, dynamic=False, options={"cpp.vec_isa_ok": True})


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[int, ...] = ()  # epochs after which lr *= gamma
    gamma: float = 0.1
    cutmix_p: float = 0.0
    ops: tuple = ()  # augmentation ops, one draw per sample
    # speed levers (same draws, same arithmetic up to float rounding; see the module docstring)
    path: str = "fast"  # fast | baseline
    memory_format: str = "nchw"  # fast path: layout of the network's input
    compile: bool = False  # fast path: torch.compile the network + loss (pays only for long runs)
    precision: str = "fp32"  # fast path: fp32 | bf16 (autocast forward; not bit-equal to fp32)

    def __post_init__(self):
        for what, value, allowed in (("training path", self.path, TRAIN_PATHS), ("memory format", self.memory_format, MEMORY_FORMATS),
                                     ("training precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise DsdmError(f"unknown {what} '{value}'; choose one of: {', '.join(allowed)}")
        if self.precision != "fp32" and self.path == "baseline":
            raise DsdmError(f"precision={self.precision} runs on the fast training path only; set train_path=fast")


def speed_levers(recipe: TrainRecipe, n: int, cfg) -> TrainRecipe:
    """`recipe` with a config's speed levers (an EvalConfig or ZooConfig: train_path, compile,
    precision) for n training images."""
    _check_switch("compile", cfg.compile)
    steps = recipe.epochs * math.ceil(n / recipe.batch_size)
    on = cfg.compile == "on" or (cfg.compile == "auto" and steps >= AUTO_COMPILE_STEPS)
    return replace(recipe, path=cfg.train_path, compile=on, precision=cfg.precision)


def stack_networks(batch_nets: str, device: torch.device | str) -> bool:
    """batch_nets=auto stacks networks on CUDA only: on CPU the convolutions already run near the
    cores' rate and a grouped conv is slower than N plain ones (docs/benchmarks.md)."""
    _check_switch("batch_nets", batch_nets)
    return batch_nets == "on" or (batch_nets == "auto" and torch.device(device).type == "cuda")


def _check_switch(name: str, value: str) -> None:
    if value not in SWITCH:
        raise DsdmError(f"{name} must be one of {', '.join(SWITCH)}, got '{value}'")


def train_classifier(
    model: torch.nn.Module,
    x: torch.Tensor,  # (N, C, H, W) in [0, 1], on the model's device
    y: torch.Tensor,  # (N,)
    mean: tuple[float, ...],
    std: tuple[float, ...],
    recipe: TrainRecipe,
    generator: torch.Generator,
    on_epoch: Callable[[int, torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """SGD with DSA per sample and CutMix; `on_epoch(epoch, model)` after each epoch."""
    if recipe.path == "baseline":
        return _train_baseline(model, x, y, mean, std, recipe, generator, on_epoch)
    model.train()
    opt, sched = _optimizer(model.parameters(), recipe)
    net = in_precision(model, recipe.precision)
    loss_fn = compile_static(_net_loss) if recipe.compile else _net_loss
    for epoch in range(1, recipe.epochs + 1):
        bad = torch.zeros((), dtype=torch.bool, device=x.device)
        for step in plan_epoch(len(x), recipe, generator, tuple(x.shape[2:]), x.device):
            xb, ya, yb, lam = make_batch(x, y, mean, std, step, recipe.memory_format)
            if recipe.compile:  # lam as a tensor: a float argument would recompile per value
                loss = loss_fn(model, xb, ya, yb, torch.tensor(lam, device=x.device), recipe.precision)
            elif step.mix is None:
                loss = F.cross_entropy(net(xb), ya)
            else:
                loss = mixed_cross_entropy(net(xb), ya, yb, lam)
            bad |= ~torch.isfinite(loss)  # no host sync per step; checked once per epoch
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if bad:
            raise DsdmError(f"training loss became non-finite in epoch {epoch}; lower the learning rate")
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return model


def _train_baseline(model, x, y, mean, std, recipe, generator, on_epoch):
    """The original loop (the reference): draws interleaved with steps, a host sync per step."""
    model.train()
    opt, sched = _optimizer(model.parameters(), recipe)
    n = len(x)
    for epoch in range(1, recipe.epochs + 1):
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, recipe.batch_size):
            idx = order[start:start + recipe.batch_size]
            if len(idx) == 1 and n > 1:  # BatchNorm (ResNet/DenseNet) cannot train on one sample
                continue
            xb, yb = x[idx], y[idx]
            params = sample_aug_params(recipe.ops, len(idx), generator, device=x.device)
            xb = augment(xb, mean, std, params)
            if recipe.cutmix_p > 0 and torch.rand((), generator=generator) < recipe.cutmix_p:
                xb, ya, yb2, lam = cutmix(xb, yb, generator)
                loss = mixed_cross_entropy(model(xb), ya, yb2, lam)
            else:
                loss = F.cross_entropy(model(xb), yb)
            if not torch.isfinite(loss):
                raise DsdmError(f"training loss became {loss.item()} at epoch {epoch}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return model


def _optimizer(params, recipe: TrainRecipe):
    opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(recipe.milestones), recipe.gamma)


def in_precision(model: torch.nn.Module, precision: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` under bf16 autocast (convolutions and linears in bf16), logits back in fp32 so the
    loss and its reduction stay fp32, as do the weights and the optimiser. fp32: `model` itself."""
    if precision == "fp32":
        return model

    def forward_bf16(xb):
        with torch.autocast(xb.device.type, dtype=torch.bfloat16):
            return model(xb).float()
    return forward_bf16


def _cast_bf16(one: Callable) -> Callable:
    """bf16 for the vmapped network: autocast does not reach vmap's batched convolutions (torch
    2.11), so parameters and input are cast for the forward (gradients flow back to the fp32
    parameters through the cast); logits back in fp32 as in `in_precision`."""
    def one_bf16(p, b, xb):
        return one({k: v.bfloat16() for k, v in p.items()}, b, xb.bfloat16()).float()
    return one_bf16


def _net_loss(model, xb, ya, yb, lam, precision="fp32"):
    """CutMix loss with lam a tensor (lam = 1, yb = ya without CutMix: exactly the plain loss).
    The precision wrapper is made inside, so torch.compile guards on the model, not on a closure."""
    logits = in_precision(model, precision)(xb)
    return lam * F.cross_entropy(logits, ya) + (1.0 - lam) * F.cross_entropy(logits, yb)


# --- one epoch's draws, taken up front ---------------------------------------------------------

@dataclass
class Step:
    idx: torch.Tensor  # (B,) indices into the training set, on the data's device
    aug: AugParams  # per-sample DSA draw
    mix: CutMixDraw | None  # None: no CutMix this step


def plan_epoch(n: int, recipe: TrainRecipe, generator: torch.Generator, size: tuple[int, int],
               device: torch.device) -> list[Step]:
    """An epoch's order and draws: the same generator calls as the baseline loop, in its order
    (randperm; then per batch: DSA draw, CutMix coin, CutMix draw), so the same seed gives the
    same epoch whichever loop runs it."""
    order = torch.randperm(n, generator=generator).to(device)
    steps = []
    for start in range(0, n, recipe.batch_size):
        idx = order[start:start + recipe.batch_size]
        if len(idx) == 1 and n > 1:  # BatchNorm (ResNet/DenseNet) cannot train on one sample
            continue
        aug = sample_aug_params(recipe.ops, len(idx), generator, device=device)
        mix = None
        if recipe.cutmix_p > 0 and torch.rand((), generator=generator) < recipe.cutmix_p:
            mix = sample_cutmix(len(idx), size, generator)
        steps.append(Step(idx, aug, mix))
    return steps


def make_batch(x, y, mean, std, step: Step, memory_format: str = "nchw"):
    """(x_aug, y_a, y_b, lam) for one step; y_b = y_a and lam = 1 without CutMix."""
    xb = augment(x[step.idx], mean, std, step.aug)
    if memory_format == "nchw":
        xb = nchw(xb)
    elif memory_format == "channels_last":
        xb = xb.contiguous(memory_format=torch.channels_last)
    yb = y[step.idx]
    if step.mix is None:
        return xb, yb, yb, 1.0
    return apply_cutmix(xb, yb, step.mix)


# --- N networks as one stacked model -----------------------------------------------------------

def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def train_classifiers(
    models: Sequence[torch.nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    recipe: TrainRecipe,
    generators: Sequence[torch.Generator],
    on_epoch: Callable[[int, int, torch.nn.Module], None] | None = None,
    stacked: bool = True,
) -> list[torch.nn.Module]:
    """Train models[i] with generators[i], as `train_classifier` would one at a time;
    `on_epoch(epoch, i, model_i)` after each epoch of each model.

    stacked=True runs them as one model (vmap over stacked weights: one grouped conv per layer);
    networks with BatchNorm (running statistics are buffers vmap cannot update in place) and the
    baseline path fall back to one at a time.
    """
    models = list(models)
    if len(models) != len(generators):
        raise DsdmError(f"{len(models)} models but {len(generators)} generators; pass one generator per model")
    if stacked and len(models) > 1 and recipe.path != "baseline" and not any(has_batchnorm(m) for m in models):
        return _train_stacked(models, x, y, mean, std, recipe, generators, on_epoch)
    for i, (model, gen) in enumerate(zip(models, generators)):
        hook = None if on_epoch is None else (lambda epoch, net, i=i: on_epoch(epoch, i, net))
        train_classifier(model, x, y, mean, std, recipe, gen, hook)
    return models


def _train_stacked(models, x, y, mean, std, recipe, generators, on_epoch):
    from torch.func import functional_call, stack_module_state

    params, buffers = stack_module_state(models)  # leaves (K, ...) that require grad
    skeleton = copy.deepcopy(models[0]).to("meta")

    def one(p, b, xb):
        return functional_call(skeleton, (p, b), (xb,))

    forward = torch.vmap(one if recipe.precision == "fp32" else _cast_bf16(one))
    opt, sched = _optimizer(list(params.values()), recipe)
    K = len(models)
    for epoch in range(1, recipe.epochs + 1):
        plans = [plan_epoch(len(x), recipe, g, tuple(x.shape[2:]), x.device) for g in generators]
        bad = torch.zeros((), dtype=torch.bool, device=x.device)
        for steps in zip(*plans):
            batches = [make_batch(x, y, mean, std, s, recipe.memory_format) for s in steps]
            xb = torch.stack([b[0] for b in batches])  # (K, B, C, H, W)
            ya = torch.stack([b[1] for b in batches])  # (K, B)
            yb = torch.stack([b[2] for b in batches])
            lam = torch.tensor([b[3] for b in batches], device=x.device)  # (K,)
            logits = forward(params, buffers, xb)  # (K, B, classes)
            flat = logits.flatten(0, 1)
            ce_a = F.cross_entropy(flat, ya.flatten(), reduction="none").view(K, -1).mean(1)
            ce_b = F.cross_entropy(flat, yb.flatten(), reduction="none").view(K, -1).mean(1)
            losses = lam * ce_a + (1.0 - lam) * ce_b  # (K,) each network's own loss
            bad |= ~torch.isfinite(losses).all()
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # networks share no weights: each gets its own gradient
            opt.step()
        if bad:
            raise DsdmError(f"training loss became non-finite in epoch {epoch}; lower the learning rate")
        sched.step()
        if on_epoch is not None:
            _unstack(params, models)
            for k, model in enumerate(models):
                on_epoch(epoch, k, model)
    _unstack(params, models)
    for m in models:
        m.eval()
    return models


@torch.no_grad()
def _unstack(params: dict[str, torch.Tensor], models) -> None:
    for k, model in enumerate(models):
        for name, p in model.named_parameters():
            p.copy_(params[name][k])


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std,
             batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1]; x in [0, 1] on any device (moved batch by batch)."""
    if len(x) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = normalize(x[start:start + batch_size].to(device), mean, std)
        correct += (model(xb).argmax(1).cpu() == y[start:start + batch_size].cpu()).sum().item()
    model.train(was_training)
    return correct / len(x)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DsdmError(f"unknown device '{name}'; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DsdmError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return device
