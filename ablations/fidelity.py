"""`python -m ablations.fidelity`: does the fast path stay faithful at the paper's horizon? (issue 15)

Three arms distil the same dataset from ONE zoo: the reference loop (`distill.fast=false`: a fresh
real batch and draw per class per iteration), the fast path with a fixed pool
(`distill.aug_refresh=0`) and the fast path whose pool slots are redrawn after R uses
(`--refresh R`). Each arm x distillation seed is a cell of one Tune grid (`--resume` keeps the
finished cells and continues an interrupted one from its checkpoint). Each set is evaluated by
`eval.runs` ConvNet-3s seeded by the distillation seed, so network i of seed s starts from the
same weights and sees the same batches in every arm: the comparisons are paired by (seed, network).

Prints, after the sweep's own table: per arm the mean final-epoch test accuracy with a 95% t
interval over the (seed, network) units, per pair of arms the mean paired difference with its
95% CI and a verdict, and the seconds per distillation iteration of each arm. Units that share a
seed share a distilled set, so with 2 seeds the CIs understate the seed-to-seed noise.

Outside `--budget smoke` the measurement's defaults apply before any --set: at least 1000
iterations and 10 evaluation networks per set. The issue's measurement (hours on CPU):

    python -m ablations.fidelity --dataset fashionmnist --ipc 1 --budget cpu --seeds 2 \\
        --data-root ../shared/data --offline --refresh 4
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from ablations.cli import build_parser, cli, for_each_ipc
from ablations.sweep import Cell, cell_ids, run_sweep
from ablations.stats import Effect, mean_ci, paired_difference
from dsdm.config import BUDGETS, DistillConfig
from dsdm.errors import DsdmError
from dsdm.io import atomic_write_text

MIN_ITERATIONS = 1000
EVAL_NETS = 10
DEFAULT_REFRESH = 4


def cells(refresh: int) -> list[Cell]:
    return [Cell("reference", {"distill.fast": False}, group="arms"),
            Cell("fast, R=0", {"distill.fast": True, "distill.aug_refresh": 0}, group="arms"),
            Cell(f"fast, R={refresh}", {"distill.fast": True, "distill.aug_refresh": refresh}, group="arms")]


def measurement_sets(budget: str) -> list[str]:
    """The issue's measurement on top of the budget (before the user's --set, which win)."""
    if budget == "smoke":
        return []
    iterations = max(MIN_ITERATIONS, BUDGETS[budget].get("distill.iterations", DistillConfig.iterations))
    return [f"distill.iterations={iterations}", f"eval.runs={EVAL_NETS}"]


# --- statistics ---------------------------------------------------------------------------------
def verdict(effect: Effect) -> str:
    """Fidelity wording of a paired difference (arm minus arm): better, worse or not detected."""
    if not (math.isfinite(effect.low) and math.isfinite(effect.high)):
        return "unresolved (too few units)"
    if effect.low > 0:
        return "better"
    if effect.high < 0:
        return "worse"
    return f"no difference detected (this design detects about {effect.detectable:.2f} points)"


def unit_accuracies(trials, labels_by_id: dict[str, str]) -> dict[str, dict[tuple[int, int], float]]:
    """arm label -> {(seed, network): test accuracy %} of the finished trials."""
    out: dict[str, dict[tuple[int, int], float]] = {label: {} for label in labels_by_id.values()}
    for _, row in trials[trials["status"] == "DONE"].iterrows():
        for i, acc in enumerate(row["test_runs"]):
            out[labels_by_id[row["cell"]]][(int(row["seed"]), i)] = float(acc)
    return out


def seconds_per_iteration(trials, labels_by_id: dict[str, str]) -> dict[str, float]:
    """Distillation seconds per iteration of each arm (mean over its trials; the last attempt of
    a resumed trial over the iterations it ran; the fast arms' compile and cache fills included)."""
    out = {}
    for cell, label in labels_by_id.items():
        done = trials[(trials["cell"] == cell) & (trials["status"] == "DONE")]
        rates = [r["distill_s"] / max(r["iteration"] - (r["resumed_from"] or 0), 1) for _, r in done.iterrows()]
        out[label] = sum(rates) / len(rates) if rates else math.nan
    return out


def arms_table(acc: dict[str, dict[tuple[int, int], float]], rate: dict[str, float]) -> str:
    labels = list(acc)
    lines = ["| arm | test acc % (mean) | 95% CI | units (seed x net) | s/iteration |", "|---|---|---|---|---|"]
    for label in labels:
        c = mean_ci(list(acc[label].values()))
        lines.append(f"| {label} | {c['mean']:.2f} | {c['ci95_low']:.2f} to {c['ci95_high']:.2f} | {c['n']} | "
                     f"{rate[label]:.3f} |")
    lines += ["", "| paired difference | mean (points) | 95% CI | units | verdict |", "|---|---|---|---|---|"]
    for a, b in [(labels[1], labels[0]), (labels[2], labels[0]), (labels[2], labels[1])]:
        units = sorted(set(acc[a]) & set(acc[b]))
        e = paired_difference([acc[b][u] for u in units], [acc[a][u] for u in units])  # a minus b
        lines.append(f"| {a} minus {b} | {e.estimate:+.2f} | {e.low:+.2f} to {e.high:+.2f} | {e.n} | "
                     f"{a}: {verdict(e)} |")
    seeds = sorted({s for arm in acc.values() for s, _ in arm})
    lines += ["", "Per distillation seed (mean over its networks): " + "; ".join(
        f"{label}: " + ", ".join(f"seed {s} {_seed_mean(acc[label], s):.2f}" for s in seeds) for label in labels)]
    return "\n".join(lines)


def _seed_mean(arm: dict[tuple[int, int], float], seed: int) -> float:
    values = [v for (s, _), v in arm.items() if s == seed]
    return sum(values) / len(values) if values else math.nan


# --- the run ------------------------------------------------------------------------------------
def run(args):
    if args.refresh < 1:
        raise DsdmError(f"--refresh must be >= 1 (the fixed pool, R = 0, is the second arm already); got {args.refresh}")
    args.set = measurement_sets(args.budget) + list(args.set)
    arms = cells(args.refresh)

    def one(ipc: int):
        out = run_sweep("fidelity", arms, args, ipc=ipc, notes=[
            "Arms paired by (distillation seed, evaluation network); see python -m ablations.fidelity --help."])
        labels_by_id = {cid: next(c.label for c in arms if c.key == key) for key, cid in cell_ids(arms).items()}
        body = arms_table(unit_accuracies(out.trials, labels_by_id), seconds_per_iteration(out.trials, labels_by_id))
        e = out.cfg.eval
        head = (f"Fidelity of the fast path: {out.cfg.data.dataset} IPC {ipc}, {out.cfg.distill.iterations} iterations, "
                f"budget `{args.budget}`, zoo {out.zoo_info.get('folder', '')}, {e.runs} ConvNet-3s per set "
                f"({e.protocol} protocol, {e.epochs or 'protocol'} epochs), command `{getattr(args, 'command', '')}`.")
        text = head + "\n\n" + body + "\n"
        path = Path(args.results) / "fidelity" / f"{out.cfg.data.dataset}-ipc{ipc}-arms.md"
        atomic_write_text(path, text)
        print(text + f"\narms table: {path}", flush=True)
        return out

    return for_each_ipc(args, one)


def build(prog: str = "python -m ablations.fidelity"):
    p = build_parser(prog, __doc__, dataset="fashionmnist", ipc="1")
    p.add_argument("--refresh", type=int, default=DEFAULT_REFRESH,
                   help=f"R of the third arm: a pool slot is redrawn after R uses (default {DEFAULT_REFRESH})")
    p.set_defaults(seeds="2")
    return p


def main(argv=None) -> int:
    return cli(run, build(), argv)


if __name__ == "__main__":
    sys.exit(main())
