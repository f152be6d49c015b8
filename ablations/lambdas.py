"""`python -m ablations.lambdas`: accuracy vs lambda1 (weight of L_SD) at lambda2 = 0.2, and vs
lambda2 (weight of L_h) at lambda1 = 50 (the paper's lambda figures).

The shared point (50, 0.2) is trained once and appears in both panels. `smoke` keeps two
values per axis so the test stays short; `cpu` and `paper` run the paper's grids.
"""
from __future__ import annotations

import sys

from ablations.common import Cell, build_parser, cli, for_each_ipc, run_sweep

LAMBDA1 = (0.01, 10.0, 50.0, 100.0)
LAMBDA2 = (0.0, 0.1, 0.2, 0.5, 1.0)
SMOKE = ((0.01, 50.0), (0.0, 0.2))


def cells(budget: str) -> list[Cell]:
    l1, l2 = SMOKE if budget == "smoke" else (LAMBDA1, LAMBDA2)
    out = [Cell(f"λ1={a:g}, λ2=0.2", {"distill.lambda1": a, "distill.lambda2": 0.2}, x=a,
                group="λ1 (weight of L_SD), λ2 = 0.2", xscale="log") for a in l1]
    out += [Cell(f"λ1=50, λ2={b:g}", {"distill.lambda1": 50.0, "distill.lambda2": b}, x=b,
                 group="λ2 (weight of L_h), λ1 = 50") for b in l2]
    return out


def run(args):
    note = "The spec quotes no numbers for the paper's λ plots, so there is no paper column."
    return for_each_ipc(args, lambda ipc: run_sweep("lambdas", cells(args.budget), args, {}, ipc=ipc, notes=[note]))


def main(argv=None) -> int:
    return cli(run, build_parser("python -m ablations.lambdas", __doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
