"""The released reference sets under sets/: each folder holds its set, a manifest that validates and
matches the file, and its grid; the tables quote the manifests' numbers; and the digits set
re-scores, one network at its manifest's recipe, inside the manifest's CI."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dsdm import manifest as mf
from dsdm.io import sha256_file
from dsdm.synthetic import SyntheticSet

REPO = Path(__file__).resolve().parents[1]
SETS = REPO / "sets"
RELEASED = sorted(p.name for p in SETS.iterdir() if p.is_dir()) if SETS.is_dir() else []


def test_there_are_released_sets():
    assert {"digits-ipc10", "mnist-ipc10", "fashionmnist-ipc10"} <= set(RELEASED)


@pytest.mark.parametrize("name", RELEASED)
def test_each_released_set_has_a_valid_manifest_matching_its_file(name):
    folder = SETS / name
    assert sorted(p.name for p in folder.iterdir()) == [f"{name}.manifest.json", f"{name}.png", f"{name}.pt"]
    m = mf.read_manifest(folder / f"{name}.manifest.json")  # validates against the schema
    s = SyntheticSet.load(folder / f"{name}.pt")
    assert m["set"]["sha256"] == sha256_file(folder / f"{name}.pt") and m["set"]["file"] == f"{name}.pt"
    assert (m["set"]["dataset"], m["set"]["ipc"], list(s.grid)) == (s.dataset, s.ipc, m["set"]["grid"])
    assert m["code"]["git_commit"] and m["code"]["git_dirty"] is False  # made from a committed tree
    assert m["evaluation"]["results"]["convnet3"]["test"]["n"] >= 3


@pytest.mark.parametrize("doc", ["sets/README.md", "docs/results.md"])
def test_the_tables_quote_the_manifests(doc):
    """Every released set's row shows its manifest's mean ± sd and CI, to two decimals."""
    text = (REPO / doc).read_text()
    for name in RELEASED:
        m = mf.read_manifest(SETS / name / f"{name}.manifest.json")
        t = m["evaluation"]["results"]["convnet3"]["test"]
        rows = [line for line in text.splitlines() if line.startswith("|") and f"`{name}`" in line]
        assert len(rows) == 1, f"{doc}: one table row for {name}"
        expected = f"{t['mean']:.2f} ± {t['sd']:.2f} | {t['ci95'][0]:.2f} to {t['ci95'][1]:.2f} | {t['n']}"
        assert expected in rows[0], f"{doc}: {rows[0]!r} lacks {expected!r}"


def test_the_one_line_commands_are_the_release_scripts():
    """The README's reproduce column is what scripts/release_sets.sh --print says."""
    printed = subprocess.run(["bash", str(REPO / "scripts" / "release_sets.sh"), "--print", *RELEASED],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert printed.returncode == 0, printed.stderr
    readme = (SETS / "README.md").read_text()
    for command in printed.stdout.splitlines():
        command = command.replace("--data-root data", "--data-root DATA")
        assert f"`{command}`" in readme, command


def test_digits_rescores_inside_its_manifests_ci(tmp_path):
    """One network (run 0) at the manifest's recipe (the cpu budget's 50 epochs): a small re-score."""
    name = "digits-ipc10"
    for suffix in (".pt", ".manifest.json"):  # a copy: the test never writes next to the released set
        (tmp_path / f"{name}{suffix}").write_bytes((SETS / name / f"{name}{suffix}").read_bytes())
    env = {**os.environ, "DSDM_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "dsdm", "evaluate", f"{name}.pt", "--budget", "cpu", "--runs", "1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    verdict = [line for line in r.stdout.splitlines() if line.startswith("convnet3: ")][-1]
    assert re.match(r"convnet3: agree: the mean [\d.]+ is inside the manifest's 95% CI", verdict), r.stdout
