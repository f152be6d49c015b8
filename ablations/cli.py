"""The sweeps' command line: one parser (the runner flags are tune.runner's, as the search's),
seeds and IPC lists, and `cli`, which turns a DsdmError into one line and exit code 2."""
from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
from pathlib import Path
from typing import Any, Callable

from dsdm.cli import HelpFormatter
from dsdm.config import BUDGETS
from dsdm.errors import DsdmError
from tune.runner import BUDGET_HELP, DATASET_HELP, Runner, add_data_flags, add_runner_flags
from tune.signals import run_command

# Distillation seeds a sweep runs when --seeds is not given: paired statistics need >= 2.
DEFAULT_SEEDS = {"resolve": "2"}


def build_parser(prog: str, doc: str, dataset: str = "digits", ipc: str = "10") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc.strip().splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default=dataset, help=DATASET_HELP)
    p.add_argument("--ipc", default=ipc, help="images per class; several comma-separated (one table each)")
    p.add_argument("--budget", default="paper", choices=list(BUDGETS), help=BUDGET_HELP)
    p.add_argument("--seeds", help="N (seeds 0..N-1) or a list '0,3,7'; each is the distillation and evaluation "
                   "seed of every cell (paired); default 2 under --budget resolve, else 1")
    p.add_argument("--results", type=Path, default=Path("results"), help="tables and plots go to RESULTS/<sweep>/")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished cells are kept")
    add_data_flags(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, every cell")
    p.add_argument("--fresh", action="store_true",
                   help="compute every trial, even one whose identical config and seed another sweep under --storage "
                        "already finished (by default its results are copied, and the table says from where)")
    add_runner_flags(p)
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


def cli(run: Callable[[argparse.Namespace], Any], parser: argparse.ArgumentParser,
        argv: list[str] | None = None) -> int:
    """Parse, run, turn DsdmError into one line + exit code 2 (as every dsdm CLI does)."""
    args = parser.parse_args(argv)
    args.seeds = args.seeds or DEFAULT_SEEDS.get(args.budget, "1")
    args.command = " ".join(["python -m", parser.prog.split()[-1], *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    return run_command(parser.prog, lambda: run(args))


@contextlib.contextmanager
def sweep_session(args: argparse.Namespace):
    """One Ray session (and so one zoo in the object store) for several sweeps: the first sweep
    starts Ray once its checks passed (ablations.sweep keeps it running), the session stops it.
    The checks that need no dataset run here first, so bad input is refused before anything starts."""
    import ray

    from tune.preflight import check_data_root, check_ray_address
    from tune.storage import Storage

    runner = Runner.from_args(args)
    check_data_root(args.dataset, args.data_root, args.offline)
    Storage.open(runner.storage, runner.local_dir)
    check_ray_address(runner.address)
    started_outside = ray.is_initialized()
    try:
        yield
    finally:
        if not started_outside and ray.is_initialized():
            ray.shutdown()


def for_each_ipc(args: argparse.Namespace, fn: Callable[[int], Any]) -> list:
    """Run `fn(ipc)` per --ipc value inside one Ray session (and one zoo)."""
    ipcs = parse_ints(args.ipc, "--ipc")
    with sweep_session(args):
        return [fn(ipc) for ipc in ipcs]
