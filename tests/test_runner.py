"""tune/runner.py: one set of runner flags for the search and every sweep, with the same defaults."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tune.runner import Runner

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cli", [["tune.search"], ["dsdm", "distill"], ["ablations.lambdas"]])
def test_help_shows_defaults_and_the_budget(cli):
    out = subprocess.run([sys.executable, "-m", *cli, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=120).stdout
    text = " ".join(out.split())
    assert "leaving --budget out means paper, the paper's settings, sized for a GPU" in text
    assert "cpu = minutes on a CPU" in text and "resolve = " in text


def test_inf_refused_on_cli_flags():
    from tune.search import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--trial-cpus", "inf"])
    assert exc.value.code == 2


def test_search_and_sweeps_share_flags_and_environment_defaults(monkeypatch):
    from ablations import pretrain_epochs
    from tune.search import build_parser

    monkeypatch.setenv("DSDM_STORAGE", "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http")
    monkeypatch.setenv("DSDM_MLFLOW_URI", "http://127.0.0.1:5000")
    search = Runner.from_args(build_parser().parse_args([]))
    sweep = Runner.from_args(pretrain_epochs.build_parser("python -m ablations.pretrain_epochs",
                                                          pretrain_epochs.__doc__).parse_args([]))
    assert search == sweep
    assert search.storage.startswith("s3://bucket/runs?") and search.mlflow_uri == "http://127.0.0.1:5000"
    argv = ["--storage", "/x", "--trial-cpus", "2", "--zoo-gpus", "0.5", "--zoo-actors", "3", "--max-failures", "0"]
    assert Runner.from_args(build_parser().parse_args(argv)) == Runner(
        storage="/x", trial_cpus=2.0, zoo_gpus=0.5, zoo_actors=3, max_failures=0,
        mlflow_uri="http://127.0.0.1:5000")
