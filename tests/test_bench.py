"""The distillation benchmark (benchmarks/distill.py, outside the installed package): it runs,
prints, writes JSON, touches docs only with --write-docs; its levers are config values; and
`python -m dsdm.bench` forwards to it, or says in one line that it cannot."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.distill import LEVERS, SHAPES, bench_config
from benchmarks.docs import replace_section
from dsdm.config import DistillConfig

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = ["--iterations", "1", "--ipc", "1", "--small"]


def _run(args, cwd=REPO, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_bench_small_prints_and_writes_json_not_docs(tmp_path):
    out, doc = tmp_path / "b.json", tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n")
    proc = _run(["-m", "benchmarks.distill", *SMALL_RUN, "--json", str(out), "--out", str(doc)])
    assert proc.returncode == 0, proc.stderr
    assert "| 1 | fast |" in proc.stdout and doc.read_text() == "# Benchmarks\n\nhand-written text\n"
    data = json.loads(out.read_text())
    assert set(data) == {"ipc1"} and set(data["ipc1"]) == {"fast", "straightforward"}
    for path, r in data["ipc1"].items():
        assert r["path"] == path and r["ipc"] == 1 and r["s_per_iter"] > 0 and r["images_per_s"] > 0
        assert len(r["s_per_iter_all"]) == 1 and r["peak_rss_mb"] > 0
    assert data["ipc1"]["fast"]["cache"]["fills_while_timed"] == 0, "steady state: no cache fill was timed"


def test_bench_write_docs_replaces_its_section(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n")
    proc = _run(["-m", "dsdm.bench", *SMALL_RUN, "--write-docs", "--out", str(doc)])  # through the forwarder
    assert proc.returncode == 0, proc.stderr
    text = doc.read_text()
    assert "hand-written text" in text and "<!-- bench:start -->" in text and "| 1 | fast |" in text
    replace_section(doc, ("<!-- bench:start -->", "<!-- bench:end -->"), "new body", "ignored")
    text = doc.read_text()
    assert text.count("<!-- bench:start -->") == 1 and "new body" in text and "| 1 | fast |" not in text
    assert "hand-written text" in text


def test_dsdm_bench_without_the_benchmarks_says_so_in_one_line(tmp_path):
    """Installed without the repository (a copy of dsdm alone): one line naming the fix, exit 2."""
    shutil.copytree(REPO / "dsdm", tmp_path / "site" / "dsdm", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}
    proc = _run(["-m", "dsdm.bench", "--help"], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "benchmarks.distill" in proc.stderr and "checkout" in proc.stderr


def test_levers_are_config_values():
    """Every lever row is a set of distill.* settings: no module globals or methods are swapped."""
    keys = {f.name for f in __import__("dataclasses").fields(DistillConfig)}
    for name, _, opts in LEVERS:
        assert set(opts) <= keys, name
        cfg = bench_config(SHAPES["small"], 1, True, 1, 1, opts)
        assert all(getattr(cfg.distill, k) == v for k, v in opts.items()), name


@pytest.mark.parametrize("levers", [["--levers"]], ids=["levers"])
def test_bench_levers_run(tmp_path, levers):
    out = tmp_path / "levers.json"
    proc = _run(["-m", "benchmarks.distill", *SMALL_RUN, *levers, "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["levers"]) == {name for name, _, _ in LEVERS}
    assert all(r["s_per_iter"] > 0 for r in data["levers"].values())


def test_train_bench_short_form_writes_the_issue_json(tmp_path):
    """`python -m dsdm.bench --train` dispatches to benchmarks/train.py; tiny sizes, same JSON keys."""
    out, doc = tmp_path / "t.json", tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nhand-written text\n")
    proc = subprocess.run([sys.executable, "-m", "dsdm.bench", "--train", "--epochs", "1", "--eval-nets", "1",
                           "--eval-images", "20", "--zoo-nets", "1", "--zoo-per-class", "2", "--batched-images", "8",
                           "--batched-ns", "1,2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    t = json.loads(out.read_text())["train"]
    for key, nets in (("eval_convnet3", 1), ("zoo_convnet3", 1)):
        r = t[key]
        assert r["nets"] == nets and r["baseline_ips"] > 0 and r["fast_ips"] > 0
        assert r["ratio"] == pytest.approx(r["fast_ips"] / r["baseline_ips"])
    assert set(t["batched"]) == {"1", "2"} and all(r["ratio"] > 0 for r in t["batched"].values())
    assert "| eval_convnet3 | 1 |" in proc.stdout
    assert doc.read_text() == "# Benchmarks\n\nhand-written text\n", "docs are written only with --write-docs"
    from benchmarks.train import MARK

    replace_section(doc, MARK, "body", "Classifier training")
    replace_section(doc, MARK, "new body", "Classifier training")
    text = doc.read_text()
    assert text.count(MARK[0]) == 1 and "new body" in text and "hand-written text" in text


@pytest.mark.slow
def test_train_bench_bf16_rows(tmp_path):
    """--bf16 adds the eval workload in bf16 (eager, channels_last, compiled). 64 images: one batch
    shape, so one graph to compile (a smaller last batch would compile a second)."""
    from benchmarks.train import BF16

    out = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "dsdm.bench", "--train", "--bf16", "--epochs", "1", "--eval-nets", "1",
                           "--eval-images", "64", "--zoo-nets", "1", "--zoo-per-class", "2", "--batched-ns", "",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    b = json.loads(out.read_text())["train"]["eval_convnet3_bf16"]
    assert set(b["ips"]) == set(BF16) and all(v > 0 for v in b["ips"].values())
    assert b["ratio"]["baseline"] == 1.0 and set(b["compile_s"]) == {"bf16_compiled"}
    assert "| bf16_compiled (compile " in proc.stdout


def test_train_equivalence_compares_the_paths_asked_for(tmp_path):
    from benchmarks.train_equivalence import main

    for bad in ("fast", "fast,turbo"):
        with pytest.raises(SystemExit):
            main(["--paths", bad])
    out = tmp_path / "eq.json"
    assert main(["--dataset", "digits", "--arch", "resnet10", "--paths", "fast,fast-bf16", "--epochs", "1",
                 "--nets", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["dataset"], r["arch"], r["images"]) == ("digits", "resnet10", 400)
    assert set(r["test"]) == {"fast", "fast-bf16"} and all(0 < v[0] <= 100 for v in r["test"].values())
    assert set(r["max_abs_diff"]) == {"fast-bf16"}


def test_eval_cell_prints_todays_and_the_new_cell_time_with_the_ratio(tmp_path):
    """`python -m dsdm.bench --eval-cell`: both paths in one run, the ratio under a key with 'cell';
    without data or a distilled set it uses random pixels and a noise set of the cell's shape."""
    out = tmp_path / "cell.json"
    proc = _run(["-m", "dsdm.bench", "--eval-cell", "--cells", "resolve-fashionmnist-ipc1", "--nets", "2", "--epochs", "1",
                 "--score-images", "40", "--data-root", str(tmp_path / "none"), "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    c = json.loads(out.read_text())["eval_cell"]["resolve-fashionmnist-ipc1"]
    assert (c["nets"], c["epochs"], c["budget_epochs"], c["train_images"]) == (2, 1, 300, 40) and c["random_pixels"]
    for path in ("today", "new"):
        r = c[path]
        assert r["cell_s"] > 0 and r["train_s"] > 0 and r["score_s"] > 0 and len(r["test_runs"]) == 2
        assert "peak_rss_mb" in r["memory"]
    assert c["new"]["cell_speedup"] == pytest.approx(c["today"]["cell_s"] / c["new"]["cell_s"])
    assert c["new"]["accuracies_equal_today"], "joint scoring reports today's accuracies"
    assert "| resolve-fashionmnist-ipc1 (random pixels) | 2 x 1 | 1 | new |" in proc.stdout


def test_convrate_quick_prints_the_three_tables(tmp_path):
    out = tmp_path / "rate.json"
    proc = _run(["-m", "dsdm.bench", "--convrate", "--quick", "--json", str(out)])
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())["convrate"]
    assert r["flops_forward"] == pytest.approx(96.7e6, rel=0.01)  # ConvNet-3 at 28x28: 2.4 + 75.5 + 18.9 MFLOP
    assert r["conv"][0]["forward_gflops"] > 0 and {n["kind"] for n in r["net"]} == {"inference", "train_step"}
    assert len(r["loops"]) == 4 and all(0 < c["fraction"] for c in r["loops"])
    assert all(t in proc.stdout for t in ("A. The convolutions alone", "B. The whole ConvNet-3", "C. The project's loops"))
