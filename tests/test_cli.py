"""`python -m dsdm` as a user runs it: real subprocesses, exit codes, files, one-line errors.

Every subprocess pays ~3 s of imports, so independent commands run concurrently (one thread each).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def env_for(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(DSDM_CACHE=str(cache), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def run_all(commands: dict[str, list[str]], cwd: Path, env: dict, timeout: float = 300) -> dict:
    """Start every command at once; return {name: CompletedProcess-like (returncode, stdout, stderr)}."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "dsdm", *args], cwd=cwd, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in commands.items()}
    out = {}
    for name, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


def ok(result) -> None:
    assert result.returncode == 0, f"{result.args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def test_evaluate_distill_evaluate_show(tmp_path):
    env = env_for(tmp_path / "cache")
    first = run_all({
        "coreset": ["evaluate", "--dataset", "digits", "--method", "random", "--ipc", "2", "--budget", "smoke",
                    "--runs", "2", "--epochs", "2", "--json", "out.json"],
        "distill": ["distill", "--dataset", "digits", "--budget", "smoke", "--ipc", "2", "--out", "f.pt",
                    "--set", "distill.iterations=3"],
    }, tmp_path, env)
    ok(first["coreset"])
    report = json.loads((tmp_path / "out.json").read_text())
    r = report["results"]["convnet3"]
    assert len(r["runs"]) == 2 and 0 <= r["mean"] <= 100 and r["std"] >= 0
    assert r["mean"] == pytest.approx(sum(r["runs"]) / 2) and r["epochs"] == 2
    assert report["dataset"] == "digits" and report["budget"] == "smoke"
    assert report["config"]["distill.ipc"] == 2 and report["config"]["eval.runs"] == 2
    assert "| random ipc2 | digits | convnet3 |" in first["coreset"].stdout
    phases = report["phases"]  # seconds per phase and peak memory (dsdm.phases.PhaseClock)
    assert set(phases) == {"phase_seconds/eval", "phase_seconds/eval_train", "phase_seconds/eval_score", "peak_rss_mb"}
    assert phases["phase_seconds/eval"] >= phases["phase_seconds/eval_train"] > 0 and phases["peak_rss_mb"] > 50

    ok(first["distill"])
    assert (tmp_path / "f.pt").is_file() and (tmp_path / "f.pt.ckpt").is_file()
    assert list((tmp_path / "cache" / "zoos").iterdir()), "the zoo went to DSDM_CACHE"
    assert "wrote f.pt: 20 stored images (2 per class, tiles (2, 2))" in first["distill"].stdout
    assert all(f"{phase} " in first["distill"].stdout for phase in ("zoo", "distill", "cache_fill", "peak RSS"))

    second = run_all({
        "evaluate": ["evaluate", "f.pt", "--budget", "smoke", "--epochs", "2", "--runs", "2"],
        "show": ["show", "f.pt", "--out", "g.png"],
    }, tmp_path, env)
    ok(second["evaluate"])
    row = [line for line in second["evaluate"].stdout.splitlines() if line.startswith("| f.pt |")]
    assert len(row) == 1 and "| digits | convnet3 | dsdm | 2 |" in row[0] and "| 2 |" in row[0]
    ok(second["show"])
    png = tmp_path / "g.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def check_one_line(name: str, code: int, stderr: str, words: list[str]) -> None:
    lines = stderr.splitlines()
    assert code == 2, f"{name}: exit {code}\n{stderr}"
    assert len(lines) == 1, f"{name}: expected one line on stderr, got:\n{stderr}"
    assert lines[0].startswith("dsdm: error: ")
    for word in words:  # what went wrong and the fix
        assert word in lines[0], f"{name}: {word!r} missing from {lines[0]!r}"


def test_bad_inputs_exit_2_with_one_line(tmp_path):
    """Real processes: exit code 2 and a single stderr line even after torch/numpy are imported."""
    cases = {
        "dataset": (["evaluate", "--dataset", "imagenet", "--method", "random", "--ipc", "1"],
                    ["imagenet", "choose one of", "digits"]),
        "lambda": (["distill", "--out", "x.pt", "--lambda1", "-1"], ["lambda1", "non-negative"]),
        "set": (["distill", "--out", "x.pt", "--set", "foo.bar=1"], ["foo.bar", "valid keys", "distill.lambda1"]),
    }
    results = run_all({name: args for name, (args, _) in cases.items()}, tmp_path, env_for(tmp_path / "cache"))
    for name, (args, words) in cases.items():
        check_one_line(name, results[name].returncode, results[name].stderr, words)
        assert "Traceback" not in results[name].stdout
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("case", ["folder", "ipc", "corrupt"])
def test_bad_inputs_in_process(tmp_path, capsys, case):
    """The same contract through dsdm.cli.main (saves a ~3 s process start per case)."""
    from dsdm.cli import main

    corrupt = tmp_path / "corrupt.pt"  # a torn zip: torch's multi-line error must become one line
    corrupt.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    args, words = {
        "folder": (["evaluate", "--dataset", "mnist", "--data-root", str(tmp_path / "nope"), "--offline",
                    "--method", "random", "--ipc", "1"], ["nope", "--data-root", "without --offline"]),
        "ipc": (["evaluate", "--dataset", "digits", "--method", "random", "--ipc", "500"], ["ipc=500", "lower --ipc"]),
        "corrupt": (["evaluate", str(corrupt)], ["corrupt.pt", "not a readable", "python -m dsdm distill"]),
    }[case]
    code = main(args)
    captured = capsys.readouterr()
    check_one_line(case, code, captured.err, words)
    assert captured.out == ""


@pytest.mark.parametrize("method", ["dsdm", "herding"])
def test_zoo_of_another_dataset_refused(tmp_path, capsys, tiny_zoo, method):
    """`--zoo` of another dataset with the same shapes (e.g. MNIST's for FashionMNIST) must not run,
    for DSDM and for the coresets that select in the zoo's embedding."""
    import dataclasses

    from dsdm.cli import main

    folder = dataclasses.replace(tiny_zoo, dataset="fashionmnist").save(tmp_path / "zoo")
    code = main(["distill", "--dataset", "digits", "--method", method, "--zoo", str(folder), "--budget", "smoke",
                 "--ipc", "1", "--iterations", "1", "--pretrain-epochs", "2", "--out", str(tmp_path / "x.pt")])
    check_one_line("zoo", code, capsys.readouterr().err, ["fashionmnist", "digits", "--zoo"])
    assert not (tmp_path / "x.pt").exists()
