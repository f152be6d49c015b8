"""Records you can trust (issue 16): MLflow runs and trial tables stay right through a second
search on the same folder, two new searches on one store, a full disk, an interrupt in the zoo
phase, a search whose trials all fail, and odd values. Every fault fires at a NAMED point
(tune.faults.fault_point, DSDM_FAULT_*); the interrupt/resume chain is tests/test_faults.py.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import NAME, TINY, last_line, run_search, search_argv, search_env, seed_zoo, snapshot

pytestmark = pytest.mark.slow  # Ray and subprocess searches end to end

REPO = Path(__file__).resolve().parents[1]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr[-2000:]
    return lines[0]


# --- finding 3: one search per experiment folder ------------------------------------------------
def test_second_search_on_folder_exits_2_naming_the_holder(tmp_path, capsys):
    """Refused before Ray starts: run in process (the subprocess path is every other search here)."""
    from tune import search as tune_search

    storage = tmp_path / "storage"
    storage.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": "2026-12-01 10:00:00"}
    lock = storage / f"{NAME}.lock"
    lock.write_text(json.dumps(holder))  # this test process plays the running search
    assert tune_search.main(search_argv(storage)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"tune.search: error: '{storage / NAME}' is in use by another search "
                           f"(pid {os.getpid()} on {socket.gethostname()}, since 2026-12-01 10:00:00)"), line
    assert json.loads(lock.read_text()) == holder and sorted(p.name for p in storage.iterdir()) == [lock.name]


# --- findings 3 and 7: a stale lock is taken over; an interrupt in the zoo phase advises what works
@pytest.fixture(scope="module")
def zoo_interrupt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo_interrupt")
    storage = tmp / "storage"
    storage.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (storage / f"{NAME}.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    first = run_search(storage, tmp / "first", env=search_env(tmp / "f1", driver_zoo_done="0@SIGINT"))
    advice = last_line(first.stderr)
    extra = ["--resume"] if "with --resume" in advice else []
    again = run_search(storage, tmp / "again", *extra, env=search_env(tmp / "f2", driver_zoo_done="1@SIGINT"))
    return {"storage": storage, "dead": dead.pid, "first": first, "again": again, "advice": advice,
            "fired": [(tmp / f / "driver_zoo_done.fired").is_file() for f in ("f1", "f2")],
            "mlflow": snapshot(storage)}


def test_stale_lock_of_a_dead_process_is_taken_over(zoo_interrupt):
    first = zoo_interrupt["first"]
    taken = [line for line in first.stderr.splitlines() if "stale lock" in line]
    assert taken == [f"tune.search: taking over the stale lock '{zoo_interrupt['storage'] / NAME}.lock' of pid "
                     f"{zoo_interrupt['dead']} on {socket.gethostname()} (that process has ended)"], first.stderr[-2000:]
    assert not (zoo_interrupt["storage"] / f"{NAME}.lock").exists()  # released when the search stopped


def test_interrupt_in_zoo_phase_advises_the_command_that_works(zoo_interrupt):
    first, again = zoo_interrupt["first"], zoo_interrupt["again"]
    assert zoo_interrupt["fired"][0] and first.returncode == 130, first.stderr[-2000:]
    assert zoo_interrupt["advice"] == ("tune.search: interrupted (SIGINT); no trial was saved yet (finished zoo models are kept); "
                                       "rerun the same command without --resume")
    # following the advice gets past every check into the zoo phase again (not "nothing to resume", exit 2),
    # which keeps the model the first run finished and trains only the other (interrupted again after it)
    assert zoo_interrupt["fired"][1] and again.returncode == 130, again.stderr[-2000:]
    assert "zoo: 1/2 models finished by an earlier run, kept from " in again.stdout + again.stderr
    assert "zoo model 1/2 done" not in again.stdout + again.stderr and "zoo model 2/2 done" in again.stdout + again.stderr


def test_interrupt_in_zoo_phase_ends_parent_killed(zoo_interrupt):
    runs = zoo_interrupt["mlflow"]
    assert list(runs) == ["parent"] and runs["parent"]["status"] == "KILLED", runs


# --- finding 7 for the ablation sweeps: the advice after an interrupt is the command that works ---
def run_sweep_cli(storage: Path, log: Path, *extra: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ablations.pretrain_epochs", "--dataset", "digits", "--budget", "smoke",
           "--num-cpus", "1", "--storage", str(storage), "--results", str(storage.parent / "results"), *TINY, *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log.with_suffix(".err").write_text(proc.stderr)
    return proc


@pytest.fixture(scope="module")
def sweep_interrupts(tmp_path_factory):
    """An ablation sweep interrupted in its zoo phase, rerun as its advice says and interrupted again
    once its first trial logged its final metrics (the Tune phase), then rerun as that advice says."""
    tmp = tmp_path_factory.mktemp("sweep_interrupts")
    storage = tmp / "storage"
    out = {"zoo": run_sweep_cli(storage, tmp / "zoo", env=search_env(tmp / "f1", driver_zoo_done="0@SIGINT"))}
    out["mlflow_zoo"] = snapshot(storage)
    advised = ["--resume"] if "with --resume" in last_line(out["zoo"].stderr) else []
    out["tune"] = run_sweep_cli(storage, tmp / "tune", *advised,
                                env=search_env(tmp / "f2", trial_final_logged="0@SIGINT"))  # grid trials count from 0
    advised = ["--resume"] if "with --resume" in last_line(out["tune"].stderr) else []
    out["last"] = run_sweep_cli(storage, tmp / "last", *advised, env=search_env())
    out["mlflow_last"] = snapshot(storage)
    out["fired"] = [(tmp / f / name).is_file() for f, name in (("f1", "driver_zoo_done.fired"),
                                                                ("f2", "trial_final_logged.fired"))]
    return out


def test_sweep_interrupted_in_any_phase_advises_the_command_that_works(sweep_interrupts):
    zoo, tune_phase, last = sweep_interrupts["zoo"], sweep_interrupts["tune"], sweep_interrupts["last"]
    assert sweep_interrupts["fired"] == [True, True]
    assert zoo.returncode == 130 and last_line(zoo.stderr) == (
        "python -m ablations.pretrain_epochs: interrupted (SIGINT); no trial was saved yet (finished zoo models are kept); rerun the same "
        "command with --resume (it starts the grid again)"), zoo.stderr[-2000:]
    assert tune_phase.returncode == 130 and last_line(tune_phase.stderr) == (
        "python -m ablations.pretrain_epochs: interrupted (SIGINT); finished trials are saved, rerun the same command "
        "with --resume to finish the others"), tune_phase.stderr[-2000:]
    assert last.returncode == 0, last.stderr[-2000:]


def test_sweep_interrupted_runs_end_killed_then_finished(sweep_interrupts):
    assert {k: r["status"] for k, r in sweep_interrupts["mlflow_zoo"].items()} == {"parent": "KILLED"}
    runs = sweep_interrupts["mlflow_last"]
    assert {r["status"] for r in runs.values()} == {"FINISHED"} and len(runs) == 2, runs
    (trial,) = [t for t in runs if t != "parent"]
    assert runs[trial]["counts"]["test_acc"] == 1 and runs[trial]["parent"] == runs["parent"]["run_id"]


# --- finding 5: a full disk ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def disk_full(tmp_path_factory, smoke_zoo):
    tmp = tmp_path_factory.mktemp("disk_full")
    storage = tmp / "storage"
    seed_zoo(storage, smoke_zoo)
    full = run_search(storage, tmp / "full", env=search_env(tmp / "f", tables_enospc="write@enospc"), samples=1)
    state = {"storage": storage, "full": full, "tmp_files": sorted(str(p) for p in storage.rglob("*.tmp")),
             "mlflow_full": snapshot(storage)}
    state["resumed"] = run_search(storage, tmp / "resumed", "--resume", samples=1)
    state["mlflow_resumed"] = snapshot(storage)
    return state


def test_disk_full_one_line_exit_2_no_partial_files(disk_full):
    full = disk_full["full"]
    assert full.returncode == 2, full.stderr[-2000:]
    table = disk_full["storage"] / NAME / "trials.md"
    assert last_line(full.stderr).startswith(f"tune.search: error: no space left on device writing '{table}' ("), \
        full.stderr[-2000:]
    assert last_line(full.stderr).endswith("then rerun the same command with --resume")
    assert disk_full["tmp_files"] == []


def test_disk_full_marks_parent_failed_and_resume_finishes(disk_full):
    runs = disk_full["mlflow_full"]
    assert runs["parent"]["status"] == "FAILED" and "RUNNING" not in {r["status"] for r in runs.values()}, runs
    resumed = disk_full["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    table = pq.read_table(disk_full["storage"] / NAME / "trials.parquet").to_pandas()
    assert list(table["status"]) == ["DONE"]
    after = disk_full["mlflow_resumed"]
    assert after["parent"]["status"] == "FINISHED" and after["parent"]["run_id"] == runs["parent"]["run_id"]
    (trial,) = [t for t in after if t != "parent"]
    assert after[trial]["counts"]["test_acc"] == 1 and after[trial]["parent"] == after["parent"]["run_id"]


def test_disk_full_in_a_trial_stops_the_search_at_once_with_a_short_stderr(tmp_path, smoke_zoo):
    """The first trial error that names a full disk stops Tune (no retries, no tracebacks): Tune's
    and MLflow's repeats of it are dropped, the one line ends stderr, the runs end FAILED."""
    storage = tmp_path / "storage"
    seed_zoo(storage, smoke_zoo)
    proc = run_search(storage, tmp_path / "enospc", samples=1, env=search_env(tmp_path / "f", trial_start="1@enospc"))
    assert proc.returncode == 2, proc.stderr[-3000:]  # the old code retried the trial (--max-failures 2): exit 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"tune.search: error: no space left on device writing '{storage.resolve()}' ("), lines
    assert "Traceback" not in proc.stderr and len(lines) <= 8, proc.stderr[-3000:]  # Ray/MLflow start-up lines + 1
    runs = snapshot(storage)
    assert {r["status"] for r in runs.values()} == {"FAILED"} and len(runs) == 2, runs
    assert not (storage / f".{NAME}.reserve").exists()


def small_disk_prefix() -> list[str] | None:
    """`unshare -m` (root) or `unshare -r -m`: a private mount namespace where a small tmpfs can be
    mounted for one shell script and vanishes with it; None where neither works."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
        probe = subprocess.run([*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"],
                               capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


FULL_DISK_SCRIPT = """
set -u
mount -t tmpfs -o size=12m tmpfs "$STORAGE"
mkdir "$STORAGE/zoos" && cp -a "$SEED_ZOO" "$STORAGE/zoos/"
"$@" > "$OUT/full.out" 2> "$OUT/full.err"; echo $? > "$OUT/full.rc"
ls -a "$STORAGE" > "$OUT/full.ls"; cp -a "$STORAGE" "$OUT/after_full"
rm "$DSDM_FAULT_FILL"
unset DSDM_FAULT_TRIAL_EXIT_AT
"$@" --resume > "$OUT/resumed.out" 2> "$OUT/resumed.err"; echo $? > "$OUT/resumed.rc"
cp -a "$STORAGE" "$OUT/after_resume"
"""


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory, smoke_zoo):
    """A search on a 12 MB tmpfs (its own mount namespace, the session's smoke zoo copied onto it) that
    the fault `fill` fills after trial 1's iteration 3, MLflow's sqlite file included; then the fill is
    deleted and the search resumed."""
    prefix = small_disk_prefix()
    if prefix is None:
        pytest.skip("no mount namespace for a small tmpfs (needs root or unprivileged user namespaces)")
    tmp = tmp_path_factory.mktemp("small_disk")
    storage, faults = tmp / "storage", tmp / "f"
    storage.mkdir()
    env = search_env(faults, trial_exit_at="3@fill")
    env.update(DSDM_FAULT_FILL=str(storage / "fill"), STORAGE=str(storage), OUT=str(tmp), SEED_ZOO=str(smoke_zoo))
    cmd = [sys.executable, "-m", "tune.search", *search_argv(storage, samples=1)]
    subprocess.run([*prefix, "sh", "-c", FULL_DISK_SCRIPT, "sh", *cmd], cwd=REPO, env=env, timeout=900, check=True)
    read = lambda name: (tmp / name).read_text()  # noqa: E731
    return {"storage": storage, "fired": (faults / "trial_exit_at.fired").is_file(),
            "full": (int(read("full.rc")), read("full.err")), "listing": read("full.ls").split(),
            "resumed": (int(read("resumed.rc")), read("resumed.err")),
            "mlflow_full": snapshot(tmp / "after_full"), "mlflow_resumed": snapshot(tmp / "after_resume")}


def test_disk_filling_mid_search_gives_a_short_stderr(small_disk):
    rc, err = small_disk["full"]
    assert small_disk["fired"] and rc == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("tune.search: error: no space left on device writing '"), err[-3000:]
    assert lines[-1].endswith("then rerun the same command with --resume")
    assert "Traceback" not in err and len(lines) <= 10, err[-3000:]  # the old code: hundreds of lines


def test_disk_full_with_mlflow_on_it_marks_runs_failed_and_resume_finishes(small_disk):
    runs = small_disk["mlflow_full"]  # the reserve made room for MLflow's sqlite file to end the runs
    assert {r["status"] for r in runs.values()} == {"FAILED"} and len(runs) == 2, runs
    assert f".{NAME}.reserve" not in small_disk["listing"]
    rc, err = small_disk["resumed"]
    assert rc == 0, err[-3000:]
    after = small_disk["mlflow_resumed"]
    assert after["parent"]["status"] == "FINISHED" and after["parent"]["run_id"] == runs["parent"]["run_id"]
    (trial,) = [t for t in after if t != "parent"]
    assert after[trial]["status"] == "FINISHED" and after[trial]["counts"]["test_acc"] == 1


# --- finding 11: a search with no trial DONE ------------------------------------------------------
def test_search_without_a_finished_trial_exits_2_quoting_its_error(tmp_path, smoke_zoo):
    storage = tmp_path / "storage"
    seed_zoo(storage, smoke_zoo)
    proc = run_search(storage, tmp_path / "failing", "--max-failures", "0", samples=1,
                      env=search_env(tmp_path / "f", trial_start="1@raise"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr).startswith("tune.search: error: no trial finished; the first trial's error: "
                                             "RuntimeError: fault injected at trial_start=1"), proc.stderr[-2000:]
    runs = snapshot(storage)
    assert {k: r["status"] for k, r in runs.items() if k == "parent"} == {"parent": "FAILED"}
    assert {r["status"] for k, r in runs.items() if k != "parent"} == {"FAILED"}


