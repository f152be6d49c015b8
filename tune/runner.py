"""Runner options: where and with what an experiment runs (the search's and every sweep's flags).

`add_runner_flags` puts the same flags, defaults and environment variables on every parser
(`--storage` from $DSDM_STORAGE, `--mlflow-uri` from $DSDM_MLFLOW_URI); `Runner.from_args`
turns them into one frozen value. `ray_session` starts Ray for a runner, unless a caller (a
test, a multi-IPC sweep) already did, and stops only what it started.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from dsdm.errors import DsdmError

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # val_acc arrives with the last report

from dsdm.cli import BUDGET_HELP, DATASET_HELP  # noqa: E402,F401  (one wording for every command)


def finite_float(text: str) -> float:
    """argparse type: a float that is neither inf nor nan (those would only fail inside a trial)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


@dataclass(frozen=True)
class Runner:
    """Cluster, resources per trial and per zoo actor, and where records go."""
    address: str | None = None
    num_cpus: int | None = None
    storage: str = "runs"  # a folder, or a URI (s3://..., gs://...) that every node can reach
    local_dir: Path = Path("runs")  # lock, space reserve, zoo cache, sqlite when `storage` is a URI
    mlflow_uri: str | None = None
    trial_cpus: float = 1.0
    trial_gpus: float = 0.0
    zoo_cpus: float = 1.0
    zoo_gpus: float = 0.0
    zoo_actors: int | None = None
    max_failures: int = 2

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Runner":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values["storage"] = str(values.get("storage", cls.storage))
        values["local_dir"] = Path(values.get("local_dir") or cls.local_dir)
        return cls(**values)

    def zoo_pool_size(self, num_models: int) -> int:
        """Actors for the zoo: --zoo-actors, else as many as the cluster's CPUs hold (at most M)."""
        import ray

        cpus = ray.cluster_resources().get("CPU", 1)
        return self.zoo_actors or max(1, min(num_models, int(cpus // max(self.zoo_cpus, 0.01))))

    def trial_slots(self) -> int:
        import ray

        return max(1, int(ray.cluster_resources().get("CPU", 1) // max(self.trial_cpus, 0.01)))


def add_runner_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--address", help="Ray cluster address ('auto' inside a cluster; default: start Ray here)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--storage", default=os.environ.get("DSDM_STORAGE", "runs"),
                   help="Tune runs and tables (a folder, or s3://... / gs://... on a multi-node cluster); "
                        "$DSDM_STORAGE if set")
    p.add_argument("--local-dir", type=Path, default=Path("runs"),
                   help="zoo cache, locks, the trial tables of a search and the default MLflow sqlite when "
                        "--storage is a URI")
    p.add_argument("--mlflow-uri", default=os.environ.get("DSDM_MLFLOW_URI"),
                   help="tracking server URL (default $DSDM_MLFLOW_URI, else a sqlite file under --storage)")
    p.add_argument("--trial-cpus", type=finite_float, default=1, help="CPUs per trial")
    p.add_argument("--trial-gpus", type=finite_float, default=0, help="GPUs per trial (fractions allowed)")
    p.add_argument("--zoo-cpus", type=finite_float, default=1, help="CPUs per pre-training actor")
    p.add_argument("--zoo-gpus", type=finite_float, default=0, help="GPUs per pre-training actor (fractions allowed)")
    p.add_argument("--zoo-actors", type=int, help="actors in the pool (default: as many as fit)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a crashed trial, from its checkpoint (a deterministic error, such as a "
                        "non-finite loss or a bad config, is never retried)")
    return p


def add_data_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data-root", help="dataset folder (default $DSDM_DATA, else ./data)")
    p.add_argument("--offline", action="store_true", help="never download datasets (default: off)")
    return p


def start_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    from tune.faults import fault_env

    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "RAY_USAGE_STATS_ENABLED": "0", **fault_env()}}
    # ray.init takes tens of seconds on busy cores: a line first, so the wait is not a silence
    print(f"ray: joining the cluster at {address}" if address else
          f"ray: starting a local instance ({num_cpus or 'all'} CPUs)", flush=True)
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


@contextlib.contextmanager
def ray_session(runner: Runner, after_start=lambda: None, keep: bool = False):
    """Ray for this runner, unless the caller already started it; `after_start` runs after a start
    (ray.init replaces the SIGTERM handler and may set up new log handlers). `keep`: leave a Ray
    started here running (an outer session, such as a sweep over several IPCs, stops it)."""
    import ray

    from tune.preflight import check_ray_address
    from tune.raynoise import quiet_ray

    if ray.is_initialized():
        yield
        return
    check_ray_address(runner.address)  # a dead address: one line in seconds, not ray.init's minute
    quiet_ray()
    start_ray(runner.address, runner.num_cpus)
    after_start()
    try:
        yield
    finally:
        if not keep:
            ray.shutdown()
