"""The rehearsal's scenarios: the search and the sweeps on bucket storage, and the faults a cluster has.

`Rehearsal` holds the started parts (bucket, MLflow server, nodes) and runs the project's own
commands as a user would, as separate driver processes on the "head" (cwd: the driver's folder).
A fault fires at a named fault point (tune/faults.py); where the scenario must act from
outside (remove a node, restart the server), the point waits (`await`) or blocks (`block`)
until the rehearsal has acted: no clock races. Each scenario returns an `Outcome`: one row
of the summary table.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from scripts.rehearsal import checks
from scripts.rehearsal.parts import REPO, MlflowServer, Nodes, ObjectStore, driver_env, free_port, stop_group
from tune.resume import search_id_of

TINY = ["--set", "distill.iterations=3", "--set", "distill.checkpoint_every=1", "--set", "distill.log_every=1",
        "--set", "distill.batch_real=8", "--set", "distill.aug_pool=1", "--set", "zoo.max_per_class=10",
        "--set", "eval.runs=1", "--set", "eval.epochs=1"]
EXPERIMENT = "dsdm-digits-ipc10"
PREFIX = "dsdm"  # --storage s3://BUCKET/dsdm


@dataclass
class Outcome:
    scenario: str
    expected: int = 0
    finished: int = 0
    runs: str = "-"  # FINISHED/RUNNING/FAILED
    duplicates: int = 0
    not_nested: int = 0
    exit_codes: list = field(default_factory=list)
    objects: int = 0
    violations: int = 0
    wall_s: float = 0.0
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def require(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


@dataclass
class Run:
    code: int
    out: str
    err: str
    fired: dict | None = None


class Rehearsal:
    def __init__(self, root: Path, store: ObjectStore, mlflow: MlflowServer, nodes: Nodes, timeout_s: int = 600):
        self.root, self.store, self.mlflow, self.nodes, self.timeout_s = root, store, mlflow, nodes, timeout_s
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (nodes.driver / "tmp").mkdir(parents=True, exist_ok=True)
        self.count = 0

    @property
    def storage(self) -> str:
        return self.store.uri(PREFIX)

    def store_view(self):
        """The storage as the project's commands see it (tune.storage.Storage)."""
        from tune.storage import Storage

        return Storage(self.storage, None)

    def read_text(self, *parts: str) -> str | None:
        store = self.store_view()
        return store.read_text(*parts) if store.exists(*parts) else None

    def command(self, module: str, *args: str, storage: str | None = None) -> list[str]:
        return [sys.executable, "-m", module, "--dataset", "digits", "--budget", "smoke", "--address",
                self.nodes.address, "--storage", storage or self.storage, "--mlflow-uri", self.mlflow.url, *TINY, *args]

    def run(self, label: str, cmd: list[str], faults: dict[str, str] | None = None,
            act: Callable[[dict, Callable[[], None]], None] | None = None, point: str = "") -> Run:
        """The command as a driver process; with `faults`, DSDM_FAULT_* set and, once `point` fired,
        `act(context, release)` runs here; the point is released by `release()` or after `act`."""
        self.count += 1
        folder = self.root / "faults" / f"{self.count:02d}-{label}"
        env = driver_env(self.nodes)
        if faults:
            folder.mkdir(parents=True, exist_ok=True)
            env.update(DSDM_FAULT_DIR=str(folder), **{f"DSDM_FAULT_{k.upper()}": v for k, v in faults.items()})
        out, err = self.logs / f"{self.count:02d}-{label}.out", self.logs / f"{self.count:02d}-{label}.err"
        with open(out, "w") as fo, open(err, "w") as fe:
            proc = subprocess.Popen(cmd, cwd=self.nodes.driver, env=env, stdout=fo, stderr=fe, start_new_session=True)
            fired, deadline = None, time.time() + self.timeout_s
            try:
                while proc.poll() is None and time.time() < deadline:
                    marker = folder / f"{point}.fired"
                    if act is not None and fired is None and marker.exists():
                        time.sleep(0.2)  # the marker is written right after it is created
                        fired = json.loads(marker.read_text() or "{}")
                        act(fired, (folder / f"{point}.released").touch)
                        (folder / f"{point}.released").touch()
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:
                    stop_group(proc, 10)
                    err.open("a").write(f"\nrehearsal: stopped after {self.timeout_s}s\n")
        return Run(proc.returncode, out.read_text(), err.read_text(), fired)

    # --- what every scenario counts ---------------------------------------------------------
    def count_records(self, outcome: Outcome, name: str, expected: int, since: float) -> checks.Records:
        outcome.expected = expected
        outcome.finished = checks.finished(self.storage, name)
        rec = checks.records(self.mlflow.url, EXPERIMENT, search_id_of(self.store_view(), name))
        outcome.runs, outcome.duplicates, outcome.not_nested = rec.status_text(), rec.duplicates, rec.not_nested
        outcome.objects = len(self.store.keys(f"{PREFIX}/{name}"))
        outcome.violations = len([v for v in self.nodes.violations() if v.get("time", since) >= since])
        lookups = {a["path"] for a in self.nodes.accesses() if a.get("lookup") and a.get("time", since) >= since}
        if lookups:
            outcome.notes.append(f"audit: {len(lookups)} lookups of files not there ({sorted(lookups)[0]}, ...)")
        outcome.require(outcome.finished == expected, f"{outcome.finished}/{expected} trials finished")
        outcome.require(rec.statuses.get("RUNNING", 0) == 0 and rec.statuses.get("FAILED", 0) == 0,
                        f"runs FINISHED/RUNNING/FAILED = {rec.status_text()}")
        outcome.require(rec.finals == expected, f"{rec.finals} trial runs with their final metrics, {expected} expected")
        outcome.require(outcome.duplicates == 0, f"{outcome.duplicates} duplicate records")
        outcome.require(outcome.not_nested == 0, f"{outcome.not_nested} trial runs not nested under their parent")
        outcome.require(outcome.violations == 0, f"{outcome.violations} file accesses across nodes (audit)")
        return rec


def timed(fn):
    def wrapper(rh: Rehearsal, *args, **kwargs) -> Outcome:
        start = time.time()
        outcome = fn(rh, start, *args, **kwargs)
        outcome.wall_s = time.time() - start
        return outcome
    wrapper.__name__ = fn.__name__
    return wrapper


# --- scenarios -------------------------------------------------------------------------------
@timed
def search(rh: Rehearsal, start: float, samples: int = 2) -> Outcome:
    """tune.search on the bucket; the best trial's cross-architecture networks spread over the nodes."""
    name = "search"
    out = Outcome("search, cross-arch best")
    r = rh.run(name, rh.command("tune.search", "--name", name, "--num-samples", str(samples), "--cross-arch", "best"))
    out.exit_codes.append(r.code)
    rec = rh.count_records(out, name, samples, start)
    out.require(r.code == 0, f"exit {r.code}: {r.err.strip().splitlines()[-1:] if r.err.strip() else ''}")
    table = checks.trial_table(rh.storage, name)
    if table is not None and len(table):
        best = table.iloc[0]
        run = rec.trials.get(best["trial_id"])
        xnodes = json.loads(run.data.tags.get("dsdm.xarch_nodes", "{}")) if run is not None else {}
        where = {rh.nodes.name_of(n) for nodes in xnodes.values() for n in nodes}
        distilled = rh.nodes.name_of(best["node"])
        out.notes.append(f"best trial distilled on {distilled}, cross-arch networks on {sorted(where)}")
        out.require(bool(where - {distilled}), "no cross-architecture network ran on another node than the distiller's")
    return out


@timed
def sweep(rh: Rehearsal, start: float, module: str, folder: str, expected: int) -> Outcome:
    """An ablation sweep on the bucket (its tables and plot logged to MLflow)."""
    out = Outcome(f"sweep {module.split('.')[-1]}")
    r = rh.run(folder, rh.command(module, "--results", "results"))
    out.exit_codes.append(r.code)
    rh.count_records(out, folder, expected, start)
    out.require(r.code == 0, f"exit {r.code}: {r.err.strip().splitlines()[-1:] if r.err.strip() else ''}")
    return out


@timed
def gpu_placement(rh: Rehearsal, start: float, gpu_node: str, samples: int = 2) -> Outcome:
    """--trial-gpus / --zoo-gpus: zoo actors, trials and cross-arch networks all on the node that
    declares a GPU; with no CUDA device there, they run on its CPU."""
    name = "gpu"
    out = Outcome("search --trial-gpus/--zoo-gpus")
    # its own --local-dir: a zoo of its own, so the zoo actors run (and are placed) too
    r = rh.run(name, rh.command("tune.search", "--name", name, "--num-samples", str(samples), "--cross-arch", "best",
                                "--trial-gpus", "0.5", "--trial-cpus", "0.5", "--zoo-gpus", "0.5", "--zoo-cpus", "0.5",
                                "--local-dir", "runs-gpu"))
    out.exit_codes.append(r.code)
    rec = rh.count_records(out, name, samples, start)
    out.require(r.code == 0, f"exit {r.code}: {r.err.strip().splitlines()[-1:] if r.err.strip() else ''}")
    table = checks.trial_table(rh.storage, name)
    trial_nodes = {rh.nodes.name_of(n) for n in table["node"]} if table is not None else set()
    zoo = json.loads(rh.read_text(f"{name}.zoo.json") or "{}")
    zoo_nodes = {rh.nodes.name_of(m["node"]) for m in zoo.get("models", [])}
    xnodes = {rh.nodes.name_of(n) for run in rec.trials.values()
              for nodes in json.loads(run.data.tags.get("dsdm.xarch_nodes", "{}")).values() for n in nodes}
    out.notes.append(f"trials on {sorted(trial_nodes)}, zoo actors on {sorted(zoo_nodes)}, cross-arch on {sorted(xnodes)}")
    out.require(trial_nodes == {gpu_node} and zoo_nodes == {gpu_node} and xnodes <= {gpu_node},
                f"GPU work outside {gpu_node}")
    return out


@timed
def node_removed(rh: Rehearsal, start: float, samples: int = 2) -> Outcome:
    """A worker node removed while a trial is at iteration 2: the trial re-runs on another node
    from its checkpoint in the bucket. The node comes back afterwards (a fresh raylet)."""
    name = "node-lost"
    out = Outcome("fault: worker node removed mid-search")
    removed: list[str] = []

    def remove(fired: dict, release: Callable[[], None]) -> None:
        removed.append(rh.nodes.name_of(fired.get("node", "")))
        rh.nodes.remove(removed[-1])

    r = rh.run(name, rh.command("tune.search", "--name", name, "--num-samples", str(samples), "--cross-arch", "none",
                                "--max-failures", "3"),
               faults={"trial_exit_at": "2@block"}, act=remove, point="trial_exit_at")
    out.exit_codes.append(r.code)
    if removed:
        rh.nodes.restore(removed[0])
    rh.count_records(out, name, samples, start)
    out.require(r.code == 0, f"exit {r.code}")
    out.require(r.fired is not None, "the fault point never fired")
    table = checks.trial_table(rh.storage, name)
    if r.fired is not None and table is not None:
        row = table[table["trial_id"] == r.fired["trial"]]
        moved = rh.nodes.name_of(row["node"].iloc[0]) if len(row) else "?"
        resumed = int(row["resumed_from"].iloc[0]) if len(row) else -1
        out.notes.append(f"removed {removed[0] if removed else '?'}; its trial finished on {moved}, resumed from "
                         f"iteration {resumed}")
        out.require(moved not in removed and resumed >= 1, "the trial did not continue elsewhere from its checkpoint")
    return out


@timed
def driver_killed(rh: Rehearsal, start: float, samples: int = 2) -> Outcome:
    """SIGKILL to the driver once Tune registered trial 1's checkpoint of iteration 2; the same
    command with --resume finishes the search from the bucket."""
    name = "driver-kill"
    out = Outcome("fault: driver SIGKILLed, then --resume")
    cmd = rh.command("tune.search", "--name", name, "--num-samples", str(samples), "--cross-arch", "none")
    first = rh.run(name, cmd, faults={"driver_checkpoint": "1:2@SIGKILL"})
    second = rh.run(name + "-resume", [*cmd, "--resume"])
    out.exit_codes += [first.code, second.code]
    rh.count_records(out, name, samples, start)
    out.require(first.code == -signal.SIGKILL, f"the first driver exited {first.code}, not by SIGKILL")
    out.require(second.code == 0, f"--resume exited {second.code}: {second.err.strip().splitlines()[-1:]}")
    return out


@timed
def mlflow_restarted(rh: Rehearsal, start: float, samples: int = 2) -> Outcome:
    """The MLflow server stopped while a trial is at iteration 2, and started again on its port; the
    trial goes on logging meanwhile."""
    name = "mlflow-restart"
    out = Outcome("fault: MLflow server restarted mid-search")
    down: list[float] = []

    def restart(fired: dict, release: Callable[[], None]) -> None:
        down.append(time.time())
        rh.mlflow.stop()
        release()  # the trial goes on against the dead port while the server starts again
        rh.mlflow.start()
        down.append(time.time())

    r = rh.run(name, rh.command("tune.search", "--name", name, "--num-samples", str(samples), "--cross-arch", "none"),
               faults={"trial_exit_at": "2@await"}, act=restart, point="trial_exit_at")
    out.exit_codes.append(r.code)
    rh.count_records(out, name, samples, start)
    out.require(r.code == 0, f"exit {r.code}")
    out.require(r.fired is not None, "the fault point never fired")
    if down:
        out.notes.append(f"server down {down[1] - down[0]:.1f}s")
    return out


@timed
def bucket_unreachable(rh: Rehearsal, start: float, short: bool = False) -> Outcome:
    """--storage on an endpoint where nothing listens (the search, a sweep) and on a bucket that does
    not exist: one line, exit 2 (`short`: the search on the dead endpoint only)."""
    out = Outcome("fault: bucket unreachable at start")
    dead = rh.store.uri(PREFIX, port=free_port())
    missing = rh.storage.replace(f"s3://{rh.store.bucket}/", "s3://no-such-bucket/")
    cases = [("dead-endpoint", "tune.search", dead), ("dead-endpoint", "ablations.model_count", dead),
             ("no-bucket", "tune.search", missing)]
    for label, module, storage in cases[:1] if short else cases:
        t0 = time.time()
        r = rh.run(f"{label}-{module}", rh.command(module, storage=storage))
        lines = [line for line in r.err.splitlines() if line.strip()]
        out.exit_codes.append(r.code)
        out.require(r.code == 2 and len(lines) == 1, f"{module} on {label}: exit {r.code}, {len(lines)} lines on stderr")
        out.notes.append(f"{module} {label}: {time.time() - t0:.1f}s, '{lines[-1][:120] if lines else ''}'")
    out.runs = "-"
    return out


@timed
def fresh_reader(rh: Rehearsal, start: float, names: list[str]) -> Outcome:
    """A fresh process with only the storage URI and the MLflow URL reads every run's records
    (scripts/rehearsal/reader.py), audited like a node: it may open nothing of the nodes' or the driver's."""
    from scripts.rehearsal.parts import process_env

    out = Outcome("fresh machine reads bucket + MLflow")
    folder = rh.root / "fresh"
    for sub in ("cwd", "tmp", "cache"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    forbid = [str(rh.nodes.folder(n)) for n in rh.nodes.specs] + [str(rh.nodes.driver)]
    env = process_env(PYTHONPATH=os.pathsep.join([str(rh.nodes.audit), str(REPO)]), DSDM_AUDIT_ALL="1",
                      DSDM_AUDIT_LOG=str(folder / "audit.jsonl"), DSDM_AUDIT_NODE="fresh",
                      DSDM_AUDIT_FORBID=os.pathsep.join(forbid), TMPDIR=str(folder / "tmp"),
                      DSDM_CACHE=str(folder / "cache"), MPLCONFIGDIR=str(folder / "tmp"))
    r = subprocess.run([sys.executable, "-m", "scripts.rehearsal.reader", rh.storage, rh.mlflow.url, *names],
                       cwd=folder / "cwd", env=env, capture_output=True, text=True, timeout=rh.timeout_s)
    (rh.logs / "fresh-reader.out").write_text(r.stdout + "\n" + r.stderr)
    out.exit_codes.append(r.returncode)
    audit = folder / "audit.jsonl"
    accesses = [json.loads(line) for line in audit.read_text().splitlines()] if audit.is_file() else []
    out.violations = len([a for a in accesses if not a.get("lookup")])
    try:
        results = json.loads(r.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        results = []
        out.problems.append(f"reader exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    out.expected = len(names)
    out.finished = sum(1 for x in results if not x["problems"])
    for x in results:
        out.notes.append(f"{x['name']}: {x.get('done')}/{x.get('trials')} trials, zoo manifest "
                         f"{x.get('zoo_files')} files, parent files {x.get('parent_files')}, best set {x.get('best_set')}")
        out.problems += [f"{x['name']}: {p}" for p in x["problems"]]
    out.require(out.violations == 0, f"{out.violations} reads of node or driver folders")
    return out
