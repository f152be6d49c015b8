"""tune/faults.py's actions that let something outside act at a named point: `await` and `SIGKILL`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_await_waits_until_released(tmp_path, monkeypatch):
    from tune.faults import fault_point

    monkeypatch.setenv("DSDM_FAULT_DIR", str(tmp_path))
    monkeypatch.setenv("DSDM_FAULT_TRIAL_EXIT_AT", "2@await")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (fault_point("trial_exit_at", 2, node="n1"), done.set()))
    worker.start()
    fired = tmp_path / "trial_exit_at.fired"
    while not fired.exists() or not fired.read_text():
        assert worker.is_alive()
        time.sleep(0.01)
    assert not done.wait(0.5)  # still held at the point
    assert json.loads(fired.read_text())["node"] == "n1"
    (tmp_path / "trial_exit_at.released").touch()
    worker.join(timeout=10)
    assert done.is_set()
    fault_point("trial_exit_at", 2)  # fires once per DSDM_FAULT_DIR: a second process goes on at once


def test_sigkill_kills_the_driver(tmp_path):
    env = {**os.environ, "DSDM_FAULT_DIR": str(tmp_path), "DSDM_FAULT_DRIVER_CHECKPOINT": "1:2@SIGKILL",
           "PYTHONPATH": str(REPO)}
    code = "from tune.faults import fault_point; fault_point('driver_checkpoint', '1:2'); print('survived')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "survived" not in proc.stdout
    assert (tmp_path / "driver_checkpoint.fired").exists()
