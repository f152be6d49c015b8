"""Final scoring of a cell's N networks in one pass over the data (validation, then test).

Today's scoring (`eval.scoring=each`) runs `dsdm.train.accuracy` per network and split: one pass
over 16 000 FashionMNIST images per network, in batches of 1024, whose activations (1024 x 128 x
32 x 32 floats, 512 MB after the first convolution) stream through memory at every layer.
`score_networks` (`eval.scoring=joint`, the default) normalises each batch once and runs every
network on it while it is in cache, in inference mode, in batches of `score_batch` (256 on CPU):

- on CPU one network after another over the shared batch; with `compiled` the forward goes
  through `torch.compile` (GroupNorm, ReLU and pooling fuse; one graph shape: the last batch is
  padded, which changes no other sample's output since no layer mixes samples in eval mode);
- `stacked` (the default on CUDA): the N networks as one vmapped model over stacked weights, one
  forward per batch for all of them (networks with BatchNorm run one after another).

Eager scoring gives each network today's accuracies (tests/test_inference.py); its logits were
bit-equal to `accuracy`'s in a check on this CPU (batch 64-256 vs 1024) and are tested equal to float
rounding. Stacked and compiled scoring are equal within float reassociation (logits <= 6e-7 apart
here); their accuracies are tested equal to today's.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from dsdm.augment import normalize
from dsdm.train import compile_static, has_batchnorm

# score_batch=0: on CPU, batch 1024 ran ~1.6x slower per image than 64 or 256 (activations leave the
# caches; docs/benchmarks.md, shared cores); on CUDA large batches keep the GPU busy
CPU_BATCH, CUDA_BATCH = 256, 4096
AUTO_COMPILE_FORWARDS = 40_000  # score_compile=auto (CPU): compile once images x networks reaches this


def scoring_plan(cfg, device: torch.device | str, forwards: int) -> dict:
    """(batch_size, compiled, stacked) for `forwards` = images x networks to score under `cfg`."""
    cuda = torch.device(device).type == "cuda"
    batch = cfg.score_batch or (CUDA_BATCH if cuda else CPU_BATCH)
    compiled = cfg.score_compile == "on" or (cfg.score_compile == "auto" and not cuda and forwards >= AUTO_COMPILE_FORWARDS)
    return {"batch_size": batch, "compiled": compiled, "stacked": cuda}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


_COMPILED: dict[str, Callable] = {}


def compiled_forward() -> Callable:
    """One compiled `model(x)` for the process: parameters are graph inputs (torch.compile inlines
    nn.Modules), so networks of one architecture share the graph; the on-disk inductor cache makes
    later processes' compiles fast."""
    if "forward" not in _COMPILED:
        _COMPILED["forward"] = compile_static(_forward)
    return _COMPILED["forward"]


def _stacked_forward(models) -> Callable[[torch.Tensor], torch.Tensor]:
    from torch.func import functional_call, stack_module_state

    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")

    def one(p, b, x):
        return functional_call(skeleton, (p, b), (x,))

    batched = torch.vmap(one, in_dims=(0, 0, None))
    return lambda x: batched(params, buffers, x)  # (K, B, classes)


@torch.inference_mode()
def score_networks(models: Sequence[torch.nn.Module], splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   mean: Sequence[float], std: Sequence[float], batch_size: int = CPU_BATCH,
                   compiled: bool = False, stacked: bool = False) -> list[dict[str, float]]:
    """Top-1 accuracy in [0, 1] of each network on each split {name: (x in [0, 1], y)}, from one pass
    over each split; x may live on any device (moved batch by batch). Returns one dict per network."""
    models = list(models)
    if not models:
        return []
    device = next(models[0].parameters()).device
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    stacked = stacked and len(models) > 1 and not any(has_batchnorm(m) for m in models)
    forward = compiled_forward() if compiled else _forward
    together = _stacked_forward(models) if stacked else None
    out: list[dict[str, float]] = [{} for _ in models]
    try:
        for name, (x, y) in splits.items():
            if len(x) == 0:
                for r in out:
                    r[name] = float("nan")
                continue
            correct = torch.zeros(len(models), dtype=torch.long, device=device)
            for start in range(0, len(x), batch_size):
                xb = normalize(x[start:start + batch_size].to(device), mean, std)
                yb = y[start:start + batch_size].to(device)
                n = len(xb)
                if compiled and n < batch_size:  # one graph shape: pad, then drop the padding's outputs
                    xb = torch.cat([xb, xb.new_zeros(batch_size - n, *xb.shape[1:])])
                if together is not None:
                    correct += (together(xb)[:, :n].argmax(2) == yb).sum(1)
                else:
                    for k, m in enumerate(models):
                        correct[k] += (forward(m, xb)[:n].argmax(1) == yb).sum()
            for r, c in zip(out, correct.tolist()):
                r[name] = c / len(x)
    finally:
        for m, t in zip(models, was_training):
            m.train(t)
    return out
