"""ablations/fidelity.py: the three-arm measurement's statistics, and the sweep end to end at
--budget smoke (one zoo, three arms, paired units, arms table with CIs, verdicts, s/iteration)."""
from __future__ import annotations


import pandas as pd
import pytest

from ablations import fidelity


def test_cells_and_measurement_defaults():
    arms = fidelity.cells(4)
    assert [c.label for c in arms] == ["reference", "fast, R=0", "fast, R=4"]
    assert arms[0].overrides == {"distill.fast": False} and arms[2].overrides["distill.aug_refresh"] == 4
    assert fidelity.measurement_sets("cpu") == ["distill.iterations=1000", "eval.runs=10"]
    assert fidelity.measurement_sets("paper") == ["distill.iterations=10000", "eval.runs=10"]
    assert fidelity.measurement_sets("smoke") == []
    assert fidelity.main(["--refresh", "0", "--budget", "smoke"]) == 2


def test_paired_table():
    acc = {"reference": {(0, 0): 80.0, (0, 1): 82.0, (1, 0): 81.0, (1, 1): 83.0},
           "fast, R=0": {(0, 0): 79.0, (0, 1): 81.0, (1, 0): 80.0, (1, 1): 82.1},
           "fast, R=4": {(0, 0): 80.1, (0, 1): 81.9, (1, 0): 81.0, (1, 1): 83.0}}
    text = fidelity.arms_table(acc, {k: 0.5 for k in acc})
    assert "| fast, R=0 minus reference | -0.98 | -1.05 to -0.90 | 4 |" in text and "fast, R=0: worse" in text
    assert "fast, R=4: no difference detected" in text and "seed 1 82.00" in text


def test_units_and_rates_from_a_trial_table():
    trials = pd.DataFrame({"cell": ["a", "b", "b"], "seed": [0, 0, 1], "status": ["DONE", "DONE", "ERROR"],
                           "test_runs": [[90.0, 91.0], [89.0, 92.0], []], "distill_s": [10.0, 30.0, 1.0],
                           "iteration": [10, 10, 3], "resumed_from": [0, 5, 0]})
    acc = fidelity.unit_accuracies(trials, {"a": "A", "b": "B"})
    assert acc == {"A": {(0, 0): 90.0, (0, 1): 91.0}, "B": {(0, 0): 89.0, (0, 1): 92.0}}
    assert fidelity.seconds_per_iteration(trials, {"a": "A", "b": "B"}) == {"A": 1.0, "B": 6.0}


@pytest.mark.slow
def test_fidelity_smoke_end_to_end(tmp_path):
    import ray

    from tune.runner import start_ray

    start_ray(None, 2)
    try:
        code = fidelity.main(["--dataset", "digits", "--ipc", "1", "--budget", "smoke", "--seeds", "1",
                              "--refresh", "1", "--storage", str(tmp_path / "runs"), "--results", str(tmp_path / "res"),
                              "--set", "distill.iterations=3", "--set", "eval.epochs=1", "--set", "eval.runs=2"])
    finally:
        ray.shutdown()
    assert code == 0
    text = (tmp_path / "res" / "fidelity" / "digits-ipc1-arms.md").read_text()
    for arm in ("reference", "fast, R=0", "fast, R=1"):
        assert f"| {arm} |" in text
    assert "| fast, R=1 minus fast, R=0 |" in text and "| 2 |" in text  # 1 seed x 2 paired networks
    assert "budget `smoke`" in text and "dsdm protocol" in text
