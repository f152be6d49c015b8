"""Bad input to `python -m tune.search` and `python -m dsdm`: one line naming the fix, exit code 2,
nothing already written is damaged. Every row of docs/reliability.md's bad-input table is a case here.

"One line" means: stderr holds exactly one non-blank line, `<prog>: error: <message>`, and
nothing else (these inputs are refused before Ray, MLflow or a progress bar start).
Each case runs in its own copy of a workspace that holds earlier results (a finished
search's tables, an MLflow file, a zoo, a distilled set); afterwards every file in that copy
is byte-identical and no file was added. Two cases run as the user types them (a subprocess per
program); the others call the same `main(argv)` in this process (seconds of imports saved per case).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow  # Ray and subprocess searches end to end

REPO = Path(__file__).resolve().parents[1]
SEARCH = [sys.executable, "-m", "tune.search", "--budget", "smoke", "--num-samples", "2", "--cross-arch", "none"]
DSDM = [sys.executable, "-m", "dsdm"]

# id: (command with {ws} for the case's workspace, text the one-line error must contain)
CASES = {
    "unknown_dataset": (SEARCH + ["--dataset", "imagenet", "--storage", "{ws}/runs", "--name", "new"],
                        "unknown dataset 'imagenet'; choose one of: cifar10, cifar100, digits"),
    "missing_data_root": (SEARCH + ["--dataset", "mnist", "--data-root", "{ws}/no-such-dir", "--offline",
                                    "--storage", "{ws}/runs", "--name", "new"],
                          "does not exist; pass the folder that holds the mnist files"),
    "ipc_larger_than_class": (SEARCH + ["--ipc", "100", "--storage", "{ws}/runs", "--name", "new"],
                              "ipc=100 needs 400 real images per class"),
    "negative_lambda": (SEARCH + ["--fix", "lambda1=-1", "--storage", "{ws}/runs", "--name", "new"],
                        "must be >= 0 (got -1.0, 0.2); pass a non-negative weight"),
    "m_larger_than_zoo": (SEARCH + ["--fix", "M=50", "--storage", "{ws}/runs", "--name", "new"],
                          "--fix M=50 is larger than the zoo of the smoke budget (2 models)"),
    "e_outside_snapshot_grid": (SEARCH + ["--fix", "E=7", "--storage", "{ws}/runs", "--name", "new"],
                                "--fix E=7 is not a snapshot epoch of the smoke budget's zoo [1]"),
    "unwritable_storage": (SEARCH + ["--storage", "{ws}/a-file/runs", "--name", "new"],
                           "is not writable (Not a directory); pass --storage DIR you can write"),
    "unreachable_mlflow": (SEARCH + ["--mlflow-uri", "http://127.0.0.1:9", "--storage", "{ws}/runs", "--name", "new"],
                           "MLflow tracking server http://127.0.0.1:9 is unreachable"),
    "unreachable_ray_address": (SEARCH + ["--address", "127.0.0.1:9", "--storage", "{ws}/runs", "--name", "new"],
                                "cannot reach the Ray cluster at '127.0.0.1:9'"),
    "existing_search_without_resume": (SEARCH + ["--storage", "{ws}/runs"],
                                       "already holds a search; pass --resume to continue it or --name NEW"),
    "resume_without_search": (SEARCH + ["--storage", "{ws}/runs", "--name", "never-ran", "--resume"],
                              "nothing to resume at"),
    "inf_weight_in_fix": (SEARCH + ["--fix", "lambda2=inf", "--storage", "{ws}/runs", "--name", "new"],
                          "config key 'distill.lambda2' cannot take 'inf'; pass a finite number"),
    "nan_in_set": (SEARCH + ["--set", "distill.alpha=nan", "--storage", "{ws}/runs", "--name", "new"],
                   "config key 'distill.alpha' cannot take 'nan'; pass a finite number"),
    "search_already_running": (SEARCH + ["--storage", "{ws}/busy", "--name", "new"],
                               "is in use by another search (pid 1 on"),
    "foreign_file_as_distilled_set": (DSDM + ["evaluate", "{ws}/notes.txt", "--budget", "smoke"],
                                      "is not a readable distilled set"),
    "foreign_file_as_checkpoint": (DSDM + ["distill", "--dataset", "digits", "--method", "dm", "--budget", "smoke",
                                           "--checkpoint", "{ws}/snapshot.pt", "--out", "{ws}/set.pt"],
                                   "is not a dsdm distillation checkpoint"),
    "dsdm_inf_weight": (DSDM + ["distill", "--dataset", "digits", "--budget", "smoke", "--lambda1", "inf",
                                "--out", "{ws}/set.pt"],
                        "config key 'distill.lambda1' cannot take inf; pass a finite number"),
    "dsdm_ipc_larger_than_class": (DSDM + ["distill", "--dataset", "digits", "--budget", "smoke", "--ipc", "100",
                                           "--out", "{ws}/set.pt"],
                                   "ipc=100 needs 400 real images per class"),
}


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_workspace(root: Path) -> None:
    """Results of earlier work that a failing command must leave alone."""
    import pandas as pd
    import torch

    from dsdm.synthetic import SyntheticSet

    search = root / "runs" / "digits-ipc10-smoke"
    search.mkdir(parents=True)
    table = pd.DataFrame({"trial_id": ["a1", "b2"], "val_acc": [41.0, 39.5], "status": ["DONE", "DONE"]})
    table.to_parquet(search / "trials.parquet", index=False)
    (search / "trials.md").write_text(table.to_markdown(index=False) + "\n")
    (root / "runs" / "mlflow.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    zoo = root / "runs" / "zoos" / "digits-0123456789ab"
    zoo.mkdir(parents=True)
    torch.save({"weight": torch.arange(6.0)}, zoo / "model000_epoch001.pt")
    (zoo / "manifest.json").write_text('{"format": "dsdm-zoo", "files": {}}')
    SyntheticSet(torch.rand(20, 1, 8, 8), torch.arange(10).repeat(2), (2, 2), "digits", (0.3,), (0.4,),
                 {"distill.ipc": 2}).save(root / "set.pt")  # a distilled set from an earlier run
    torch.save({"weight": torch.zeros(3)}, root / "snapshot.pt")  # a torch file, but no dsdm checkpoint
    (root / "notes.txt").write_text("not a tensor file\n")
    (root / "a-file").write_text("a regular file where a folder is expected\n")
    (root / "cache").mkdir()
    (root / "busy").mkdir()  # a search holds this folder (pid 1 never ends)
    (root / "busy" / "new.lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "since": "10:00"}))


SUBPROCESS = ("unknown_dataset", "foreign_file_as_distilled_set")  # one per program, as a user runs it
HIDDEN_ENV = ("RAY_ADDRESS", "DSDM_DATA", "MLFLOW_TRACKING_URI", "http_proxy", "https_proxy", "HTTP_PROXY",
              "HTTPS_PROXY", "all_proxy", "ALL_PROXY")  # traffic stays on loopback


def run_case(case: str, root: Path) -> dict:
    ws = root / case
    shutil.copytree(root / "template", ws)
    before = tree(ws)
    cmd, _ = CASES[case]
    argv = [a.format(ws=ws) for a in cmd]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSDM_CACHE", str(ws / "cache"))
        for var in HIDDEN_ENV:
            mp.delenv(var, raising=False)
        proc = run_subprocess(argv) if case in SUBPROCESS else run_in_process(argv)
    return {"proc": proc, "before": before, "after": tree(ws), "ws": ws}


def run_subprocess(argv: list[str]):
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def run_in_process(argv: list[str]):
    """`python -m MODULE ARGS` as `MODULE.main(ARGS)` here: its exit code and what it wrote."""
    import importlib

    module = importlib.import_module("dsdm.cli" if argv[2] == "dsdm" else argv[2])
    out, err = io.StringIO(), io.StringIO()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main(argv[3:])
            except SystemExit as exc:  # argparse
                code = exc.code
    finally:
        for sig, handler in handlers.items():  # the command installs its own; this worker keeps pytest's
            signal.signal(sig, handler)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    make_workspace(root / "template")
    return {case: run_case(case, root) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(outcomes, case):
    out = outcomes[case]
    proc, expected = out["proc"], CASES[case][1]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    prog = "tune.search" if "tune.search" in CASES[case][0] else "dsdm"
    assert proc.returncode == 2, f"exit {proc.returncode}; stderr: {proc.stderr[-2000:]}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-2000:]}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert out["after"] == out["before"], "a failing command changed, added or removed files"
