"""What every sweep shares: cells x paired seeds as ONE Tune grid over one experiment.

A sweep module is a list of `Cell`s (a label and dotted config overrides) plus the paper's
numbers; `run_sweep` does the rest over tune/experiment.py (the search's assembly, no second one):
  1. base config = budget + flags, its zoo widened to the budget's whole M x E grid (and
     every cell's M and E), so ONE zoo per dataset x budget serves every sweep and
     `tune.search`; trained once by the actor pool under the local zoo cache, or reused;
  2. the cells x seeds run as one Tune grid search over `run_cell` (which is
     `tune.trainable.run_trial` with the cell's overrides), recorded in MLflow under the
     experiment `dsdm-<dataset>-ipc<N>` and a parent run named after the sweep; seeds added
     by a later `--resume --seeds N` run as a second grid (ablations/ledger.py); a trial another
     sweep already finished with the same config and seed is copied, not re-run (unless --fresh);
  3. per cell: mean, sd and 95% CI of the ConvNet-3 test accuracy over seeds x evaluation
     runs, the validation accuracy, the paper's value, which invocation finished it, and
     (when the sweep names one) the sweep's effect and verdict (ablations/stats.py), written
     as md + parquet (+ the per-network values) + a PNG (ablations/aggregate.py, report.py).

Paired design: seed s of the grid is the distillation seed AND the evaluation seed of every
cell (run_cell), so evaluation network r of seed s has the same initialisation, data order
and augmentation draws in every cell; a unit (s, r) is comparable across cells.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ablations.aggregate import aggregate, unit_runs, with_runs
from ablations.cli import parse_ints, parse_seeds
from ablations.ledger import Ledger, earlier_wall, part_of, session_of
from ablations.stats import EffectSpec, sweep_effect
from dsdm.config import BUDGET_GRIDS, Config, make_config, parse_set_pairs, zoo_covering
from dsdm.errors import DsdmError
from tune.runner import Runner
from tune.signals import STOP


@dataclass(frozen=True)
class Cell:
    """One point of a sweep: a row label, its config overrides, where it sits on the plot."""
    label: str
    overrides: dict[str, Any]
    x: float | None = None  # numeric x for a line plot (None: bar)
    group: str = ""  # one subplot per group (e.g. "λ1 at λ2 = 0.2")
    xscale: str = "linear"

    @property
    def key(self) -> str:  # cells with the same overrides are run once
        return json.dumps(self.overrides, sort_keys=True, default=str)


@dataclass
class SweepOutput:
    table: Any  # pandas DataFrame, one row per cell
    trials: Any  # one row per trial (tune.tables.trial_table + runs)
    results: Any  # Tune results, every part's
    cfg: Config
    dataset: Any
    zoo_info: dict
    files: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0
    recorder: Any = None  # tune.recorder.Recorder of the sweep
    parent_id: str = ""


# --- configs ------------------------------------------------------------------------------------
def common_overrides(args: argparse.Namespace, ipc: int) -> dict[str, Any]:
    out: dict[str, Any] = {"data.dataset": args.dataset, "distill.ipc": ipc}
    if args.data_root:
        out["data.root"] = str(Path(args.data_root).resolve())
    if args.offline:
        out["data.offline"] = True
    return {**out, **parse_set_pairs(args.set)}


def budget_grid(budget: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(M grid, E grid) the budget's zoo affords."""
    return BUDGET_GRIDS[budget]


def sweep_configs(budget: str, common: dict, cells: list[Cell]) -> tuple[Config, dict[str, dict]]:
    """Base config (zoo covering the budget grid and every cell) and each unique cell's diff from it."""
    default = make_config(budget, common).distill
    grid_m, grid_e = budget_grid(budget)
    ms = [int(c.overrides.get("distill.num_models", default.num_models)) for c in cells]
    es = [int(c.overrides.get("distill.pretrain_epochs", default.pretrain_epochs)) for c in cells]
    zoo = zoo_covering([*ms, *grid_m], [*es, *grid_e])
    base = make_config(budget, {**common, **zoo})
    flat = base.plain()
    diffs = {}
    for cell in cells:
        full = make_config(budget, {**common, **zoo, **cell.overrides}).plain()  # method presets apply
        diffs.setdefault(cell.key, {k: v for k, v in full.items() if v != flat[k]})
    return base, diffs


def cell_ids(cells: list[Cell]) -> dict[str, str]:
    """{cell.key: readable id}; the first label of identical cells names them."""
    ids: dict[str, str] = {}
    for cell in cells:
        if cell.key not in ids:
            slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "_", cell.label).strip("_") or "cell"
            while slug in ids.values():
                slug += "_"
            ids[cell.key] = slug
    return ids


def run_cell(config: dict[str, Any], *, cells: dict[str, dict], base: dict[str, Any], data: list, zoo,
             options) -> None:
    """The sweep's trainable: run_trial with the cell's overrides and the seed."""
    from tune.trainable import run_trial

    run_trial({**cells[config["cell"]], **paired_seeds(int(config["seed"]))},
              base=base, data=data, zoo=zoo, options=options)


def paired_seeds(seed: int) -> dict[str, int]:
    """Grid seed -> the cell's seeds: the same in every cell, so cells differ only by their overrides."""
    return {"distill.seed": seed, "eval.seed": seed}


def sweep_name(name: str, dataset: str, ipc: int, budget: str) -> str:
    """The sweep's Tune run folder under --storage."""
    return f"{name}-{dataset}-ipc{ipc}-{budget}"


# --- the sweep ----------------------------------------------------------------------------------
def run_sweep(name: str, cells: list[Cell], args: argparse.Namespace, paper: dict[str, float] | None = None,
              paper_setting: str | None = None, ipc: int | None = None, proxy_every: int = 0,
              notes: list[str] | None = None, stem: str | None = None,
              paper_curve: dict[float, float] | None = None, proxy_epochs: int = 0,
              effect: EffectSpec | None = None) -> SweepOutput:
    """Cells x seeds as one Tune run; one row per cell in RESULTS/<name>/<dataset>-ipc<N>.{md,parquet,png};
    `effect` names the sweep's effect (ablations/stats.py): its CI and verdict end the table."""
    from ray import tune

    from ablations import report
    from tune.experiment import open_experiment
    from tune.tables import trial_table, write_tables

    t0 = time.time()
    ipc = ipc if ipc is not None else parse_ints(args.ipc, "--ipc")[0]
    seeds = parse_seeds(args.seeds)
    cfg, diffs = sweep_configs(args.budget, common_overrides(args, ipc), cells)
    ids = cell_ids(cells)
    folder = sweep_name(name, cfg.data.dataset, ipc, args.budget)
    prog = f"ablations.{name}"
    print(f"{name}: {len(ids)} cells x {len(seeds)} seeds on {cfg.data.dataset} IPC {ipc}, budget {args.budget}; "
          f"cells: {', '.join(dict.fromkeys(c.label for c in cells))}; zoo M={cfg.zoo.num_models} "
          f"E={list(cfg.zoo.snapshots)}", flush=True)

    def check(storage, folder: str) -> None:
        if storage.exists(folder) and not args.resume:
            raise DsdmError(f"'{storage.uri(folder)}' already holds this sweep; pass --resume to continue (or finish) "
                            "it, or another --storage")
        # a ledger without Tune state: started, stopped before Tune saved anything (resumable)
        if args.resume and not tune.Tuner.can_restore(storage.uri(folder)) and not Ledger(storage, folder).exists():
            raise DsdmError(f"nothing to resume at '{storage.uri(folder)}'; run without --resume first")

    cell_diffs = {ids[k]: d for k, d in diffs.items()}
    with open_experiment(cfg, Runner.from_args(args), folder, prog=prog, trials=len(ids) * len(seeds),
                         resume=args.resume, data_root=args.data_root, check=check,
                         restarts_on_resume=lambda storage, folder: Ledger(storage, folder).exists()) as exp:
        ledger = Ledger(exp.storage, folder)
        started = time.time()
        sessions = ledger.start_session(args.resume, getattr(args, "command", ""))
        try:
            parts = ledger.parts(seeds, args.resume)
            exp.open_parent(folder, {**cfg.plain(), "sweep.name": name, "sweep.seeds": json.dumps(parts[0]["seeds"]),
                                     "sweep.cells": json.dumps(cell_diffs, default=str)[:6000],
                                     **{f"sweep.part{i}.seeds": json.dumps(part["seeds"])  # seeds added by a resume
                                        for i, part in enumerate(parts[1:], 2)}}, tags={"dsdm.sweep": name})
            with exp.running(keep_ray=True):  # sweep_session stops it
                # a copied trial has no iteration history: sweeps that plot it (proxy curves) compute every trial
                options = exp.trial_options(proxy_every, proxy_epochs or None,
                                            reuse=not getattr(args, "fresh", False) and not proxy_every)
                trainable = exp.trainable(run_cell, options, cells=cell_diffs)
                results = []
                for part in parts:  # in order: a resume finishes the earlier parts' trials first
                    results += list(_fit_part(exp, trainable, part, cell_diffs, args.resume))
                    if STOP.signal is not None:
                        raise KeyboardInterrupt  # Tune saved its state; finished cells stay finished
                exp.recorder.close_open_runs("FAILED", keep=exp.parent.run_id)  # trials that died unreported
                trials = with_runs(trial_table(results, ["cell", "seed"]), results)
                trials["session"] = [session_of(sessions, t) if s == "DONE" else None
                                     for t, s in zip(trials["finished"], trials["status"])]
                trials["part"] = [part_of(parts, seed) for seed in trials["seed"]]
                write_tables(trials, exp.storage, folder)  # per-trial table next to the Tune run
        finally:  # interrupted or not, this invocation's wall time (zoo included) joins the ledger
            ledger.end_session(sessions, time.time() - started)
        seeds = grid_seeds(name, seeds, trials)
        wall = time.time() - t0 + earlier_wall(sessions)
        table = aggregate(cells, ids, trials, paper or {}, args.budget, wall)
        runs = unit_runs(cells, ids, trials)
        verdict = ""
        if effect is not None:
            table, verdict = sweep_effect(table, runs, effect)
        meta = {"sweep": name, "dataset": cfg.data.dataset, "ipc": ipc, "budget": args.budget, "seeds": seeds,
                "command": getattr(args, "command", ""), "wall_s": wall, "paper_setting": paper_setting,
                "zoo": f"M={cfg.zoo.num_models} x E={list(cfg.zoo.snapshots)} "
                       f"({'trained' if exp.zoo_info['trained'] else 'reused'})",
                "cfg": cfg, "notes": notes or [], "paper_curve": paper_curve, "verdict": verdict}
        files = report.write_sweep(table, Path(args.results) / name / (stem or f"{cfg.data.dataset}-ipc{ipc}"), meta,
                                   runs)
        exp.finish({"sweep_seconds": wall}, list(files.values()))
    print(report.markdown(table, meta))
    print(f"tables: {files['md']} {files['parquet']}\nplot: {files['png']}\nwall time: {wall:.1f}s", flush=True)
    return SweepOutput(table, trials, results, cfg, exp.dataset, exp.zoo_info, files, wall, exp.recorder,
                       exp.parent.run_id)


def grid_seeds(name: str, asked: list[int], trials) -> list[int]:
    """The seeds the sweep ran: a resume adds the seeds --seeds names (Ledger.parts) but never drops
    one, so the table may hold more than asked; say so when it does."""
    ran = sorted({int(s) for s in trials["seed"]}) if len(trials) else asked
    if set(ran) - set(asked):
        print(f"ablations.{name}: this sweep has seeds {ran}; --seeds {asked} adds seeds to a started sweep "
              "but never drops any", file=sys.stderr, flush=True)
    return ran


def _fit_part(exp, trainable, part: dict, cells: dict[str, dict], resume: bool):
    """One part's Tune run: on --resume restored where Tune saved it, else started over its cells x seeds."""
    from ray import tune

    from tune.experiment import make_tuner

    restore = resume and tune.Tuner.can_restore(exp.storage.uri(part["folder"]))
    tuner = make_tuner(trainable, exp.runner, exp.storage, part["folder"], restore=restore,
                       param_space={"cell": tune.grid_search(list(cells)), "seed": tune.grid_search(part["seeds"])})
    return exp.fit(tuner)
