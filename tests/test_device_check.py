"""The prepared GPU check (scripts/device_check.sh): valid bash, a CPU dry run that prints its one
table and writes its JSON, and a list of CUDA tests that covers every test that skips without CUDA."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.device_check import CUDA_TESTS, MODES

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_check.sh"


def test_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_test_that_skips_without_cuda_is_run_by_the_check():
    """A new CUDA-only test in another file must be added to CUDA_TESTS (and be selected by -k cuda)."""
    marked = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")
                    if re.search(r"skipif\(not torch\.cuda\.is_available\(\)", p.read_text()))
    assert marked == sorted(CUDA_TESTS)
    for path in CUDA_TESTS:
        names = re.findall(r"skipif\(not torch\.cuda\.is_available\(\).*\n(?:@.*\n)*def (test_\w+)", (REPO / path).read_text())
        assert names and all("cuda" in n for n in names), (path, names)


def test_full_mode_fits_six_minutes_of_phase_limits():
    assert sum(limit for _, limit in MODES["full"].values()) <= 360
    assert sum(limit for _, limit in MODES["quick"].values()) < sum(limit for _, limit in MODES["full"].values())


def test_dry_run_prints_one_table_and_writes_json(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| phase |"):].strip().splitlines()
    assert all(line.startswith("|") for line in table), "the table is the last thing printed"
    phases = {line.split("|")[1].strip() for line in table[2:]}
    assert phases == set(MODES["dry-run"]) and "skipped" in proc.stdout
    data = json.loads((tmp_path / "device_check.json").read_text())
    assert data["mode"] == "dry-run" and all(r["status"] == "ok" for r in data["phases"].values())
    cell = json.loads((tmp_path / "eval_cell.json").read_text())["eval_cell"]["resolve-fashionmnist-ipc1"]
    assert cell["random_pixels"] and cell["new"]["accuracies_equal_today"] and cell["new"]["cell_speedup"] > 0
    assert (tmp_path / "device_check.md").read_text().strip().endswith(table[-1])
