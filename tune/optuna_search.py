"""The Optuna search over one experiment: the space, the base config, Tune + Optuna trials and the
cross-architecture phase of the best (or every) set. `tune.search` is its command line;
`ablations.lambdas --search` calls it with a `SearchSpec` of its own (no command line in between).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dsdm.config import Config, make_config, parse_set_pairs, zoo_covering
from dsdm.errors import DsdmError
from tune.recorder import XARCH
from tune.runner import Runner
from tune.signals import STOP


@dataclass(frozen=True)
class SearchSpec:
    """What to search (the runner says where): tune.search's flags other than the runner's."""
    dataset: str = "digits"
    ipc: int = 10
    budget: str = "paper"
    num_samples: int = 20
    seed: int = 0  # Optuna's sampler and the trials' distillation seed
    fix: tuple[str, ...] = ()  # KEY=VALUE pairs removed from the space
    sets: tuple[str, ...] = ()  # KEY=VALUE config overrides
    name: str | None = None
    resume: bool = False
    scheduler: str = "fifo"
    proxy_every: int = 0
    cross_arch: str = "best"
    data_root: str | None = None
    offline: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SearchSpec":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, "fix": tuple(args.fix), "sets": tuple(args.set)})


def base_config(spec: SearchSpec, space: dict, fixed: dict) -> Config:
    """Budget + flags; the zoo covers every M and E the space can draw."""
    from tune.space import zoo_grid

    overrides: dict[str, Any] = {"data.dataset": spec.dataset, "distill.ipc": spec.ipc,
                                 "distill.method": "dsdm", "distill.seed": spec.seed}
    if spec.data_root:
        overrides["data.root"] = str(Path(spec.data_root).resolve())
    if spec.offline:
        overrides["data.offline"] = True
    overrides.update(parse_set_pairs(spec.sets))
    overrides.update(fixed)
    models, epochs = zoo_grid(space, fixed)
    for key, value in zoo_covering([models], epochs).items():
        overrides.setdefault(key, value)
    overrides.setdefault("distill.num_models", models)
    overrides.setdefault("distill.pretrain_epochs", max(epochs))
    return make_config(spec.budget, overrides)


def run_search(spec: SearchSpec, runner: Runner, prog: str = "tune.search") -> dict:
    """The search, start to end; returns its trial table, table folder, zoo record and MLflow URI."""
    from tune.diskfull import no_trial_done
    from tune.experiment import open_experiment
    from tune.preflight import check_fixed
    from tune.space import parse_fixed, search_space
    from tune.recorder import mlflow_advice
    from tune.resume import SearchRecord, check_resume, command_of, grow_samples
    from tune.tables import markdown, write_tables

    t0 = time.time()
    # every check that needs no Ray, no MLflow and no dataset first: bad input costs ~1 s and writes nothing
    if spec.num_samples < 1:
        raise DsdmError(f"--num-samples must be >= 1 (got {spec.num_samples})")
    if spec.scheduler == "asha" and not spec.proxy_every:
        raise DsdmError("--scheduler asha needs --proxy-every K (iterations between proxy accuracies)")
    fixed = parse_fixed(spec.fix)
    check_fixed(spec.budget, fixed, spec.sets)
    space = search_space(spec.budget, fixed)
    cfg = base_config(spec, space, fixed)
    name = spec.name or f"{cfg.data.dataset}-ipc{cfg.distill.ipc}-{spec.budget}"

    command = command_of(spec, fixed, parse_set_pairs(spec.sets))
    record: SearchRecord | None = None
    more_samples: int | None = None

    def check(storage, name: str) -> None:
        from ray import tune

        nonlocal record, more_samples
        if storage.exists(name) and not spec.resume:  # a folder or a bucket prefix
            raise DsdmError(f"'{storage.uri(name)}' already holds a search; pass --resume to continue it or --name NEW "
                            "for a new one")
        if spec.resume and not tune.Tuner.can_restore(storage.uri(name)):
            raise DsdmError(f"nothing to resume at '{storage.uri(name)}'; run without --resume first")
        if spec.resume:
            record = SearchRecord.of(storage, name)
            more_samples = check_resume(record.command, command)

    with open_experiment(cfg, runner, name, prog=prog, trials=spec.num_samples, resume=spec.resume,
                         data_root=spec.data_root, check=check) as exp:
        if more_samples is not None:
            grow_samples(exp.storage, name, more_samples)
            print(f"{prog}: --resume adds trials: --num-samples {more_samples} "
                  f"(was {record.command['num_samples']})", flush=True)
        record = SearchRecord(record.search_id, {**record.command, **command}) if record else SearchRecord.new(command)
        record.save(exp.storage, name)
        exp.search_id = record.search_id
        exp.open_parent(f"search-{name}", {**cfg.plain(), "search.num_samples": spec.num_samples,
                                           "search.scheduler": spec.scheduler,
                                           "search.space": json.dumps(sorted(space))})
        with exp.running():
            table = _tune_and_cross_arch(spec, exp, space)
            # in --local-dir (printed, logged to MLflow) and, with a URI storage, beside the Tune run
            md, pq, csv = (Path(f) for f in write_tables(table, exp.storage.local_only(), name))
            if exp.storage.remote:
                write_tables(table, exp.storage, name)
            if table[table["status"] == "DONE"].empty:  # every trial errored: a failed search
                raise first_trial_error(table) or no_trial_done(exp.storage, name)
            best = table.iloc[0].to_dict()
            # logged once per number of trials: resuming a finished search adds no second value
            exp.finish({"best_val_acc": best.get("val_acc") or float("nan"),
                        "best_test_acc": best.get("test_acc") or float("nan"),
                        "search_seconds": time.time() - t0}, [md, pq, csv], step=len(table))
    print(markdown(table))
    print(f"\nbest (by validation accuracy, a tie to the trial started first): "
          f"{json.dumps({k: best.get(k.split('.')[-1]) for k in sorted(space)})}")
    print(f"best distilled set: {exp.storage.uri(name, best['set_path']) if best.get('set_path') else ''}")
    print(f"tables: {md} {pq}")
    print(mlflow_advice(exp.mlflow_uri, exp.recorder.experiment_id))
    print(f"search wall time: {time.time() - t0:.1f}s")
    return {"table": table, "path": md.parent, "zoo": exp.zoo_info, "mlflow_uri": exp.mlflow_uri}


def first_trial_error(table) -> DsdmError | None:
    """A search whose trials all stopped at a deterministic error: the first trial's, in one line."""
    failed = table[table["error"].astype(bool)].sort_values("trial") if "error" in table else table.iloc[:0]
    if failed.empty:
        return None
    return DsdmError(f"no trial finished; the first trial's error: {failed.iloc[0]['error']}")


def make_searcher(spec: SearchSpec, cfg: Config, slots: int):
    """Optuna's TPE (seeded), at most `slots` trials at once, and the trial scheduler."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    searcher = ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.seed)),
                                  max_concurrent=slots)
    if spec.scheduler == "asha":
        return searcher, ASHAScheduler(time_attr="iteration", max_t=cfg.distill.iterations,
                                       grace_period=spec.proxy_every, reduction_factor=2)
    return searcher, FIFOScheduler()


def _tune_and_cross_arch(spec: SearchSpec, exp, space: dict):
    from tune import cross_arch as xa
    from tune.experiment import make_tuner
    from tune.faults import fault_point
    from tune.tables import record_placement, trial_table
    from tune.trainable import run_trial

    trainable = exp.trainable(run_trial, exp.trial_options(proxy_every=spec.proxy_every))
    searcher, scheduler = (None, None) if spec.resume else make_searcher(spec, exp.cfg, exp.runner.trial_slots())
    tuner = make_tuner(trainable, exp.runner, exp.storage, exp.name, space, restore=spec.resume,
                       search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples)
    results = exp.fit(tuner)
    record_placement(exp.storage, exp.name, exp.data_ref, exp.zoo_info)
    if STOP.signal is not None:
        raise KeyboardInterrupt  # Tune saved its state; finished trials stay finished

    table = trial_table(results, sorted(space))
    done = table[table["status"] == "DONE"]
    if spec.cross_arch == "none" or done.empty:
        return table
    previous = exp.recorder.cross_arch_results(xa.CROSS_ARCHS, prefix=XARCH)
    # the table runs best first, a tie to the trial started first: a resume picks the same best trial
    chosen = [t for t in (done if spec.cross_arch == "all" else done.head(1))["trial_id"] if t not in previous]
    if not chosen:  # a resumed search whose evaluation is recorded: nothing is redone
        return _with_cross_arch(table, previous)
    sets = xa.put_sets(results, chosen)
    # a test deletes the trials' checkpoint folders here: the phase reads nothing from them
    fault_point("before_cross_arch", 1, paths=[str(Path(r.checkpoint.path).parent) for r in results
                                              if r.checkpoint is not None and not exp.storage.remote])
    eval_cfg, runs = xa.eval_section(exp.cfg), exp.cfg.eval.runs
    jobs = [xa.CrossArchJob(trial_id, sets[trial_id], arch,
                            {**eval_cfg, "archs": [arch], "runs": runs + 2 if arch == "convnet3" else runs})
            for arch in xa.CROSS_ARCHS for trial_id in chosen]  # "ConvNet-3 with more runs"
    started = xa.phase_started(exp.parent)
    cross = xa.run_cross_arch(jobs, exp.data_ref, exp.runner.trial_cpus, lambda line: print(line, flush=True),
                              exp.runner.trial_gpus)
    xa.record_cross_arch(exp.recorder, exp.parent.run_id, cross, prefix=XARCH, started=started)
    return _with_cross_arch(table, {**previous, **{t: {a: (r["mean"], r["std"]) for a, r in v.items()}
                                                   for t, v in cross.items()}})


def _with_cross_arch(table, results: dict):
    """The table with one `xarch/<arch>` column per architecture: "mean ± std" where evaluated, else empty."""
    for trial_id, res in results.items():
        for arch, (mean, std) in res.items():
            table.loc[table["trial_id"] == trial_id, f"{XARCH}{arch}"] = f"{mean:.2f} ± {std:.2f}"
    return table
