"""`python -m ablations.components`: Table 4, adding DSDM's parts one at a time.

Rows: L_proto with fresh random ConvNets (DM's matching, DSDM's factor and step); + pre-trained
models (PM); + L_SD (lambda1 = 50); + L_h (lambda2 = 0.2) = full DSDM. The table gives each
row's paired difference from the previous one with its CI and verdict (ablations/stats.py).
"""
from __future__ import annotations

import sys

from ablations.cli import build_parser, cli, for_each_ipc
from ablations.sweep import Cell, run_sweep
from ablations.stats import EffectSpec

ROWS = [
    ("proto, random nets", {"distill.pretrained": False, "distill.lambda1": 0.0, "distill.lambda2": 0.0}),
    ("+ PM", {"distill.pretrained": True, "distill.lambda1": 0.0, "distill.lambda2": 0.0}),
    ("+ L_SD", {"distill.pretrained": True, "distill.lambda1": 50.0, "distill.lambda2": 0.0}),
    ("+ L_h (DSDM)", {"distill.pretrained": True, "distill.lambda1": 50.0, "distill.lambda2": 0.2}),
]
# Table 4 (CIFAR-10): IPC -> row values
PAPER = {10: [60.6, 63.5, 66.2, 66.5], 50: [68.8, 70.2, 75.1, 75.8]}
# each row minus the previous one (paired), and the full method minus the first row; the paper's rows rise
EFFECT = EffectSpec("steps", paper_sign=+1)


def cells() -> list[Cell]:
    return [Cell(label, overrides, group="Table 4") for label, overrides in ROWS]


def paper_for(ipc: int) -> tuple[dict, str]:
    ipc_ref = ipc if ipc in PAPER else 10
    return {label: v for (label, _), v in zip(ROWS, PAPER[ipc_ref])}, f"CIFAR-10 IPC {ipc_ref}"


def run(args):
    def one(ipc: int):
        paper, setting = paper_for(ipc)
        return run_sweep("components", cells(), args, paper, paper_setting=setting, ipc=ipc, effect=EFFECT)

    return for_each_ipc(args, one)


def main(argv=None) -> int:
    return cli(run, build_parser("python -m ablations.components", __doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
