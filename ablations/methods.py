"""`python -m ablations.methods`: Table 1 rows (Random, Herding, K-Center, DM, DSDM) over IPCs.

Coresets pick real images in zoo model 0's embedding at snapshot E; DM is DSDM's loop with
the DM preset (fresh random ConvNets, L_proto only, no factor); `dsdm-nosd` is DSDM with
lambda1 = 0. One Tune run per IPC (one table each), then, for several IPCs, one table with a column per IPC.
"""
from __future__ import annotations

import sys

from ablations.cli import build_parser, cli, parse_ints, parse_seeds, sweep_session
from ablations.sweep import Cell, run_sweep
from ablations.report import PAPER_NAMES, write_pivot
from dsdm.errors import DsdmError

METHODS = {
    "random": {"distill.method": "random"},
    "herding": {"distill.method": "herding"},
    "kcenter": {"distill.method": "kcenter"},
    "dm": {"distill.method": "dm"},
    "dsdm": {"distill.method": "dsdm"},
    "dsdm-nosd": {"distill.method": "dsdm", "distill.lambda1": 0.0},
}
# Spec section 6: (dataset, method) -> {ipc: ConvNet-3 test accuracy}
PAPER = {
    **{(d, "dsdm"): dict(zip((1, 10, 50), v)) for d, v in {
        "mnist": (94.8, 98.5, 99.2), "fashionmnist": (80.8, 87.3, 88.9), "svhn": (60.2, 85.4, 91.3),
        "cifar10": (45.0, 66.5, 75.8), "cifar100": (19.5, 46.2, 54.0)}.items()},
    ("cifar10", "dm"): {1: 26.0, 10: 48.9, 50: 63.0},
    ("cifar10", "random"): {1: 14.4, 10: 26.0, 50: 43.4},
    ("speechcommands", "dsdm"): {10: 71.1, 20: 78.9},
    ("speechcommands", "dm"): {10: 69.1, 20: 77.0},
    ("speechcommands", "random"): {10: 42.6, 20: 57.0},
}


def cells(methods: list[str]) -> list[Cell]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise DsdmError(f"unknown method(s) {unknown}; choose from: {', '.join(METHODS)}")
    return [Cell(m, METHODS[m], group="method") for m in methods]


def run_methods(args, sweep: str, methods: list[str], notes: list[str] | None = None) -> dict:
    """One run_sweep per IPC inside one Ray session, then the method x IPC table."""
    ipcs = parse_ints(args.ipc, "--ipc")
    grid = cells(methods)  # unknown names fail before Ray starts
    setting = PAPER_NAMES.get(args.dataset, args.dataset)
    outputs = {}
    with sweep_session(args):
        for ipc in ipcs:
            paper = {m: PAPER.get((args.dataset, m), {}).get(ipc) for m in methods}
            outputs[ipc] = run_sweep(sweep, grid, args, {k: v for k, v in paper.items() if v},
                                     paper_setting=f"{setting} IPC {ipc}", ipc=ipc, notes=notes)
    if len(ipcs) == 1:  # the per-IPC table already has a row per method
        return {"outputs": outputs, "files": outputs[ipcs[0]].files}
    rows = [{"row": r["cell"], "ipc": ipc, **{k: r[k] for k in ("test_mean", "test_std", "test_n", "paper")}}
            for ipc, out in outputs.items() for _, r in out.table.iterrows()]
    first = outputs[ipcs[0]]
    meta = {"cfg": first.cfg, "seeds": parse_seeds(args.seeds), "wall_s": sum(o.wall_s for o in outputs.values()),
            "command": getattr(args, "command", ""), "notes": notes or []}
    stem = args.results / sweep / f"{first.cfg.data.dataset}-ipc{'-'.join(map(str, ipcs))}"
    title = f"{sweep} on {first.cfg.data.dataset}: ConvNet-3 test accuracy (%) by IPC"
    files = write_pivot(rows, stem, title, meta, row_name="method")
    print(files["md"].read_text())
    return {"outputs": outputs, "files": files}


def run(args):
    return run_methods(args, "methods", [m.strip() for m in args.methods.split(",") if m.strip()])


def parser():
    p = build_parser("python -m ablations.methods", __doc__, ipc="1,10")
    p.add_argument("--methods", default="random,herding,kcenter,dm,dsdm",
                   help=f"comma-separated, from: {', '.join(METHODS)}")
    return p


def main(argv=None) -> int:
    return cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
