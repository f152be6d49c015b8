"""Run every test id of the given modules alone (`pytest path::name`, a fresh process each) and
report the ones that fail: a test that passes only after another has run shows up here.

    .venv/bin/python scripts/each_test_alone.py tests/test_ablations.py tests/test_faults.py ...
    (no arguments: every module that has a module- or session-scoped fixture)
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules_with_shared_fixtures() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if re.search(r"scope=[\"'](module|session)[\"']", p.read_text()))


def test_ids(module: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", module], cwd=ROOT,
                       capture_output=True, text=True)
    return [line for line in r.stdout.splitlines() if "::" in line]


def main(argv: list[str]) -> int:
    modules = argv or modules_with_shared_fixtures()
    failed, total, t0 = [], 0, time.time()
    for module in modules:
        for test_id in test_ids(module):
            start = time.time()
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_id],
                               cwd=ROOT, capture_output=True, text=True)
            total += 1
            status = "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
            print(f"{status:<18} {time.time() - start:6.1f}s  {test_id}", flush=True)
            if r.returncode != 0:
                failed.append(test_id)
    print(f"\n{total - len(failed)} of {total} test ids pass alone ({time.time() - t0:.0f}s)")
    for test_id in failed:
        print(f"failed alone: {test_id}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
