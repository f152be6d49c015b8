"""One loop: `python -m dsdm distill` and the Tune trainable both run `Distiller.run`, so they report
the same loss averages over the same windows; the trainable keeps Tune's report semantics (every
report step reports, checkpoint steps with a checkpoint, `val_acc` the latest proxy or NaN, the
named fault point after every iteration). Tune, Ray and MLflow are stubbed: no cluster."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from dsdm import cli
from dsdm.distill import Distiller
from dsdm.io import safe_torch_load

tr = pytest.importorskip("tune.trainable")

SETS = {"distill.num_models": 2, "distill.pretrain_epochs": 2, "distill.ipc": 1, "distill.batch_real": 8,
        "distill.aug_pool": 2, "distill.warmup": 2, "distill.iterations": 7, "distill.log_every": 2,
        "distill.checkpoint_every": 3}


def _cli_run(tiny_zoo, tmp_path, monkeypatch):
    """Run the CLI; return its Distiller's config and what its loop logged."""
    zoo_dir = tmp_path / "zoo"
    tiny_zoo.save(zoo_dir)
    logged, seen = [], {}
    real_run = Distiller.run

    def spy(self, checkpoint=None, log=None, hooks=None):
        seen["cfg"] = self.cfg

        def record(metrics, step):
            logged.append((step, metrics))
            log(metrics, step)
        return real_run(self, checkpoint, record, hooks)

    monkeypatch.setattr(Distiller, "run", spy)
    argv = ["distill", "--dataset", "digits", "--budget", "smoke", "--zoo", str(zoo_dir), "--out", str(tmp_path / "s.pt")]
    for key, value in SETS.items():
        argv += ["--set", f"{key}={value}"]
    assert cli.main(argv) == 0
    monkeypatch.setattr(Distiller, "run", real_run)
    return seen["cfg"], logged


def _stub_tune(monkeypatch, reports, faults, tracked):
    monkeypatch.setattr(tr.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tr.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(tr.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node0"))

    def report(metrics, checkpoint=None):
        state = None
        if checkpoint is not None:  # read it now: the folder is temporary
            state = safe_torch_load(Path(checkpoint) / tr.CHECKPOINT_FILE, expect="dsdm-distill-checkpoint",
                                    what="checkpoint", fix="-")["state"]["iteration"]
        reports.append((dict(metrics), state))

    monkeypatch.setattr(tr.tune, "report", report)
    monkeypatch.setattr(tr.tune.Checkpoint, "from_directory", staticmethod(lambda folder: folder))
    monkeypatch.setattr(tr, "fault_point", lambda name, it, **ctx: faults.append((name, it, ctx)))


def test_cli_and_trainable_report_the_same_windows(digits, tiny_zoo, tmp_path, monkeypatch):
    cfg, cli_logs = _cli_run(tiny_zoo, tmp_path, monkeypatch)
    reports, faults, tracked = [], [], []
    _stub_tune(monkeypatch, reports, faults, tracked)
    proxies = []
    monkeypatch.setattr(tr, "proxy_accuracy", lambda dist, c, epochs, device: proxies.append(dist.iteration) or 40.0)
    run = SimpleNamespace(log_metrics=lambda metrics, step: tracked.append((step, metrics)), last_step=lambda key: -1)
    options = tr.TrialOptions(recorder=None, parent_id="p", proxy_every=4, proxy_epochs=1)
    distiller, resumed_from = tr.distill_with_checkpoints(cfg, digits, tiny_zoo, "cpu", run, options)
    assert resumed_from == 0 and distiller.iteration == 7
    steps = [2, 3, 4, 6, 7]  # multiples of log_every=2 or checkpoint_every=3, and the last
    assert [s for s, _ in cli_logs] == steps
    assert [m["iteration"] for m, _ in reports] == steps and [s for s, _ in tracked] == steps
    for (_, cli_metrics), (tune_metrics, _), (_, mlflow) in zip(cli_logs, reports, tracked):
        losses = {k: v for k, v in cli_metrics.items() if k.startswith("loss/")}
        assert len(losses) == 4 and {k: tune_metrics[k] for k in losses} == losses
        assert {k: mlflow[k] for k in losses} == losses and "node" not in mlflow
    assert [ckpt for _, ckpt in reports] == [None, 3, None, 6, 7], "checkpoint steps report with the state"
    assert proxies == [4]
    objective = [m[tr.METRIC] for m, _ in reports]
    assert all(math.isnan(v) for v in objective[:2]) and objective[2:] == [40.0] * 3
    assert reports[2][0]["proxy_val_acc"] == 40.0 and "proxy_val_acc" not in reports[3][0]
    assert [(name, it) for name, it, _ in faults] == [("trial_exit_at", i) for i in range(1, 8)]
    assert faults[0][2] == {"trial": "t0", "resumed_from": 0, "node": "node0"}  # node: a fault can target one
    assert all(m["node"] == "node0" and m["resumed_from"] == 0 for m, _ in reports)
