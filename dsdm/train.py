"""Supervised training shared by zoo pre-training and evaluation: one recipe, one loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dsdm.augment import augment, cutmix, mixed_cross_entropy, normalize, sample_aug_params
from dsdm.errors import DsdmError
from dsdm.models import get_model


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


def build_model(arch: str, channels: int, num_classes: int, image_size: tuple[int, int], seed: int):
    """A freshly initialised network; seeding stays local so callers' RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(arch, channels, num_classes, image_size)


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
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(recipe.milestones), recipe.gamma)
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
