"""Rehearse the documented cluster on one machine before paying for one (docs/cluster.md).

    python scripts/rehearse_cluster.py            # the full form: every scenario (~10 min on 2 cores)
    python scripts/rehearse_cluster.py --short    # search + one sweep + one fault (the suite's test)

Installs moto[server] (and boto3) into this Python's environment if missing, then starts, on
127.0.0.1 only: an S3-compatible server with a bucket, a real `mlflow server` (sqlite on the
head, artifacts proxied to the bucket), and a Ray head plus worker nodes, each with its own
folders (cwd, TMPDIR, DSDM_CACHE, Ray temp dir) and a file-access audit. It runs the project's
commands against them with `--storage s3://...` and `--mlflow-uri http://...`, injects the
faults a cluster has at named fault points, prints a summary table (also written to
ROOT/summary.md and summary.json) and stops every process it started. Exit 0 when every
scenario passed its checks, 1 otherwise.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLUMNS = ("scenario", "trials done/expected", "runs FINISHED/RUNNING/FAILED", "duplicates", "exit codes",
           "objects in bucket", "audit violations", "wall s", "result")


def ensure_installed() -> None:
    """moto's server and boto3 in this environment, at constraints.txt's versions."""
    missing = [m for m in ("moto", "boto3", "flask") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"rehearsal: installing moto[server] and boto3 ({', '.join(missing)} missing)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                        "moto[server]", "boto3"], check=True)


def table(outcomes) -> str:
    rows = [COLUMNS, *[(o.scenario, f"{o.finished}/{o.expected}" if o.expected else "-", o.runs, str(o.duplicates),
                        " ".join(map(str, o.exit_codes)), str(o.objects), str(o.violations), f"{o.wall_s:.0f}",
                        "ok" if o.ok else "FAIL: " + "; ".join(o.problems)) for o in outcomes]]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "---|" * len(COLUMNS), *lines[1:]])


def rehearse(root: Path, short: bool, progress=print) -> list:
    from scripts.rehearsal import scenarios as sc
    from scripts.rehearsal.parts import MlflowServer, Nodes, NodeSpec, ObjectStore

    store = mlflow = nodes = None
    outcomes = []
    try:
        t0 = time.time()
        store = ObjectStore(root / "s3").start()
        mlflow = MlflowServer(root / "head", store).start(wait=False)  # comes up while the nodes start
        if short:  # a head that runs trials too, and one worker
            specs = [NodeSpec("head", 1), NodeSpec("n1", 1)]
        else:  # a CPU head that runs no trials (cluster.yaml's), two CPU workers and one that declares a GPU
            specs = [NodeSpec("head", 0), NodeSpec("n1", 1), NodeSpec("n2", 1), NodeSpec("gpu", 1, gpus=1)]
        nodes = Nodes(root, specs).start()
        mlflow.wait()
        progress(f"rehearsal: bucket {store.endpoint}, MLflow {mlflow.url}, Ray {nodes.address} "
                 f"({len(specs)} nodes) up in {time.time() - t0:.0f}s; folders under {root}")
        rh = sc.Rehearsal(root, store, mlflow, nodes)
        plan = [(sc.search, ()), (sc.sweep, ("ablations.model_count", "model_count-digits-ipc10-smoke", 2)),
                (sc.bucket_unreachable, (short,))]
        if not short:
            plan[2:2] = [(sc.sweep, ("ablations.pretrain_epochs", "pretrain_epochs-digits-ipc10-smoke", 1)),
                         (sc.gpu_placement, ("gpu",)), (sc.node_removed, ()), (sc.driver_killed, ()),
                         (sc.mlflow_restarted, ())]
        for fn, args in plan:
            outcomes.append(fn(rh, *args))
            o = outcomes[-1]
            progress(f"rehearsal: {o.scenario}: {'ok' if o.ok else 'FAIL ' + '; '.join(o.problems)} "
                     f"({o.wall_s:.0f}s){'; ' + '; '.join(o.notes) if o.notes else ''}")
        names = ["search", "model_count-digits-ipc10-smoke"] + ([] if short else [
            "pretrain_epochs-digits-ipc10-smoke", "gpu", "node-lost", "driver-kill", "mlflow-restart"])
        outcomes.append(sc.fresh_reader(rh, names))
        progress(f"rehearsal: {outcomes[-1].scenario}: {'ok' if outcomes[-1].ok else 'FAIL'}")
    finally:
        for part in (nodes, mlflow, store):
            if part is not None:
                part.stop()
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/rehearse_cluster.py", description=__doc__.splitlines()[0])
    p.add_argument("--short", action="store_true", help="search + one sweep + one fault (the suite's test)")
    p.add_argument("--keep", action="store_true", help="keep the rehearsal's folders (logs, node folders)")
    args = p.parse_args(argv)
    ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="rh-"))  # short: Ray's socket paths live under it
    start = time.time()
    outcomes = rehearse(root, args.short)
    summary = table(outcomes)
    (root / "summary.md").write_text(summary + "\n")
    (root / "summary.json").write_text(json.dumps([asdict(o) for o in outcomes], indent=1, default=str))
    print(summary)
    print(f"\nrehearsal wall time: {time.time() - start:.0f}s; logs and folders: {root}")
    if not args.keep and all(o.ok for o in outcomes):
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
