"""What every sweep shares: the CLI, one zoo, the cells x seeds as ONE Tune grid run, MLflow.

A sweep module is a list of `Cell`s (a label and dotted config overrides) plus the paper's
numbers; `run_sweep` does the rest with `tune/`'s machinery (no second pipeline):
  1. base config = budget + flags, its zoo widened to the budget's whole M x E grid (and
     every cell's M and E), so ONE zoo per dataset x budget serves every sweep and
     `tune.search`; trained once by the actor pool under `--storage/zoos/`, or reused;
  2. the cells x seeds run as one Tune grid search over `run_cell` (which is
     `tune.trainable.run_trial` with the cell's overrides), recorded in MLflow under the
     experiment `dsdm-<dataset>-ipc<N>` and a parent run named after the sweep; seeds added
     by a later `--resume --seeds N` run as a second grid (sweep_parts); a trial another sweep
     already finished with the same config and seed is copied, not re-run (unless --fresh);
  3. per cell: mean, sd and 95% CI of the ConvNet-3 test accuracy over seeds x evaluation
     runs, the validation accuracy, the paper's value, which invocation finished it, and
     (when the sweep names one) the sweep's effect and verdict (ablations/stats.py), written
     as md + parquet (+ the per-network values) + a PNG.

Paired design: seed s of the grid is the distillation seed AND the evaluation seed of every
cell (run_cell), so evaluation network r of seed s has the same initialisation, data order
and augmentation draws in every cell; a unit (s, r) is comparable across cells.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ablations.stats import EffectSpec, mean_ci, sweep_effect
from dsdm.cli import HelpFormatter
from dsdm.config import BUDGETS, Config, make_config
from dsdm.errors import DsdmError
from tune.search import (BUDGET_HELP, STOP, Interrupted, check_storage, finite_float,  # sets Tune's env defaults
                         interrupted_exit, paper_on_cpu_note, resume_advice, search_lock, start_ray, trial_table,
                         write_tables)
from tune.space import BUDGET_GRIDS

ACC = "convnet3"  # run_trial evaluates ConvNet-3; cross-arch sweeps add their own
# Distillation seeds a sweep runs when --seeds is not given: paired statistics need >= 2.
DEFAULT_SEEDS = {"resolve": "2"}


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
    trials: Any  # one row per trial (tune.search.trial_table + runs)
    results: Any  # Tune ResultGrid
    cfg: Config
    dataset: Any
    zoo_info: dict
    files: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0
    mlflow: dict = field(default_factory=dict)  # uri, experiment_id, parent, search_id


# --- CLI ----------------------------------------------------------------------------------------
def build_parser(prog: str, doc: str, dataset: str = "digits", ipc: str = "10") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default=dataset, help="digits, mnist, fashionmnist, svhn, cifar10, cifar100, speechcommands")
    p.add_argument("--ipc", default=ipc, help="images per class; several comma-separated (one table each)")
    p.add_argument("--budget", default="paper", choices=list(BUDGETS), help=BUDGET_HELP)
    p.add_argument("--seeds", help="N (seeds 0..N-1) or a list '0,3,7'; each is the distillation and evaluation "
                   "seed of every cell (paired); default 2 under --budget resolve, else 1")
    p.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start Ray here")
    p.add_argument("--storage", type=Path, default=Path("runs"), help="Tune runs, the shared zoo, MLflow sqlite")
    p.add_argument("--results", type=Path, default=Path("results"), help="tables and plots go to RESULTS/<sweep>/")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished cells are kept")
    p.add_argument("--data-root", help="dataset folder (default $DSDM_DATA, else ./data)")
    p.add_argument("--offline", action="store_true", help="never download datasets")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--trial-cpus", type=finite_float, default=1, help="CPUs per trial")
    p.add_argument("--trial-gpus", type=finite_float, default=0, help="GPUs per trial (fractions allowed)")
    p.add_argument("--zoo-cpus", type=finite_float, default=1, help="CPUs per pre-training actor")
    p.add_argument("--zoo-gpus", type=finite_float, default=0, help="GPUs per pre-training actor (fractions allowed)")
    p.add_argument("--mlflow-uri", help="tracking server URL (default: sqlite file under --storage)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial (from its checkpoint)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, every cell")
    p.add_argument("--fresh", action="store_true",
                   help="compute every trial, even one whose identical config and seed another sweep under --storage "
                        "already finished (by default its results are copied, and the table says from where)")
    return p


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DsdmError(f"{what} expects integers separated by commas, got '{text}'") from None
    if not values:
        raise DsdmError(f"{what} is empty")
    return values


def parse_seeds(text: str | list[int]) -> list[int]:
    if isinstance(text, list):  # already parsed (a caller that chose the seeds itself)
        return text
    values = parse_ints(text, "--seeds")
    return list(range(values[0])) if len(values) == 1 and "," not in str(text) else values


def parse_sets(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DsdmError(f"--set expects KEY=VALUE, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def budget_grid(budget: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(M grid, E grid) the budget's zoo affords (tune/space.py)."""
    return BUDGET_GRIDS[budget]


def cli(run: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
        argv: list[str] | None = None) -> int:
    """Parse, run, turn DsdmError into one line + exit code 2 (as every dsdm CLI does)."""
    args = parser.parse_args(argv)
    args.seeds = args.seeds or DEFAULT_SEEDS.get(args.budget, "1")
    args.command = " ".join(["python -m", parser.prog.split()[-1], *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    STOP.install()  # SIGINT/SIGTERM stop Tune after it saved its state, as in tune.search
    try:
        run(args)
    except DsdmError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return interrupted_exit(parser.prog, exc)
    return 0


@contextlib.contextmanager
def ray_session(args: argparse.Namespace):
    """Start Ray unless the caller (a test, a multi-IPC sweep) already did; stop only what we started."""
    import ray

    if ray.is_initialized():
        yield
        return
    start_ray(args.address, args.num_cpus)
    STOP.install()  # ray.init replaced the SIGTERM handler
    try:
        yield
    finally:
        ray.shutdown()


# --- configs ------------------------------------------------------------------------------------
def common_overrides(args: argparse.Namespace, ipc: int) -> dict[str, Any]:
    out: dict[str, Any] = {"data.dataset": args.dataset, "distill.ipc": ipc}
    if args.data_root:
        out["data.root"] = str(Path(args.data_root).resolve())
    if args.offline:
        out["data.offline"] = True
    return {**out, **parse_sets(args.set)}


def sweep_configs(budget: str, common: dict, cells: list[Cell]) -> tuple[Config, dict[str, dict]]:
    """Base config (zoo covering the budget grid and every cell) and each unique cell's diff from it."""
    default = make_config(budget, common).distill
    grid_m, grid_e = budget_grid(budget)
    ms = [int(c.overrides.get("distill.num_models", default.num_models)) for c in cells]
    es = [int(c.overrides.get("distill.pretrain_epochs", default.pretrain_epochs)) for c in cells]
    zoo = {"zoo.num_models": max([*ms, *grid_m]), "zoo.snapshots": tuple(sorted({*es, *grid_e}))}
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
             options: dict[str, Any]) -> None:
    """The sweep's trainable: run_trial with the cell's overrides and the seed."""
    from tune.trainable import run_trial

    run_trial({**cells[config["cell"]], **paired_seeds(int(config["seed"]))},
              base=base, data=data, zoo=zoo, options=options)


def paired_seeds(seed: int) -> dict[str, int]:
    """Grid seed -> the cell's seeds: the same in every cell, so cells differ only by their overrides."""
    return {"distill.seed": seed, "eval.seed": seed}


# --- the sweep ----------------------------------------------------------------------------------
def run_sweep(name: str, cells: list[Cell], args: argparse.Namespace, paper: dict[str, float] | None = None,
              paper_setting: str | None = None, ipc: int | None = None, proxy_every: int = 0,
              notes: list[str] | None = None, stem: str | None = None,
              paper_curve: dict[float, float] | None = None, proxy_epochs: int = 0,
              effect: EffectSpec | None = None) -> SweepOutput:
    """Cells x seeds as one Tune run; one row per cell in RESULTS/<name>/<dataset>-ipc<N>.{md,parquet,png};
    `effect` names the sweep's effect (ablations/stats.py): its CI and verdict end the table."""
    from ablations import report

    t0 = time.time()
    ipc = ipc if ipc is not None else parse_ints(args.ipc, "--ipc")[0]
    seeds = parse_seeds(args.seeds)
    cfg, diffs = sweep_configs(args.budget, common_overrides(args, ipc), cells)
    ids = cell_ids(cells)
    storage = check_storage(args.storage)
    path = sweep_path(storage, name, cfg.data.dataset, ipc, args.budget)
    print(f"{name}: {len(ids)} cells x {len(seeds)} seeds on {cfg.data.dataset} IPC {ipc}, budget {args.budget}; "
          f"cells: {', '.join(dict.fromkeys(c.label for c in cells))}; zoo M={cfg.zoo.num_models} "
          f"E={list(cfg.zoo.snapshots)}", flush=True)
    with search_lock(storage / f"{path.name}.lock", prog=f"ablations.{name}"), ray_session(args):
        proxy = (proxy_every, proxy_epochs or proxy_epochs_default(cfg))
        try:
            run = _tune_cells(name, args, cfg, path, {ids[k]: d for k, d in diffs.items()}, seeds, proxy)
        except KeyboardInterrupt:
            raise Interrupted(resume_advice(str(path), path, False, restarts_on_resume=ledger(path).exists())) from None
        results, trials, dataset, zoo_info = run["results"], run["trials"], run["dataset"], run["zoo_info"]
        seeds = grid_seeds(name, seeds, trials)
        wall = time.time() - t0 + run["earlier_wall_s"]
        table = aggregate(cells, ids, trials, paper or {}, args.budget, wall)
        runs = unit_runs(cells, ids, trials)
        verdict = ""
        if effect is not None:
            table, verdict = sweep_effect(table, runs, effect)
        meta = {"sweep": name, "dataset": cfg.data.dataset, "ipc": ipc, "budget": args.budget, "seeds": seeds,
                "command": getattr(args, "command", ""), "wall_s": wall, "paper_setting": paper_setting,
                "zoo": f"M={cfg.zoo.num_models} x E={list(cfg.zoo.snapshots)} ({'trained' if zoo_info['trained'] else 'reused'})",
                "cfg": cfg, "notes": notes or [], "paper_curve": paper_curve, "verdict": verdict}
        files = report.write_sweep(table, Path(args.results) / name / (stem or f"{cfg.data.dataset}-ipc{ipc}"), meta,
                                   runs)
        _finish_parent(run["uri"], run["parent"], files, wall)
    print(report.markdown(table, meta))
    print(f"tables: {files['md']} {files['parquet']}\nplot: {files['png']}\nwall time: {wall:.1f}s", flush=True)
    return SweepOutput(table, trials, results, cfg, dataset, zoo_info, files, wall,
                       {k: run[k] for k in ("uri", "experiment_id", "parent", "search_id")})


def grid_seeds(name: str, asked: list[int], trials) -> list[int]:
    """The seeds the sweep ran: a resume adds the seeds --seeds names (sweep_parts) but never drops
    one, so the table may hold more than asked; say so when it does."""
    ran = sorted({int(s) for s in trials["seed"]}) if len(trials) else asked
    if set(ran) - set(asked):
        print(f"ablations.{name}: this sweep has seeds {ran}; --seeds {asked} adds seeds to a started sweep "
              "but never drops any", file=sys.stderr, flush=True)
    return ran


def sweep_path(storage: Path, name: str, dataset: str, ipc: int, budget: str) -> Path:
    """The sweep's Tune run folder under --storage."""
    return storage / f"{name}-{dataset}-ipc{ipc}-{budget}"


def proxy_epochs_default(cfg: Config) -> int:
    return max(1, cfg.eval.epochs // 10 or 5)  # as tune.search passes to its trials


def _tune_cells(name, args, cfg: Config, path: Path, cells: dict[str, dict], seeds: list[int],
                proxy: tuple[int, int]):
    from ray import tune

    if path.exists() and not args.resume:
        raise DsdmError(f"'{path}' already holds this sweep; pass --resume to continue (or finish) it, "
                        "or another --storage")
    # a ledger without Tune state: started, stopped before Tune saved anything (resumable)
    if args.resume and not tune.Tuner.can_restore(str(path)) and not ledger(path).exists():
        raise DsdmError(f"nothing to resume at '{path}'; run without --resume first")
    started = time.time()
    sessions = start_session(path, args.resume, getattr(args, "command", ""))
    try:
        return _run_cells(name, args, cfg, path, cells, sweep_parts(path, seeds, args.resume), proxy, sessions)
    finally:  # interrupted or not, this invocation's wall time (zoo included) joins the ledger
        end_session(path, sessions, time.time() - started)


def parts_file(path: Path) -> Path:
    return path.parent / f"{path.name}.parts.json"


def sweep_parts(path: Path, seeds: list[int], resume: bool) -> list[dict]:
    """The sweep's Tune runs ("parts"), each every cell x its seeds. Tune cannot add grid points
    to a restored run, so a resume whose --seeds names seeds the sweep lacks adds a part for those
    (Tune folder `<sweep>.seeds<a>-<b>`) and the finished ones are kept, not re-run. Listed in
    `<sweep>.parts.json`, written before a part starts; a resume never drops seeds."""
    from ray import tune

    file = parts_file(path)
    parts: list[dict] = []
    if resume and file.is_file():
        parts = json.loads(file.read_text())
    elif resume and tune.Tuner.can_restore(str(path)):  # a sweep from before parts were listed: one Tune run
        ran = sorted({int(t.config["seed"]) for t in tune.ExperimentAnalysis(str(path)).trials})
        parts = [{"folder": path.name, "seeds": ran}]
    have = {s for part in parts for s in part["seeds"]}
    new = [s for s in seeds if s not in have]
    if new:
        folder = f"{path.name}.seeds{'-'.join(map(str, new))}" if parts else path.name
        parts.append({"folder": folder, "seeds": new})
    if new or not file.is_file():
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text(json.dumps(parts, indent=1))
        tmp.replace(file)
    return parts


def _run_cells(name, args, cfg: Config, path: Path, cells: dict[str, dict], parts: list[dict],
               proxy: tuple[int, int], sessions: list[dict]):
    import ray
    from ray import tune

    from dsdm.data import load_dataset
    from tune import tracking
    from tune.zoo import load_or_train_zoo_on_pool, put_dataset

    seeds = sorted({s for part in parts for s in part["seeds"]})
    dataset = load_dataset(cfg.data.dataset, cfg.data.root or None, cfg.data.offline, cfg.data.val_fraction, cfg.data.seed)
    paper_on_cpu_note(args.budget, args.trial_gpus, len(cells) * len(seeds), prog=f"ablations.{name}")
    storage = path.parent
    uri = args.mlflow_uri or tracking.default_uri(storage)
    tracking.quiet_mlflow()
    tracking.check_reachable(uri)
    experiment_id = tracking.ensure_experiment(uri, tracking.experiment_name(dataset.name, cfg.distill.ipc),
                                               storage / "mlartifacts")
    parent = tracking.search_run(uri, experiment_id, str(path), name=path.name, tags={"dsdm.sweep": name})
    tracking.log_params(uri, parent, {**cfg.plain(), "sweep.name": name, "sweep.seeds": json.dumps(parts[0]["seeds"]),
                                      "sweep.cells": json.dumps(cells, default=str)[:6000],
                                      **{f"sweep.part{i}.seeds": json.dumps(part["seeds"])  # seeds added by a resume
                                         for i, part in enumerate(parts[1:], 2)}})
    try:  # from the zoo to Tune's end: an interrupt or error ends the sweep's open runs KILLED / FAILED
        data_ref = put_dataset(dataset)
        cpus = ray.cluster_resources().get("CPU", 1)
        actors = max(1, min(cfg.zoo.num_models, int(cpus // max(args.zoo_cpus, 0.01))))
        zoo_refs, zoo_info = load_or_train_zoo_on_pool(dataset, data_ref, cfg.zoo, storage, cfg.data.seed,
                                                       cfg.data.val_fraction, actors, args.zoo_cpus, args.zoo_gpus)
        (storage / f"{path.name}.zoo.json").write_text(json.dumps(zoo_info, indent=1))
        options = {"mlflow_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent, "search_id": str(path),
                   "threads": args.trial_cpus, "gpus": args.trial_gpus, "proxy_every": proxy[0],
                   "proxy_epochs": proxy[1],
                   # a copied trial has no iteration history: sweeps that plot it (proxy curves) compute every trial
                   "reuse": not getattr(args, "fresh", False) and not proxy[0]}
        trainable = tune.with_resources(
            tune.with_parameters(run_cell, cells=cells, base=cfg.plain(), data=[data_ref], zoo=zoo_refs,
                                 options=options),
            {"cpu": args.trial_cpus, "gpu": args.trial_gpus})
        results = []
        for part in parts:  # in order: a resume finishes the earlier parts' trials first
            results += list(_fit_part(trainable, storage, part, cells, args))
            if STOP.signal is not None:
                raise KeyboardInterrupt  # Tune saved its state; finished cells stay finished
    except BaseException as exc:
        tracking.close_open_runs(uri, experiment_id, str(path), "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    tracking.close_open_runs(uri, experiment_id, str(path), "FAILED", keep=parent)  # trials that died unreported
    trials = with_runs(trial_table(results, ["cell", "seed"]), results)
    trials["session"] = [session_of(sessions, t) if s == "DONE" else None
                         for t, s in zip(trials["finished"], trials["status"])]
    trials["part"] = [part_of(parts, seed) for seed in trials["seed"]]
    write_tables(trials, path)  # per-trial table next to the Tune run, as tune.search does
    return {"results": results, "trials": trials, "dataset": dataset, "zoo_info": zoo_info,
            "uri": uri, "parent": parent, "experiment_id": experiment_id, "search_id": str(path),
            "earlier_wall_s": earlier_wall(sessions)}


def _fit_part(trainable, storage: Path, part: dict, cells: dict[str, dict], args: argparse.Namespace):
    """One part's Tune run: on --resume restored where Tune saved it, else started over its cells x seeds."""
    from ray import tune

    folder = storage / part["folder"]
    if args.resume and tune.Tuner.can_restore(str(folder)):
        tuner = tune.Tuner.restore(str(folder), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"cell": tune.grid_search(list(cells)), "seed": tune.grid_search(part["seeds"])},
            # reuse_actors: a trial's process (torch, MLflow imported) serves the next cell
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", reuse_actors=True),
            run_config=tune.RunConfig(name=folder.name, storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    with STOP.fit():
        return tuner.fit()


def part_of(parts: list[dict], seed) -> str:
    """The Tune folder that ran a seed's trials."""
    return next((p["folder"] for p in parts if int(seed) in p["seeds"]), "")


def with_runs(trials, results):
    """Add each trial's per-network test accuracies (acc_run<i>/convnet3, in run order) and the
    time of its last report (Tune's `timestamp`) to the trial table."""
    runs, finished = {}, {}
    for r in results:
        m = r.metrics or {}
        runs[m.get("trial_id")] = [m[k] for k in sorted(m, key=_run_index) if k.startswith("acc_run") and k.endswith(f"/{ACC}")]
        finished[m.get("trial_id")] = m.get("timestamp")
    trials["test_runs"] = [runs.get(t, []) for t in trials["trial_id"]]
    trials["finished"] = [finished.get(t) for t in trials["trial_id"]]
    return trials


def ledger(path: Path) -> Path:
    """The sweep's session ledger, next to its Tune folder (so a fresh run that dies early leaves no
    folder behind); it exists once an invocation got past the checks, so `--resume` can restart a
    sweep stopped before Tune saved anything."""
    return path.parent / f"{path.name}.sessions.json"


def start_session(path: Path, resume: bool, command: str) -> list[dict]:
    """Append this invocation to the sweep's session ledger; returns every session so far."""
    file = ledger(path)
    sessions = []
    if resume:
        with contextlib.suppress(OSError, ValueError):
            sessions = list(json.loads(file.read_text()))
    sessions.append({"session": len(sessions) + 1, "started": time.time(), "command": command})
    _write_ledger(file, sessions)
    return sessions


def end_session(path: Path, sessions: list[dict], wall_s: float) -> None:
    """Record this invocation's wall time in the ledger, so a sweep resumed across sessions reports
    the sum (an invocation killed without its `finally` counts 0: the table's wall is then low)."""
    sessions[-1]["wall_s"] = wall_s
    _write_ledger(ledger(path), sessions)


def earlier_wall(sessions: list[dict]) -> float:
    """Wall time of the invocations before this one (their zoo, trials), so a resumed table adds it."""
    return sum(float(s.get("wall_s", 0.0)) for s in sessions[:-1])


def _write_ledger(file: Path, sessions: list[dict]) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(sessions, indent=1))
    tmp.replace(file)


def session_of(sessions: list[dict], finished: float | None) -> int | None:
    """The invocation during which a trial sent its last report. Tune stamps it in whole seconds
    (the report came at t in [finished, finished + 1)), so an invocation started less than a second
    after the previous one ended could also match: the earliest invocation whose span holds t
    wins. A span ends at started + wall_s, or where the next invocation starts when the ledger has
    no wall_s (an invocation killed before its `finally`, or one from before `end_session`)."""
    if finished is None or finished != finished:
        return None
    t = float(finished)
    for i, s in enumerate(sessions):
        nxt = sessions[i + 1]["started"] if i + 1 < len(sessions) else math.inf
        end = s["started"] + float(s["wall_s"]) if "wall_s" in s else nxt
        if s["started"] < t + 1 and t <= end:
            return s["session"]
    started = [s["session"] for s in sessions if s["started"] < t + 1]
    return max(started) if started else sessions[0]["session"]


def unit_runs(cells: list[Cell], ids: dict[str, str], trials):
    """One row per (cell, seed, evaluation network) of finished trials: the paired units the
    statistics resample (unit 's<seed>r<run>' is the same networks' seeds in every cell)."""
    import pandas as pd

    rows = []
    for label, key in dict.fromkeys((c.label, c.key) for c in cells):
        done = trials[(trials["cell"] == ids[key]) & (trials["status"] == "DONE")]
        for _, t in done.iterrows():
            for run, acc in enumerate(t["test_runs"]):
                rows.append({"cell": label, "seed": int(t["seed"]), "run": run, "unit": f"s{int(t['seed'])}r{run}",
                             "test": float(acc), "trial_id": t["trial_id"], "session": t.get("session")})
    return pd.DataFrame(rows, columns=["cell", "seed", "run", "unit", "test", "trial_id", "session"])


def _run_index(key: str) -> int:
    match = re.match(r"acc_run(\d+)/", key)
    return int(match.group(1)) if match else -1


def aggregate(cells: list[Cell], ids: dict[str, str], trials, paper: dict[str, float], budget: str, wall: float):
    """One row per cell: test mean, sd, 95% CI over seeds x eval runs, val mean, paper, time, session."""
    import pandas as pd

    rows = []
    for cell in cells:
        done = trials[(trials["cell"] == ids[cell.key]) & (trials["status"] == "DONE")]
        tests = [a for runs in done["test_runs"] for a in runs]
        sessions = sorted({int(s) for s in done.get("session", []) if s is not None and s == s})
        ran = done[done["reused_from"] == ""] if "reused_from" in done else done  # this sweep's compute only
        rows.append({"group": cell.group, "cell": cell.label, "x": cell.x, "xscale": cell.xscale,
                     **mean_ci(tests), **summary(tests, "test"), **summary(list(done["val_acc"]), "val"),
                     "session": ",".join(map(str, sessions)), "reused": reused(done),
                     "paper": paper.get(cell.label), "trials": len(done),
                     "failed": int((trials["cell"] == ids[cell.key]).sum() - len(done)),
                     "trial_s": float(ran["seconds"].sum()), "distill_s": _total(ran, "distill_s"),
                     "eval_s": _total(ran, "eval_s"), "budget": budget, "wall_s": wall,
                     "overrides": json.dumps(cell.overrides, default=str)})
    return pd.DataFrame(rows)


def reused(done) -> str:
    """'s<seed> <- <sweep>/<trial>' for a cell's trials copied from an identical finished one."""
    if "reused_from" not in done:
        return ""
    return "; ".join(f"s{int(seed)} ← {src}" for seed, src in sorted(zip(done["seed"], done["reused_from"])) if src)


def _total(done, column: str) -> float:
    """Seconds summed over a cell's trials; NaN for tables written before the column existed."""
    return float(done[column].sum()) if column in done and len(done) else float("nan")


def summary(values: list[float], prefix: str) -> dict[str, float]:
    import statistics

    values = [float(v) for v in values if v is not None and v == v]
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else float("nan"))
    return {f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_n": len(values)}


def _finish_parent(uri: str, parent: str, files: dict[str, Path], wall: float) -> None:
    from tune import tracking

    tracking.log_metrics(uri, parent, {"sweep_seconds": wall})
    tracking.log_artifacts(uri, parent, list(files.values()))
    tracking.finish(uri, parent)


def for_each_ipc(args: argparse.Namespace, fn: Callable[[int], Any]) -> list:
    """Run `fn(ipc)` per --ipc value inside one Ray session (and one zoo)."""
    with ray_session(args):
        return [fn(ipc) for ipc in parse_ints(args.ipc, "--ipc")]
