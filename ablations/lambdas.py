"""`python -m ablations.lambdas`: accuracy vs lambda1 (weight of L_SD) at lambda2 = 0.2, and vs
lambda2 (weight of L_h) at lambda1 = 50 (the paper's lambda figures).

The shared point (50, 0.2) is trained once and appears in both panels. `smoke` keeps two
values per axis so the test stays short; the other budgets run the paper's grids.

`--search N` asks instead which λ is best at this budget: N Optuna trials (TPE, seeded by
`--search-seed`) over λ1 / λ2 with M and E fixed at the budget's values (`tune.search`,
selected on the validation split; tune/optuna_search.py, called with a SearchSpec), then the best trial's λ against the paper's defaults
(λ1 = 50, λ2 = 0.2) as a paired sweep of two cells (every seed x evaluation network in both),
reported on the test split with the paired difference, its CI and the verdict:

    python -m ablations.lambdas --dataset fashionmnist --budget resolve --search 12 \\
        --data-root ../shared/data --offline --storage runs/resolve --num-cpus 2
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import replace
from pathlib import Path

from ablations.cli import build_parser, cli, for_each_ipc, parse_ints, parse_seeds, sweep_session
from ablations.sweep import Cell, common_overrides, run_sweep, sweep_configs, sweep_name
from ablations.stats import EffectSpec
from dsdm.errors import DsdmError
from tune.optuna_search import SearchSpec
from tune.runner import Runner
from tune.storage import Storage

LAMBDA1 = (0.01, 10.0, 50.0, 100.0)
LAMBDA2 = (0.0, 0.1, 0.2, 0.5, 1.0)
SMOKE = ((0.01, 50.0), (0.0, 0.2))
DEFAULTS = {"distill.lambda1": 50.0, "distill.lambda2": 0.2}  # the paper's
SEARCH_EFFECT = EffectSpec("steps", paper_sign=+1, claim="the searched λ beats the paper's defaults")


def cells(budget: str) -> list[Cell]:
    l1, l2 = SMOKE if budget == "smoke" else (LAMBDA1, LAMBDA2)
    out = [Cell(f"λ1={a:g}, λ2=0.2", {"distill.lambda1": a, "distill.lambda2": 0.2}, x=a,
                group="λ1 (weight of L_SD), λ2 = 0.2", xscale="log") for a in l1]
    out += [Cell(f"λ1=50, λ2={b:g}", {"distill.lambda1": 50.0, "distill.lambda2": b}, x=b,
                 group="λ2 (weight of L_h), λ1 = 50") for b in l2]
    return out


def comparison_cells(lambda1: float, lambda2: float) -> list[Cell]:
    """The paper's defaults first, the search's choice second: the effect is choice minus defaults."""
    group = "paper defaults vs the search's λ"
    return [Cell("paper defaults (λ1=50, λ2=0.2)", dict(DEFAULTS), group=group),
            Cell(f"search best (λ1={lambda1:.4g}, λ2={lambda2:.4g})",
                 {"distill.lambda1": float(lambda1), "distill.lambda2": float(lambda2)}, group=group)]


def comparison_seeds(asked: list[int], search_seed: int) -> list[int]:
    """The comparison's distillation seeds: as many as --seeds asks, never the search's own. Every
    search trial was distilled (and evaluated) with `search_seed`, so the best trial's λ re-run with
    that seed rebuilds the very set that won on validation, and its luck would enter the test."""
    out = [s for s in asked if s != search_seed]
    candidate = max(asked) + 1
    while len(out) < len(asked):
        if candidate != search_seed:
            out.append(candidate)
        candidate += 1
    return out


# --- --search N -------------------------------------------------------------------------------------
def search_spec(args: argparse.Namespace, ipc: int, name: str, fix: dict[str, int], zoo: dict[str, str]) -> SearchSpec:
    """The Optuna search this sweep asks for: λ only (M and E fixed), the sweeps' shared zoo."""
    return SearchSpec(dataset=args.dataset, ipc=ipc, budget=args.budget, num_samples=args.search,
                      seed=args.search_seed, fix=tuple(f"{k}={v}" for k, v in fix.items()),
                      sets=(*args.set, *(f"{k}={v}" for k, v in zoo.items())), name=name, cross_arch="none",
                      data_root=args.data_root, offline=args.offline)


def run_search(args: argparse.Namespace, spec: SearchSpec, path: Path):
    """The Optuna search (resumed or reused under --resume); its trial table, best first by val."""
    import pandas as pd

    from tune import optuna_search

    table_file = path / "trials.parquet"
    if args.resume and table_file.is_file():
        table = pd.read_parquet(table_file)
        if (table["status"] == "DONE").sum() >= args.search:
            print(f"lambdas: the search at '{path}' is complete; reusing its {len(table)} trials", flush=True)
            return table
    spec = replace(spec, resume=bool(args.resume and path.exists()))
    return optuna_search.run_search(spec, Runner.from_args(args), prog="ablations.lambdas")["table"]


def search_and_compare(args: argparse.Namespace, ipc: int):
    import ray

    if ray.is_initialized():
        raise DsdmError("--search runs the Optuna search, which starts Ray itself; call it without a Ray session "
                        "(or pass --address to use a cluster)")
    base, _ = sweep_configs(args.budget, common_overrides(args, ipc), comparison_cells(50.0, 0.2))
    fix = {"M": base.distill.num_models, "E": base.distill.pretrain_epochs}
    zoo = {"zoo.num_models": str(base.zoo.num_models), "zoo.snapshots": ",".join(map(str, base.zoo.snapshots))}
    storage = Storage.open(args.storage, args.local_dir)
    name = f"lambda_optuna-{base.data.dataset}-ipc{ipc}-{args.budget}"  # Optuna trials; the comparison: lambda_search-*
    seeds = comparison_seeds(parse_seeds(args.seeds), args.search_seed)
    table = run_search(args, search_spec(args, ipc, name, fix, zoo), storage.local / name)
    done = table[table["status"] == "DONE"].sort_values("val_acc", ascending=False)
    if done.empty:
        raise DsdmError(f"no trial of the search at '{storage.uri(name)}' finished; rerun with --resume")
    best = done.iloc[0]
    grid = comparison_cells(float(best["lambda1"]), float(best["lambda2"]))
    notes = [f"λ chosen by {len(done)} Optuna TPE trials (sampler seed {args.search_seed}) over λ1 / λ2 at M = "
             f"{fix['M']}, E = {fix['E']}, ranked by validation accuracy (search table: "
             f"`{storage.local / name / 'trials.md'}`); best trial {best['trial_id']}: val {best['val_acc']:.2f}. "
             f"Both cells below are then run with the same seeds {seeds} (paired; not the search's seed "
             f"{args.search_seed}, which would rebuild the winning set); the verdict uses the test split."]
    sweep_args = copy.copy(args)
    sweep_args.seeds = seeds
    sweep_args.resume = args.resume and storage.exists(sweep_name("lambda_search", base.data.dataset, ipc, args.budget))
    with sweep_session(sweep_args):
        return run_sweep("lambda_search", grid, sweep_args, {}, ipc=ipc, notes=notes, effect=SEARCH_EFFECT)


def run(args):
    if args.search:
        return [search_and_compare(args, ipc) for ipc in parse_ints(args.ipc, "--ipc")]
    note = "The spec quotes no numbers for the paper's λ plots, so there is no paper column."
    return for_each_ipc(args, lambda ipc: run_sweep("lambdas", cells(args.budget), args, {}, ipc=ipc, notes=[note]))


def parser() -> argparse.ArgumentParser:
    p = build_parser("python -m ablations.lambdas", __doc__)
    p.add_argument("--search", type=int, default=0, metavar="N",
                   help="instead of the grid: N Optuna trials over λ1/λ2 at the budget's M and E, then the best λ "
                        "against the paper's (50, 0.2), paired, on test")
    p.add_argument("--search-seed", type=int, default=0,
                   help="Optuna's TPE sampler seed (and the trials' distillation seed)")
    return p


def main(argv=None) -> int:
    return cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
