"""`python -m ablations.model_count`: accuracy vs the number of zoo models M at E = 20 (Figure 5, right).

Every cell samples from the first M models of one shared zoo. Under other budgets the grid
is what the budget's zoo has (tune/space.py) and E its last snapshot (`resolve`: M in
{1, 2, 4, 8} at E = 10, the zoo of the E sweep). The table ends with the slope of accuracy on
ln(M), its bootstrap CI and the verdict against the paper's rising curve (ablations/stats.py).
"""
from __future__ import annotations

import sys

from ablations.cli import build_parser, cli, for_each_ipc
from ablations.sweep import Cell, budget_grid, run_sweep
from ablations.stats import EffectSpec
from dsdm.config import PAPER_MODELS

# Figure 5 (CIFAR-10, IPC 50), read off the plot: rises from ~71 and flattens after M = 10.
PAPER = {1: 71.0, 10: 75.8, 20: 75.8}

# the sweep's effect: slope of accuracy on ln(M); the paper's curve rises
EFFECT = EffectSpec("log_slope", paper_sign=+1, what="M")


def cells(budget: str) -> list[Cell]:
    models, epochs = budget_grid(budget)
    e = 20 if budget == "paper" else max(epochs)
    grid = PAPER_MODELS if budget == "paper" else models
    return [Cell(f"M={m}", {"distill.num_models": m, "distill.pretrain_epochs": e}, x=m,
                 group=f"zoo models M (E = {e})", xscale="log") for m in grid]


def run(args):
    return for_each_ipc(args, lambda ipc: run_sweep(
        "model_count", cells(args.budget), args, {f"M={m}": v for m, v in PAPER.items()},
        paper_setting="CIFAR-10 IPC 50, read off Fig. 5", ipc=ipc, paper_curve=PAPER, effect=EFFECT))


def main(argv=None) -> int:
    return cli(run, build_parser("python -m ablations.model_count", __doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
