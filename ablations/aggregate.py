"""A sweep's trial table turned into its tables: per-network accuracies, paired units, one row per cell."""
from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from ablations.stats import mean_ci

if TYPE_CHECKING:
    from ablations.sweep import Cell

ACC = "convnet3"  # run_trial evaluates ConvNet-3; cross-arch sweeps add their own


def with_runs(trials, results):
    """Add each trial's per-network test accuracies (acc_run<i>/convnet3, in run order) and the
    time of its last report (Tune's `timestamp`) to the trial table."""
    runs, finished = {}, {}
    for r in results:
        m = r.metrics or {}
        runs[m.get("trial_id")] = [m[k] for k in sorted(m, key=_run_index) if k.startswith("acc_run") and k.endswith(f"/{ACC}")]
        finished[m.get("trial_id")] = m.get("timestamp")
    trials["test_runs"] = [runs.get(t, []) for t in trials["trial_id"]]
    trials["finished"] = [finished.get(t) for t in trials["trial_id"]]
    return trials


def unit_runs(cells: list[Cell], ids: dict[str, str], trials):
    """One row per (cell, seed, evaluation network) of finished trials: the paired units the
    statistics resample (unit 's<seed>r<run>' is the same networks' seeds in every cell)."""
    import pandas as pd

    rows = []
    for label, key in dict.fromkeys((c.label, c.key) for c in cells):
        done = trials[(trials["cell"] == ids[key]) & (trials["status"] == "DONE")]
        for _, t in done.iterrows():
            for run, acc in enumerate(t["test_runs"]):
                rows.append({"cell": label, "seed": int(t["seed"]), "run": run, "unit": f"s{int(t['seed'])}r{run}",
                             "test": float(acc), "trial_id": t["trial_id"], "session": t.get("session")})
    return pd.DataFrame(rows, columns=["cell", "seed", "run", "unit", "test", "trial_id", "session"])


def _run_index(key: str) -> int:
    match = re.match(r"acc_run(\d+)/", key)
    return int(match.group(1)) if match else -1


def aggregate(cells: list[Cell], ids: dict[str, str], trials, paper: dict[str, float], budget: str, wall: float):
    """One row per cell: test mean, sd, 95% CI over seeds x eval runs, val mean, paper, time, session."""
    import pandas as pd

    rows = []
    for cell in cells:
        done = trials[(trials["cell"] == ids[cell.key]) & (trials["status"] == "DONE")]
        tests = [a for runs in done["test_runs"] for a in runs]
        sessions = sorted({int(s) for s in done.get("session", []) if s is not None and s == s})
        ran = done[done["reused_from"] == ""] if "reused_from" in done else done  # this sweep's compute only
        rows.append({"group": cell.group, "cell": cell.label, "x": cell.x, "xscale": cell.xscale,
                     **mean_ci(tests), **summary(tests, "test"), **summary(list(done["val_acc"]), "val"),
                     "session": ",".join(map(str, sessions)), "reused": reused(done),
                     "paper": paper.get(cell.label), "trials": len(done),
                     "failed": int((trials["cell"] == ids[cell.key]).sum() - len(done)),
                     "trial_s": float(ran["seconds"].sum()), "distill_s": _total(ran, "distill_s"),
                     "eval_s": _total(ran, "eval_s"), "budget": budget, "wall_s": wall,
                     "overrides": json.dumps(cell.overrides, default=str)})
    return pd.DataFrame(rows)


def reused(done) -> str:
    """'s<seed> <- <sweep>/<trial>' for a cell's trials copied from an identical finished one."""
    if "reused_from" not in done:
        return ""
    return "; ".join(f"s{int(seed)} ← {src}" for seed, src in sorted(zip(done["seed"], done["reused_from"])) if src)


def _total(done, column: str) -> float:
    """Seconds summed over a cell's trials; NaN for tables written before the column existed."""
    return float(done[column].sum()) if column in done and len(done) else float("nan")


def summary(values: list[float], prefix: str) -> dict[str, float]:
    import statistics

    values = [float(v) for v in values if v is not None and v == v]
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if len(values) > 1 else (0.0 if values else float("nan"))
    return {f"{prefix}_mean": mean, f"{prefix}_std": std, f"{prefix}_n": len(values)}
