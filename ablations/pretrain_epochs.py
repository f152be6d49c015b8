"""`python -m ablations.pretrain_epochs`: accuracy vs the zoo's pre-training epochs E at M = 10 (Figure 5, left).

Every cell uses the same zoo (snapshots at every E of the grid); only the snapshot differs.
Under other budgets the grid is the snapshots the budget's zoo has (tune/space.py) and M its
size (`resolve`: E in {1, 2, 5, 10} at M = 8). The table ends with the slope of accuracy on
ln(E), its bootstrap CI and the verdict against the paper's rising curve (ablations/stats.py).
"""
from __future__ import annotations

import sys

from ablations.cli import build_parser, cli, for_each_ipc
from ablations.sweep import Cell, budget_grid, run_sweep
from ablations.stats import EffectSpec
from dsdm.config import PAPER_EPOCHS

# Figure 5 (CIFAR-10, IPC 50): E -> accuracy
PAPER = {1: 72.9, 5: 74.3, 10: 74.9, 15: 75.4, 20: 75.8, 25: 75.6, 30: 75.7}

# the sweep's effect: slope of accuracy on ln(E); the paper's curve rises
EFFECT = EffectSpec("log_slope", paper_sign=+1, what="E")


def cells(budget: str) -> list[Cell]:
    models, epochs = budget_grid(budget)
    m = 10 if budget == "paper" else max(models)
    grid = PAPER_EPOCHS if budget == "paper" else epochs
    return [Cell(f"E={e}", {"distill.num_models": m, "distill.pretrain_epochs": e}, x=e,
                 group=f"pre-training epochs E (M = {m})", xscale="log") for e in grid]


def run(args):
    return for_each_ipc(args, lambda ipc: run_sweep(
        "pretrain_epochs", cells(args.budget), args, {f"E={e}": v for e, v in PAPER.items()},
        paper_setting="CIFAR-10 IPC 50", ipc=ipc, paper_curve=PAPER, effect=EFFECT))


def main(argv=None) -> int:
    return cli(run, build_parser("python -m ablations.pretrain_epochs", __doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
