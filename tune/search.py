"""`python -m tune.search --dataset cifar10`: the zoo on an actor pool, DSDM trials under
Ray Tune + Optuna, every trial and the cross-architecture evaluations recorded in MLflow.

The command line; the search is tune/optuna_search.py's, the experiment around it (checks, lock,
Ray, zoo, MLflow parent, Tuner) tune/experiment.py's, shared with every sweep; the method is `dsdm/`'s.

Bad input is refused before Ray starts (one line on stderr naming the fix, exit code 2,
nothing written); SIGINT and SIGTERM stop the search after Tune saved its state (exit
130/143), and `--resume` finishes it. One search per experiment folder at a time (a lock
file holds its pid and host). docs/reliability.md lists what was tried.
"""
from __future__ import annotations

import argparse
import sys

from dsdm.cli import HelpFormatter
from dsdm.config import BUDGETS
from tune.optuna_search import SearchSpec, run_search
from tune.runner import BUDGET_HELP, DATASET_HELP, Runner, add_data_flags, add_runner_flags
from tune.signals import run_command

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: run_search(SearchSpec.from_args(args), Runner.from_args(args), PROG))


if __name__ == "__main__":
    sys.exit(main())
