"""The cluster rehearsal's short form (scripts/rehearse_cluster.py --short) as an end-to-end test.

Real parts on 127.0.0.1, nothing mocked: moto's S3 server with a bucket, a real `mlflow
server` (sqlite, artifacts proxied to the bucket), a Ray head and one worker node with their
own folders and a file-access audit. One rehearsal runs `tune.search --storage s3://...
--mlflow-uri http://...` with the cross-architecture phase, `ablations.model_count` on the
same storage, and one fault (the bucket unreachable at start), then a fresh process that
knows only the bucket and the server's URL reads everything back. Skipped only where moto's
server cannot be installed.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def moto_available() -> str | None:
    """None when moto's server and boto3 import (installing them if needed), else why not."""
    sys.path.insert(0, str(REPO))
    from scripts.rehearse_cluster import ensure_installed

    try:
        ensure_installed()
    except Exception as exc:  # no registry, no wheel for this platform
        return f"moto[server] cannot be installed here ({type(exc).__name__}: {exc})"
    importlib.invalidate_caches()
    missing = [m for m in ("moto", "boto3", "flask") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not importable after installing moto[server]" if missing else None


@pytest.fixture(scope="module")
def rehearsal():
    reason = moto_available()
    if reason:
        pytest.skip(reason)
    from scripts.rehearse_cluster import rehearse, table

    root = Path(tempfile.mkdtemp(prefix="rh-"))  # short: Ray's socket paths live under it
    start = time.time()
    outcomes = rehearse(root, short=True, progress=lambda line: print(line, flush=True))
    wall = time.time() - start
    print(table(outcomes), f"\nshort rehearsal: {wall:.0f}s", flush=True)
    yield {"outcomes": {o.scenario.split(",")[0].split(":")[-1].strip(): o for o in outcomes}, "root": root,
           "wall": wall}
    shutil.rmtree(root, ignore_errors=True)


def test_search_on_bucket_cross_arch_on_another_node(rehearsal):
    out = rehearsal["outcomes"]["search"]
    assert out.ok, (out.problems, out.notes)
    assert out.finished == out.expected == 2 and out.runs == "3/0/0" and out.duplicates == 0
    assert out.objects > 0  # Tune's run, checkpoints, tables and records are in the bucket
    assert any("cross-arch networks on" in n for n in out.notes)  # checked: a node other than the distiller's


def test_sweep_on_bucket(rehearsal):
    out = rehearsal["outcomes"]["sweep model_count"]
    assert out.ok, (out.problems, out.notes)
    assert out.finished == out.expected == 2 and out.runs == "3/0/0" and out.exit_codes == [0]


def test_bucket_unreachable_one_line_exit_2(rehearsal):
    out = rehearsal["outcomes"]["bucket unreachable at start"]
    assert out.ok, (out.problems, out.notes)
    assert out.exit_codes == [2]


def test_fresh_machine_reads_bucket_and_mlflow(rehearsal):
    out = rehearsal["outcomes"]["fresh machine reads bucket + MLflow"]
    assert out.ok, (out.problems, out.notes)
    assert out.finished == out.expected == 2


def test_no_node_touched_another_nodes_files(rehearsal):
    marks = [p.name.rsplit("-", 1)[0] for p in (rehearsal["root"] / "audit" / "marks").iterdir()]
    assert {"head", "n1"} <= set(marks)  # the audit ran in Ray worker processes of both nodes
    assert all(o.violations == 0 for o in rehearsal["outcomes"].values())
