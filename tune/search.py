"""`python -m tune.search --dataset cifar10`: the zoo on an actor pool, DSDM trials under
Ray Tune + Optuna, every trial and the cross-architecture evaluations recorded in MLflow.

This is the one module that assembles Ray objects; the method lives in `dsdm/`.

Bad input is refused before Ray starts (one line on stderr naming the fix, exit code 2,
nothing written); SIGINT and SIGTERM stop the search after Tune saved its state (exit
130/143), and `--resume` finishes it. One search per experiment folder at a time (a lock
file holds its pid and host). docs/reliability.md lists what was tried.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dsdm.cli import HelpFormatter
from dsdm.config import BUDGETS, Config, make_config
from dsdm.errors import DsdmError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # val_acc arrives with the last report


BUDGET_HELP = ("preset of iterations, epochs and zoo size: paper = the paper's settings (hours on a GPU), "
               "cpu = minutes on a CPU, resolve = sweeps sized to resolve their effects on 2 cores (hours), "
               "smoke = seconds, numbers meaningless")


def finite_float(text: str) -> float:
    """argparse type: a float that is neither inf nor nan (those would only fail inside a trial)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tune.search", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits, mnist, fashionmnist, svhn, cifar10, cifar100, speechcommands")
    p.add_argument("--data-root", help="dataset folder (default $DSDM_DATA, else ./data)")
    p.add_argument("--offline", action="store_true", help="never download datasets")
    p.add_argument("--ipc", type=int, default=10, help="stored images per class")
    p.add_argument("--num-samples", type=int, default=20, help="trials Optuna proposes")
    p.add_argument("--budget", default="paper", choices=list(BUDGETS), help=BUDGET_HELP)
    p.add_argument("--address", help="Ray cluster address ('auto' inside a cluster); default: start Ray here")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--storage", default=os.environ.get("DSDM_STORAGE", "runs"),
                   help="Tune results (a folder, or s3://... / gs://... on a multi-node cluster); $DSDM_STORAGE if set")
    p.add_argument("--local-dir", type=Path, default=Path("runs"),
                   help="zoo cache, trial tables and the default MLflow sqlite when --storage is a URI")
    p.add_argument("--name", help="experiment folder under --storage (default DATASET-ipcN-BUDGET)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search; finished trials are kept")
    p.add_argument("--mlflow-uri", default=os.environ.get("DSDM_MLFLOW_URI"),
                   help="tracking server URL (default $DSDM_MLFLOW_URI, else a sqlite file under --storage)")
    p.add_argument("--trial-cpus", type=finite_float, default=1, help="CPUs per trial")
    p.add_argument("--trial-gpus", type=finite_float, default=0, help="GPUs per trial (fractions allowed)")
    p.add_argument("--zoo-cpus", type=finite_float, default=1, help="CPUs per pre-training actor")
    p.add_argument("--zoo-gpus", type=finite_float, default=0, help="GPUs per pre-training actor (fractions allowed)")
    p.add_argument("--zoo-actors", type=int, help="actors in the pool (default: as many as fit)")
    p.add_argument("--scheduler", choices=["fifo", "asha"], default="fifo", help="Tune trial scheduler")
    p.add_argument("--proxy-every", type=int, default=0, help="iterations between proxy val accuracies (ASHA)")
    p.add_argument("--fix", nargs="*", default=[], metavar="KEY=VALUE", help="remove a key from the space, e.g. lambda1=50")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    p.add_argument("--cross-arch", choices=["best", "all", "none"], default="best",
                   help="which trials' sets are evaluated on ConvNet-3, ResNet-10 and DenseNet-121 afterwards")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler and distillation seed")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a crashed trial (from its checkpoint)")
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
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            raise DsdmError(f"--set expects KEY=VALUE, got '{pair}'")
        overrides[key.strip()] = value.strip()
    overrides.update(fixed)
    models, epochs = zoo_grid(space, fixed)
    overrides.setdefault("zoo.num_models", models)
    overrides.setdefault("zoo.snapshots", epochs)
    overrides.setdefault("distill.num_models", models)
    overrides.setdefault("distill.pretrain_epochs", max(epochs))
    return make_config(args.budget, overrides)


def check_storage(storage: Path) -> Path:
    storage = storage.expanduser().resolve()
    try:
        storage.mkdir(parents=True, exist_ok=True)
        probe = storage / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise DsdmError(f"storage path '{storage}' is not writable ({exc.strerror}); pass --storage DIR you can write") from None
    return storage


def space_needed(cfg: Config, dataset, num_samples: int, zoo_on_disk: bool) -> int:
    """Bytes a search writes under --storage, roughly and on the high side: the zoo's snapshots,
    per trial Tune's kept checkpoints (distiller state, set, grid) and the MLflow artifacts,
    plus the MLflow sqlite file and Tune's state."""
    from dsdm.models import count_parameters, get_model
    from dsdm.zoo import zoo_arch

    zoo = 0
    if not zoo_on_disk:
        net = get_model(zoo_arch(cfg.zoo, dataset), dataset.channels, dataset.num_classes, tuple(dataset.image_size))
        zoo = 4 * count_parameters(net) * cfg.zoo.num_models * len(cfg.zoo.snapshots)
    images = cfg.distill.ipc * dataset.num_classes * dataset.channels * math.prod(dataset.image_size) * 4
    return zoo + num_samples * (12 * images + 256 * 1024) + 2 * 1024 * 1024 + RESERVE_BYTES


def mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def check_free_space(storage: Path, needed: int) -> None:
    import shutil

    free = shutil.disk_usage(storage).free
    if free < needed:
        raise DsdmError(f"storage '{storage}' has {mb(free)} free but this search needs about {mb(needed)}; "
                        "free space there or pass --storage on a larger disk")


FULL_DISK = ("No space left on device", "database or disk is full")  # OSError's, sqlite's (MLflow) words


def disk_full(exc: BaseException, storage: Path) -> DsdmError | None:
    """The one-line error for a full disk, wherever it surfaced (here, or inside a trial); else None.
    A full disk also breaks Tune in other words (an empty error pickle: `EOFError: Ran out of input`),
    so an error while the storage has under 1 MB free counts as one too."""
    import shutil

    try:
        free = shutil.disk_usage(storage).free
    except OSError:
        free = None
    said = (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or any(m in str(exc) for m in FULL_DISK)
    if not (said or (free is not None and free < 2**20)):
        return None
    where = getattr(exc, "filename", None) or storage
    return DsdmError(f"no space left on device writing '{where}' ({mb(free or 0)} free under '{storage}'); free "
                     "space there (or pass --storage on a larger disk), then rerun the same command with --resume")


RESERVE_BYTES = 1024 * 1024  # room for Tune's last state save and MLflow's FAILED marks on a disk that filled


class SpaceReserve:
    """A file of RESERVE_BYTES under the storage while a search runs: when the disk fills, the
    driver deletes it first, so that Tune can still save its state and MLflow's sqlite file (on the
    same disk) can still mark the runs FAILED. Written again by the next start or --resume."""

    def __init__(self, storage: Path, name: str):
        self.path = storage / f".{name}.reserve"

    def __enter__(self) -> "SpaceReserve":
        with open(self.path, "wb") as fh:  # zeros, not a sparse file: the blocks must be taken
            fh.write(bytes(RESERVE_BYTES))
        return self

    def release(self) -> None:
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self.release()


class FullDiskWatch(logging.Filter):
    """Ray Tune and MLflow report a full disk again and again, each time with a traceback (every
    failed trial attempt, every ~10 s experiment-state save, every MLflow write): about a thousand
    lines before the driver's one line. On the first record that names a full disk this filter
    frees the reserve (room for Tune's last save of its state, a complete file that --resume can
    read, and for MLflow's sqlite), asks Tune to stop (as a signal does, without retrying trials)
    and from then on drops every warning and error of Ray's and MLflow's loggers; the driver then
    prints its one line (`error`)."""

    LOGGERS = ("ray", "mlflow")  # their handlers: Tune and Train log through "ray", MLflow through "mlflow"

    def __init__(self, storage: Path, reserve: SpaceReserve):
        super().__init__()
        self.storage, self.reserve = storage, reserve
        self.error: DsdmError | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.error is None:
            text = record.getMessage() + ("".join(traceback.format_exception(*record.exc_info))
                                          if record.exc_info else "")
            if not any(m in text for m in FULL_DISK):
                return True
            self.error = disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), self.storage)
            self.reserve.release()
            STOP.stop_tune()
        return record.levelno < logging.WARNING

    def attach(self) -> None:
        """On the loggers' current handlers (ray.init may set up new ones: attach again after it)."""
        for name in self.LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(self)  # once per handler, however often called

    def detach(self) -> None:
        for name in self.LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.removeFilter(self)


@contextmanager
def search_lock(lock: Path, prog: str = "tune.search"):
    """One search per experiment folder: `lock` holds {pid, host}. A second search on the folder
    stops with one line naming the holder; a lock left by a dead process on this host is taken over."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    lock.parent.mkdir(parents=True, exist_ok=True)
    unreadable = 0
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):  # being written (or gone) this instant; empty for good: stale
                unreadable += 1
                if unreadable < 50:
                    time.sleep(0.1)
                    continue
                holder = {"pid": 0, "host": me["host"]}
            if holder.get("host") != me["host"] or _alive(int(holder.get("pid", 0))):
                raise DsdmError(f"'{lock.with_suffix('')}' is in use by another search (pid {holder.get('pid')} on "
                                f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or pass "
                                f"--name NEW (if that process is gone, delete '{lock}')") from None
            print(f"{prog}: taking over the stale lock '{lock}' of pid {holder.get('pid')} on {holder.get('host')} "
                  "(that process has ended)", file=sys.stderr)
            stale = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
            try:
                os.replace(lock, stale)  # one taker wins; the others see the winner's lock next round
                stale.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me))
        break
    try:
        yield
    finally:
        try:
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def check_fixed(budget: str, fixed: dict[str, str], sets: list[str]) -> None:
    """`--fix M=` / `--fix E=` must be served by the zoo the budget pre-trains (or the zoo `--set` asks for)."""
    from tune.space import BUDGET_GRIDS

    grid_m, grid_e = BUDGET_GRIDS[budget]
    zoo_sets = dict(pair.partition("=")[::2] for pair in sets if "=" in pair)
    zoo_sets = {k.strip(): v.strip() for k, v in zoo_sets.items()}

    def as_int(key: str, flag: str) -> int:
        try:
            return int(fixed[key])
        except ValueError:
            raise DsdmError(f"--fix {flag}={fixed[key]} is not an integer; pass a whole number") from None

    if "distill.num_models" in fixed:
        m = as_int("distill.num_models", "M")
        limit = int(zoo_sets["zoo.num_models"]) if "zoo.num_models" in zoo_sets else max(grid_m)
        if m < 1:
            raise DsdmError(f"--fix M={m}: M must be >= 1; pick M from {list(grid_m)}")
        if m > limit:
            raise DsdmError(f"--fix M={m} is larger than the zoo of the {budget} budget ({limit} models); "
                            f"pick M from {[v for v in grid_m if v <= limit]} or add --set zoo.num_models={m}")
    if "distill.pretrain_epochs" in fixed:
        e = as_int("distill.pretrain_epochs", "E")
        if "zoo.snapshots" in zoo_sets:
            grid = sorted({int(v) for v in zoo_sets["zoo.snapshots"].split(",") if v.strip()})
        else:
            grid = list(grid_e)
        if e not in grid:
            raise DsdmError(f"--fix E={e} is not a snapshot epoch of the {budget} budget's zoo {grid}; "
                            f"pick E from {grid} or add --set zoo.snapshots={','.join(map(str, sorted(set(grid) | {e})))}")


def check_data_root(dataset: str, data_root: str | None, offline: bool) -> None:
    """An explicit --data-root must be a folder; missing, it is an error unless a download may create it."""
    if not data_root:
        return
    root = Path(data_root).expanduser()
    if root.exists() and not root.is_dir():
        raise DsdmError(f"--data-root '{root}' is a file, not a folder; pass the folder that holds the dataset files")
    never_downloads = dataset.lower() in ("speechcommands",)
    if not root.exists() and (offline or never_downloads):
        fix = "drop --offline to download it there" if not never_downloads else "point it at mini_speech_commands/"
        raise DsdmError(f"--data-root '{root}' does not exist; pass the folder that holds the {dataset} files, or {fix}")


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """HOST:PORT of a cluster must answer before Ray is asked to join it (ray.init would wait a minute)."""
    if not address or address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise DsdmError(f"--address '{address}' is not HOST:PORT (or 'auto'); pass the head node's GCS address, "
                        "e.g. 10.0.0.1:6379, as `ray status` prints it")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DsdmError(f"cannot reach the Ray cluster at '{address}' ({reason}); start it with `ray start --head` "
                        "or `ray up cluster.yaml`, or drop --address to run locally") from None


class GracefulStop:
    """SIGINT and SIGTERM during `Tuner.fit` ask Tune to stop after saving its state (Tune's own
    path, reached through SIGUSR1); elsewhere, or on a second signal, they raise KeyboardInterrupt."""

    def __init__(self):
        self.signal: str | None = None
        self.in_fit = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        first = self.signal is None
        self.signal = self.signal or signal.Signals(signum).name
        if first and self.in_fit and callable(signal.getsignal(signal.SIGUSR1)):
            # os.write, not print: a handler must not re-enter a buffered stream the main code is writing
            os.write(2, f"tune.search: {self.signal} received; stopping after Tune saves the experiment state "
                        "(send it again to stop at once)\n".encode())
            self.stop_tune()
            return
        raise KeyboardInterrupt

    def stop_tune(self) -> None:
        """Ask a running `Tuner.fit` to stop after saving its state (Tune's SIGUSR1 handler); no-op outside."""
        if self.in_fit and callable(signal.getsignal(signal.SIGUSR1)):
            signal.raise_signal(signal.SIGUSR1)

    @contextmanager
    def fit(self):
        previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # ours forwards both signals
        self.in_fit = True
        try:
            yield
        finally:
            self.in_fit = False
            if previous is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous
            if hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # Tune leaves its handler behind


STOP = GracefulStop()


class Interrupted(KeyboardInterrupt):
    """A stop by signal, carrying the advice that works from where the search stopped."""

    def __init__(self, advice: str):
        super().__init__(advice)
        self.advice = advice


def resume_advice(tune_path: str, path: Path, remote: bool, restarts_on_resume: bool = False) -> str:
    """What to rerun after an interrupt: --resume once Tune saved a state; before that, the command
    without --resume (which then refuses nothing), unless --resume also restarts an unsaved run
    (`restarts_on_resume`: the ablation sweeps, whose session ledger records that one was started)."""
    from ray import tune

    if tune.Tuner.can_restore(tune_path):
        return "finished trials are saved, rerun the same command with --resume to finish the others"
    if restarts_on_resume:
        return "no trial was saved yet (finished zoo models are kept); rerun the same command with --resume (it starts the grid again)"
    if not remote and path.exists():
        return f"nothing was saved to resume; delete '{path}' and rerun the same command without --resume"
    return "no trial was saved yet (finished zoo models are kept); rerun the same command without --resume"


def start_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    from tune.zoo import fault_env

    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0", **fault_env()}}
    try:
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        else:
            # "local": a private instance, never a cluster someone else started on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env,
                     log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise DsdmError(f"cannot reach the Ray cluster at '{address}' ({first}); start it with `ray start --head` "
                        "or `ray up cluster.yaml`, or drop --address to run locally") from None


def make_tuner(args, cfg: Config, space: dict, tune_path: str, trainable, resume: bool):
    """A new Tuner at `tune_path` (a folder or a storage URI), or the one saved there."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    from tune.trainable import FaultPoints

    if resume:
        return tune.Tuner.restore(tune_path, trainable, resume_errored=True)
    import ray

    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // max(args.trial_cpus, 0.01)))
    searcher = ConcurrencyLimiter(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed)),
                                  max_concurrent=slots)
    if args.scheduler == "asha":
        if not args.proxy_every:
            raise DsdmError("--scheduler asha needs --proxy-every K (iterations between proxy accuracies)")
        scheduler = ASHAScheduler(time_attr="iteration", max_t=cfg.distill.iterations,
                                  grace_period=args.proxy_every, reduction_factor=2)
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=args.num_samples),
        run_config=tune.RunConfig(
            name=tune_path.rstrip("/").rsplit("/", 1)[1], storage_path=tune_path.rstrip("/").rsplit("/", 1)[0],
            verbose=1, callbacks=[FaultPoints()],
            failure_config=tune.FailureConfig(max_failures=args.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def trial_table(results, space_keys: list[str]):
    """One row per trial: sampled params, objective, reporting metrics, time, files."""
    import pandas as pd

    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id", r.path.split("/")[-1] if r.path else "?")}
        row.update({k.split(".")[-1]: (r.config or {}).get(k) for k in space_keys})
        row.update({"val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"), "test_std": m.get("test_std"),
                    "iteration": m.get("iteration"), "seconds": m.get("time_total_s"),
                    "distill_s": m.get("distill_seconds"), "eval_s": m.get("eval_seconds"),
                    "resumed_from": m.get("resumed_from"), "zoo_pretrain_calls": m.get("zoo_pretrain_calls"),
                    "node": (m.get("node") or "")[:12], "reused_from": m.get("reused_from") or "",
                    "status": "ERROR" if r.error else ("DONE" if "test_acc" in m else "STOPPED"),
                    "set_path": str(Path(r.checkpoint.path) / "distilled.pt") if (r.checkpoint and "test_acc" in m) else ""})
        rows.append(row)
    return pd.DataFrame(rows).sort_values("val_acc", ascending=False, na_position="last").reset_index(drop=True)


CROSS_ARCHS = ("convnet3", "resnet10", "densenet121")


def run_cross_arch(table, data_ref, cfg: Config, which: str, trial_cpus: float, skip: set[str],
                   progress=print) -> dict[str, dict]:
    """ResNet-10, DenseNet-121 and a longer ConvNet-3 evaluation of the best (or every) set, as
    Ray tasks, one per network so that the slow DenseNet-121 runs spread over the CPUs; trials in
    `skip` were evaluated by an earlier (resumed) invocation. One line per network finished."""
    import ray

    from dsdm.evaluate import merge_results
    from tune.trainable import cross_arch_refs

    done = table[table["set_path"] != ""]
    chosen = done if which == "all" else done.head(1)
    chosen = chosen[~chosen["trial_id"].isin(skip)]
    eval_cfg = {**{k.split(".", 1)[1]: v for k, v in cfg.plain().items() if k.startswith("eval.")}}
    owner: dict = {}  # ref -> (trial id, arch)
    for arch in sorted(CROSS_ARCHS, key=lambda a: a != "densenet121"):  # the longest tasks first
        runs = cfg.eval.runs + 2 if arch == "convnet3" else cfg.eval.runs  # "ConvNet-3 with more runs"
        task_cfg = {**eval_cfg, "archs": [arch], "runs": runs}
        for _, row in chosen.iterrows():
            for ref in cross_arch_refs(row["set_path"], data_ref, task_cfg, trial_cpus):
                owner[ref] = (row["trial_id"], arch)
    results: dict = {}
    pending, start = list(owner), time.time()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        (trial_id, arch), results[ready[0]] = owner[ready[0]], ray.get(ready[0])
        progress(f"cross-arch: trial {trial_id} {arch} network done, {results[ready[0]][arch]['runs'][0]:.2f}% "
                 f"test accuracy ({len(results)}/{len(owner)} networks, {time.time() - start:.0f}s elapsed)")
    out: dict[str, dict] = {}
    for key in dict.fromkeys(owner.values()):  # networks joined in run order, not finishing order
        out.setdefault(key[0], {}).update(merge_results([results[r] for r, k in owner.items() if k == key]))
    return out


def write_tables(table, path: Path) -> tuple[Path, Path]:
    from tune.zoo import fault_point

    md, pq = path / "trials.md", path / "trials.parquet"
    tmp_md, tmp_pq = md.with_suffix(".md.tmp"), pq.with_suffix(".parquet.tmp")
    try:
        fault_point("tables_enospc", "write", path=tmp_md)
        tmp_md.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")
        table.to_parquet(tmp_pq, engine="pyarrow", index=False)
    except OSError:  # a full disk: no half-written table is left behind
        tmp_md.unlink(missing_ok=True)
        tmp_pq.unlink(missing_ok=True)
        raise
    os.replace(tmp_md, md)
    os.replace(tmp_pq, pq)
    return md, pq


def record_placement(path: Path, data_ref, zoo_info: dict) -> dict:
    """Where things ran: the cluster's nodes, the nodes holding the dataset object, zoo actors."""
    import ray
    from ray.experimental import get_object_locations

    try:
        where = get_object_locations([data_ref], timeout_ms=5000).get(data_ref, {})
    except Exception:  # a lookup failure must not fail the search
        where = {}
    placement = {"nodes": [{"node_id": n["NodeID"], "alive": n["Alive"],
                            "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
                           for n in ray.nodes()],
                 "dataset_object": {"node_ids": where.get("node_ids", []), "bytes": where.get("object_size")},
                 "zoo_nodes": sorted({m["node"] for m in zoo_info.get("models", [])})}
    (path.parent / f"{path.name}.cluster.json").write_text(json.dumps(placement, indent=1))
    return placement


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    STOP.install()
    try:
        run_search(args)
    except DsdmError as exc:
        print(f"tune.search: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        return interrupted_exit("tune.search", exc)
    return 0


def interrupted_exit(prog: str, exc: KeyboardInterrupt) -> int:
    """Print the advice an `Interrupted` carries (the command that works from where it stopped);
    the exit code is 128 + the signal's number, as a shell reports a process a signal stopped."""
    name = STOP.signal or "SIGINT"
    advice = getattr(exc, "advice", "rerun the same command with --resume to finish the others")
    print(f"{prog}: interrupted ({name}); {advice}", file=sys.stderr)
    return 128 + signal.Signals[name].value


def paper_on_cpu_note(budget: str, gpus: float, num_samples: int, prog: str = "tune.search") -> None:
    """`--budget paper` is the GPU preset: on a machine without one, say what it costs (one line)."""
    import torch

    if budget != "paper" or gpus > 0 or torch.cuda.is_available():
        return
    # README: 4 cpu-budget trials on digits took ~3 min on 2 cores; paper has 50x the iterations at 4x the
    # real batch and 30x the evaluation epochs: at least ~50 min per trial on digits, more on larger data
    hours = max(1, round(num_samples * 50 / 60))
    print(f"{prog}: note: --budget paper is the GPU preset (at least {hours} h for {num_samples} trials on this "
          "CPU-only machine); pass --budget cpu for a run of minutes", file=sys.stderr, flush=True)


def run_search(args: argparse.Namespace) -> dict:
    from ray import tune

    from tune import tracking
    from tune.space import parse_fixed, search_space

    t0 = time.time()
    # every check that needs no Ray, no MLflow and no dataset first: bad input costs ~1 s and writes nothing
    if args.num_samples < 1:
        raise DsdmError(f"--num-samples must be >= 1 (got {args.num_samples})")
    fixed = parse_fixed(args.fix)
    check_fixed(args.budget, fixed, args.set)
    space = search_space(args.budget, fixed)
    cfg = base_config(args, space, fixed)
    check_data_root(cfg.data.dataset, args.data_root, cfg.data.offline)
    remote = "://" in str(args.storage)  # multi-node Tune needs shared storage (s3://, gs://, ...)
    storage = check_storage(Path(args.local_dir) if remote else Path(args.storage))
    name = args.name or f"{cfg.data.dataset}-ipc{cfg.distill.ipc}-{args.budget}"
    path = storage / name  # local: tables, zoo record; also Tune's folder unless remote
    tune_path = f"{str(args.storage).rstrip('/')}/{name}" if remote else str(path)
    with search_lock(storage / f"{name}.lock"):
        if not remote and path.exists() and not args.resume:
            raise DsdmError(f"'{path}' already holds a search; pass --resume to continue it or --name NEW for a new one")
        if args.resume and not tune.Tuner.can_restore(tune_path):
            raise DsdmError(f"nothing to resume at '{tune_path}'; run without --resume first")
        uri = args.mlflow_uri or tracking.default_uri(storage)
        tracking.quiet_mlflow()
        tracking.check_reachable(uri)
        check_ray_address(args.address)
        from dsdm.data import load_dataset  # torch: the first expensive import

        dataset = load_dataset(cfg.data.dataset, cfg.data.root or None, cfg.data.offline, cfg.data.val_fraction,
                               cfg.data.seed)
        from dsdm.coreset import check_ipc_fits

        check_ipc_fits(dataset, cfg)
        check_free_space(storage, space_needed(cfg, dataset, args.num_samples, zoo_on_disk=args.resume))
        paper_on_cpu_note(args.budget, args.trial_gpus, args.num_samples)
        reserve = SpaceReserve(storage, name)
        watch = FullDiskWatch(storage, reserve)
        watch.attach()
        try:
            with reserve:
                return _run_checked(args, cfg, space, storage, path, tune_path, dataset, uri, t0, watch, reserve)
        except KeyboardInterrupt:
            raise Interrupted(resume_advice(tune_path, path, remote)) from None
        except Exception as exc:  # a full disk surfaces as OSError, or inside Ray's, Tune's or torch's errors
            error = None if isinstance(exc, DsdmError) else (watch.error or disk_full(exc, storage))
            if error is None:
                raise
            raise error from None
        finally:
            watch.detach()


def _run_checked(args, cfg: Config, space: dict, storage: Path, path: Path, tune_path: str, dataset, uri: str,
                 t0: float, watch: FullDiskWatch, reserve: SpaceReserve) -> dict:
    from tune import tracking

    experiment_id = tracking.ensure_experiment(uri, tracking.experiment_name(dataset.name, cfg.distill.ipc),
                                               storage / "mlartifacts")
    search_id = tune_path
    parent = tracking.search_run(uri, experiment_id, search_id, name=f"search-{path.name}")
    try:
        tracking.log_params(uri, parent, {**cfg.plain(), "search.num_samples": args.num_samples,
                                          "search.scheduler": args.scheduler, "search.space": json.dumps(sorted(space))})
        table, zoo_info = _tune_and_cross_arch(args, cfg, space, storage, path, tune_path, dataset, uri,
                                               experiment_id, parent, watch)
        md, pq = write_tables(table, path)
        done = table[table["status"] == "DONE"]
        if done.empty:  # every trial errored: a failed search, whatever Tune returned
            raise no_trial_done(path)
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        reserve.release()  # first: on a full disk, this is the room MLflow's sqlite file needs for what follows
        try:  # best effort: on a disk full even after that, a resume reopens the runs
            tracking.close_open_runs(uri, experiment_id, search_id, status)
        except Exception:
            pass
        raise
    best = table.iloc[0].to_dict()
    tracking.log_metrics(uri, parent, {"best_val_acc": best.get("val_acc") or float("nan"),
                                       "best_test_acc": best.get("test_acc") or float("nan"),
                                       "search_seconds": time.time() - t0})
    tracking.log_artifacts(uri, parent, [md, pq])
    tracking.close_open_runs(uri, experiment_id, search_id, "FAILED", keep=parent)  # trials that died unreported
    tracking.finish(uri, parent)
    print(table.to_markdown(index=False, floatfmt=".4g"))
    print(f"\nbest (by validation accuracy): {json.dumps({k: best.get(k.split('.')[-1]) for k in sorted(space)})}")
    print(f"best distilled set: {best.get('set_path', '')}")
    print(f"tables: {md} {pq}\nMLflow: mlflow ui --backend-store-uri {uri}")
    print(f"search wall time: {time.time() - t0:.1f}s")
    return {"table": table, "path": path, "zoo": zoo_info, "mlflow_uri": uri}


def _tune_and_cross_arch(args, cfg: Config, space: dict, storage: Path, path: Path, tune_path: str, dataset,
                         uri: str, experiment_id: str, parent: str, watch: FullDiskWatch):
    import ray
    from ray import tune

    from tune import tracking
    from tune.trainable import run_trial
    from tune.zoo import load_or_train_zoo_on_pool, put_dataset

    search_id = tune_path
    start_ray(args.address, args.num_cpus)
    STOP.install()  # ray.init replaced the SIGTERM handler
    watch.attach()  # and may have set up Ray's log handlers anew
    try:
        data_ref = put_dataset(dataset)
        cpus = ray.cluster_resources().get("CPU", 1)
        actors = args.zoo_actors or max(1, min(cfg.zoo.num_models, int(cpus // max(args.zoo_cpus, 0.01))))
        zoo_refs, zoo_info = load_or_train_zoo_on_pool(
            dataset, data_ref, cfg.zoo, storage, cfg.data.seed, cfg.data.val_fraction, actors,
            args.zoo_cpus, args.zoo_gpus)
        (path.parent / f"{path.name}.zoo.json").write_text(json.dumps(zoo_info, indent=1))

        options = {"mlflow_uri": uri, "experiment_id": experiment_id, "parent_run_id": parent,
                   "search_id": search_id, "threads": args.trial_cpus, "gpus": args.trial_gpus,
                   "proxy_every": args.proxy_every, "proxy_epochs": max(1, cfg.eval.epochs // 10 or 5)}
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=cfg.plain(), data=[data_ref], zoo=zoo_refs, options=options),
            {"cpu": args.trial_cpus, "gpu": args.trial_gpus})
        if tune_path != str(path):  # remote Tune storage: tables still go to the local folder
            path.mkdir(parents=True, exist_ok=True)
        tuner = make_tuner(args, cfg, space, tune_path, trainable, args.resume)
        with STOP.fit():
            results = tuner.fit()
        if watch.error is not None:  # the disk filled: Tune stopped at the first error saying so
            raise watch.error
        record_placement(path, data_ref, zoo_info)
        if STOP.signal is not None:
            raise KeyboardInterrupt  # Tune saved its state; finished trials stay finished

        table = trial_table(results, sorted(space))
        if args.cross_arch != "none" and (table["status"] == "DONE").any():
            previous = tracking.cross_arch_results(uri, experiment_id, search_id, CROSS_ARCHS, prefix=tracking.XARCH)
            cross = run_cross_arch(table, data_ref, cfg, args.cross_arch, args.trial_cpus, set(previous),
                                   progress=lambda line: print(line, flush=True))
            for trial_id, res in cross.items():
                run_id, _ = tracking.trial_run(uri, experiment_id, search_id, trial_id, parent)
                tracking.log_metrics(uri, run_id, tracking.eval_metrics(res, prefix=tracking.XARCH))
            for trial_id, res in {**previous, **{t: {a: (r["mean"], r["std"]) for a, r in v.items()}
                                                 for t, v in cross.items()}}.items():
                for arch, (mean, std) in res.items():
                    table.loc[table["trial_id"] == trial_id, f"{tracking.XARCH}{arch}"] = f"{mean:.2f} ± {std:.2f}"
    finally:
        ray.shutdown()
    return table, zoo_info


def no_trial_done(path: Path) -> DsdmError:
    """Every trial errored: one line quoting the first trial's error (Tune's error.txt)."""
    errors = sorted(path.glob("*/error.txt"), key=lambda f: int(f.parent.name.split("_")[3]))  # <name>_<id>_<n>_
    text = errors[0].read_text() if errors else ""
    if any(m in text for m in FULL_DISK):
        return disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path.parent)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), "no error recorded")
    return DsdmError(f"no trial finished; the first trial's error: {first[:300]} (all errors: {path}/*/error.txt)")


if __name__ == "__main__":
    sys.exit(main())
