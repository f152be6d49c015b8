"""`python -m tune.search --dataset cifar10`: the zoo on an actor pool, DSDM trials under
Ray Tune + Optuna, every trial and the cross-architecture evaluations recorded in MLflow.

The parser and the search's sequence; the experiment around it (checks, lock, Ray, zoo, MLflow
parent, Tuner) is tune/experiment.py's, shared with every sweep; the method lives in `dsdm/`.

Bad input is refused before Ray starts (one line on stderr naming the fix, exit code 2,
nothing written); SIGINT and SIGTERM stop the search after Tune saved its state (exit
130/143), and `--resume` finishes it. One search per experiment folder at a time (a lock
file holds its pid and host). docs/reliability.md lists what was tried.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dsdm.cli import HelpFormatter
from dsdm.config import BUDGETS, Config, make_config, parse_set_pairs, zoo_covering
from dsdm.errors import DsdmError
from tune.runner import BUDGET_HELP, DATASET_HELP, Runner, add_data_flags, add_runner_flags
from tune.signals import STOP, interrupted_exit

PROG = "tune.search"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.search", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="digits", help=DATASET_HELP)
    add_data_flags(p)
    p.add_argument("--ipc", type=int, default=10, help="stored images per class")
    p.add_argument("--num-samples", type=int, default=20, help="trials Optuna proposes")
    p.add_argument("--budget", default="paper", choices=list(BUDGETS), help=BUDGET_HELP)
    p.add_argument("--name", help="experiment folder under --storage (default DATASET-ipcN-BUDGET)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials are kept")
    p.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo", help="Tune trial scheduler")
    p.add_argument("--proxy-every", type=int, default=0, help="iterations between proxy val accuracies (ASHA)")
    p.add_argument("--fix", nargs="*", default=[], metavar="KEY=VALUE", help="remove a key from the space, e.g. lambda1=50")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    p.add_argument("--cross-arch", choices=["best", "all", "none"], default="best",
                   help="which trials' sets are evaluated on ConvNet-3, ResNet-10 and DenseNet-121 afterwards")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler and distillation seed")
    add_runner_flags(p)
    return p


def base_config(args: argparse.Namespace, space: dict, fixed: dict) -> Config:
    """Budget + flags; the zoo covers every M and E the space can draw."""
    from tune.space import zoo_grid

    overrides: dict[str, Any] = {"data.dataset": args.dataset, "distill.ipc": args.ipc,
                                 "distill.method": "dsdm", "distill.seed": args.seed}
    if args.data_root:
        overrides["data.root"] = str(Path(args.data_root).resolve())
    if args.offline:
        overrides["data.offline"] = True
    overrides.update(parse_set_pairs(args.set))
    overrides.update(fixed)
    models, epochs = zoo_grid(space, fixed)
    for key, value in zoo_covering([models], epochs).items():
        overrides.setdefault(key, value)
    overrides.setdefault("distill.num_models", models)
    overrides.setdefault("distill.pretrain_epochs", max(epochs))
    return make_config(args.budget, overrides)


def base_config(args: argparse.Namespace, space: dict, fixed: dict) -> Config:
    """Budget + flags; the zoo covers every M and E the space can draw."""
    from tune.space import zoo_grid

    overrides: dict[str, Any] = {"data.dataset": args.dataset, "distill.ipc": args.ipc,
                                 "distill.method": "dsdm", "distill.seed": args.seed}
    if args.data_root:
        overrides["data.root"] = str(Path(args.data_root).resolve())
    if args.offline:
        overrides["data.offline"] = True
    overrides.update(parse_set_pairs(args.set))
    overrides.update(fixed)
    models, epochs = zoo_grid(space, fixed)
    for key, value in zoo_covering([models], epochs).items():
        overrides.setdefault(key, value)
    overrides.setdefault("distill.num_models", models)
    overrides.setdefault("distill.pretrain_epochs", max(epochs))
    return make_config(args.budget, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    STOP.install(PROG)
    try:
        run_search(args)
    except DsdmError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return interrupted_exit(PROG, exc)
    return 0


def run_search(args: argparse.Namespace) -> dict:
    from tune.diskfull import no_trial_done
    from tune.experiment import open_experiment
    from tune.preflight import check_fixed
    from tune.space import parse_fixed, search_space
    from tune.tables import write_tables

    t0 = time.time()
    # every check that needs no Ray, no MLflow and no dataset first: bad input costs ~1 s and writes nothing
    if args.num_samples < 1:
        raise DsdmError(f"--num-samples must be >= 1 (got {args.num_samples})")
    if args.scheduler == "asha" and not args.proxy_every:
        raise DsdmError("--scheduler asha needs --proxy-every K (iterations between proxy accuracies)")
    fixed = parse_fixed(args.fix)
    check_fixed(args.budget, fixed, args.set)
    space = search_space(args.budget, fixed)
    cfg = base_config(args, space, fixed)
    runner = Runner.from_args(args)
    name = args.name or f"{cfg.data.dataset}-ipc{cfg.distill.ipc}-{args.budget}"

    def check(storage, name: str) -> None:
        from ray import tune

        if storage.exists(name) and not args.resume:  # a folder or a bucket prefix
            raise DsdmError(f"'{storage.uri(name)}' already holds a search; pass --resume to continue it or --name NEW "
                            "for a new one")
        if args.resume and not tune.Tuner.can_restore(storage.uri(name)):
            raise DsdmError(f"nothing to resume at '{storage.uri(name)}'; run without --resume first")

    with open_experiment(cfg, runner, name, prog=PROG, trials=args.num_samples, resume=args.resume,
                         data_root=args.data_root, check=check) as exp:
        exp.open_parent(f"search-{name}", {**cfg.plain(), "search.num_samples": args.num_samples,
                                           "search.scheduler": args.scheduler,
                                           "search.space": json.dumps(sorted(space))})
        with exp.running():
            table = _tune_and_cross_arch(args, exp, space)
            # in --local-dir (printed, logged to MLflow) and, with a URI storage, beside the Tune run
            md, pq = (Path(f) for f in write_tables(table, exp.storage.local_only(), name))
            if exp.storage.remote:
                write_tables(table, exp.storage, name)
            if table[table["status"] == "DONE"].empty:  # every trial errored: a failed search
                raise no_trial_done(exp.storage, name)
            best = table.iloc[0].to_dict()
            exp.finish({"best_val_acc": best.get("val_acc") or float("nan"),
                        "best_test_acc": best.get("test_acc") or float("nan"),
                        "search_seconds": time.time() - t0}, [md, pq])
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print(f"\nbest (by validation accuracy): {json.dumps({k: best.get(k.split('.')[-1]) for k in sorted(space)})}")
    print(f"best distilled set: {best.get('set_path', '')}")
    print(f"tables: {md} {pq}\nMLflow: mlflow ui --backend-store-uri {exp.mlflow_uri}")
    print(f"search wall time: {time.time() - t0:.1f}s")
    return {"table": table, "path": md.parent, "zoo": exp.zoo_info, "mlflow_uri": exp.mlflow_uri}


def make_searcher(args: argparse.Namespace, cfg: Config, slots: int):
    """Optuna's TPE (seeded), at most `slots` trials at once, and the trial scheduler."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed)),
                                  max_concurrent=slots)
    if args.scheduler == "asha":
        return searcher, ASHAScheduler(time_attr="iteration", max_t=cfg.distill.iterations,
                                       grace_period=args.proxy_every, reduction_factor=2)
    return searcher, FIFOScheduler()


def _tune_and_cross_arch(args: argparse.Namespace, exp, space: dict):
    from tune import cross_arch as xa
    from tune.experiment import make_tuner
    from tune.faults import fault_point
    from tune.recorder import XARCH
    from tune.tables import record_placement, trial_table
    from tune.trainable import run_trial

    trainable = exp.trainable(run_trial, exp.trial_options(proxy_every=args.proxy_every))
    searcher, scheduler = (None, None) if args.resume else make_searcher(args, exp.cfg, exp.runner.trial_slots())
    tuner = make_tuner(trainable, exp.runner, exp.storage, exp.name, space, restore=args.resume,
                       search_alg=searcher, scheduler=scheduler, num_samples=args.num_samples)
    results = exp.fit(tuner)
    record_placement(exp.storage, exp.name, exp.data_ref, exp.zoo_info)
    if STOP.signal is not None:
        raise KeyboardInterrupt  # Tune saved its state; finished trials stay finished

    table = trial_table(results, sorted(space))
    done = table[table["status"] == "DONE"]
    if args.cross_arch == "none" or done.empty:
        return table
    previous = exp.recorder.cross_arch_results(xa.CROSS_ARCHS, prefix=XARCH)
    chosen = [t for t in (done if args.cross_arch == "all" else done.head(1))["trial_id"] if t not in previous]
    sets = xa.put_sets(results, chosen)
    # a test deletes the trials' checkpoint folders here: the phase reads nothing from them
    fault_point("before_cross_arch", 1, paths=[str(Path(r.checkpoint.path).parent) for r in results
                                              if r.checkpoint is not None and not exp.storage.remote])
    eval_cfg, runs = xa.eval_section(exp.cfg), exp.cfg.eval.runs
    jobs = [xa.CrossArchJob(trial_id, sets[trial_id], arch,
                            {**eval_cfg, "archs": [arch], "runs": runs + 2 if arch == "convnet3" else runs})
            for arch in xa.CROSS_ARCHS for trial_id in chosen]  # "ConvNet-3 with more runs"
    cross = xa.run_cross_arch(jobs, exp.data_ref, exp.runner.trial_cpus, lambda line: print(line, flush=True),
                              exp.runner.trial_gpus)
    xa.record_cross_arch(exp.recorder, exp.parent.run_id, cross, prefix=XARCH)
    for trial_id, res in {**previous, **{t: {a: (r["mean"], r["std"]) for a, r in v.items()}
                                         for t, v in cross.items()}}.items():
        for arch, (mean, std) in res.items():
            table.loc[table["trial_id"] == trial_id, f"{XARCH}{arch}"] = f"{mean:.2f} ± {std:.2f}"
    return table


if __name__ == "__main__":
    sys.exit(main())
