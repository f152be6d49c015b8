"""`python -m ablations.model_count`: accuracy vs the number of zoo models M at E = 20 (Figure 5, right).

Every cell samples from the first M models of one shared zoo. Under `cpu`/`smoke` the grid
shrinks to what the budget's zoo has (tune/space.py) and E is its last snapshot.
"""
from __future__ import annotations

import sys

from ablations.common import Cell, budget_grid, build_parser, cli, for_each_ipc, run_sweep
from tune.space import PAPER_MODELS

# Figure 5 (CIFAR-10, IPC 50), read off the plot: rises from ~71 and flattens after M = 10.
PAPER = {1: 71.0, 10: 75.8, 20: 75.8}


def cells(budget: str) -> list[Cell]:
    models, epochs = budget_grid(budget)
    e = 20 if budget == "paper" else max(epochs)
    grid = PAPER_MODELS if budget == "paper" else models
    return [Cell(f"M={m}", {"distill.num_models": m, "distill.pretrain_epochs": e}, x=m,
                 group=f"zoo models M (E = {e})") for m in grid]


def run(args):
    return for_each_ipc(args, lambda ipc: run_sweep(
        "model_count", cells(args.budget), args, {f"M={m}": v for m, v in PAPER.items()},
        paper_setting="CIFAR-10 IPC 50, read off Fig. 5", ipc=ipc, paper_curve=PAPER))


def main(argv=None) -> int:
    return cli(run, build_parser("python -m ablations.model_count", __doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
