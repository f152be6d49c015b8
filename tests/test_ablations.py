"""Every sweep of `ablations/` at --budget smoke on digits, in one process and one Ray session.

Slow tests share a module-scoped Ray (2 CPUs), one storage folder whose smoke zoo the
`pretrain_epochs` sweep trains first (in the `dirs` fixture, so every sweep after it reuses
the zoo whatever order the tests run in) and tiny overrides; each checks its table has every
cell of its grid and that the plot exists. Each test passes alone and in any order: a sweep
two tests read runs once in a module-scoped fixture. The fast tests check grids and configs.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from ablations import (aggregate, cli, components, cross_arch, figures, lambdas, methods, model_count, pretrain_epochs,
                       speech, stats, sweep as sweeps)
from dsdm.config import make_config
from dsdm.errors import DsdmError

TINY = ["--set", "distill.iterations=2", "--set", "eval.epochs=1", "--set", "eval.runs=1"]
PAIRED = ["--seeds", "2", "--set", "eval.runs=2"]  # 2 seeds x 2 nets: 4 paired units per cell, CIs defined
STATS_COLUMNS = ["mean", "sd", "ci95_low", "ci95_high", "n"]


# --- fast: grids, configs, statistics ------------------------------------------------------------
def test_grids_shrink_to_the_budget_zoo():
    assert [c.x for c in pretrain_epochs.cells("paper")] == [1, 5, 10, 15, 20, 25, 30]
    assert [c.x for c in pretrain_epochs.cells("cpu")] == [1, 2]
    assert [c.x for c in model_count.cells("paper")] == [1, 5, 10, 20]
    assert [c.x for c in model_count.cells("smoke")] == [1, 2]
    assert all(c.overrides["distill.pretrain_epochs"] == 20 for c in model_count.cells("paper"))
    assert all(c.overrides["distill.num_models"] == 10 for c in pretrain_epochs.cells("paper"))
    assert len(lambdas.cells("cpu")) == 9 and len({c.key for c in lambdas.cells("cpu")}) == 8  # (50, 0.2) shared


def test_zoo_covers_budget_grid_and_every_cell():
    cfg, diffs = sweeps.sweep_configs("paper", {"data.dataset": "digits"}, pretrain_epochs.cells("paper"))
    assert cfg.zoo.num_models == 20 and cfg.zoo.snapshots == (1, 5, 10, 15, 20, 25, 30)
    cfg, _ = sweeps.sweep_configs("cpu", {"data.dataset": "digits"}, components.cells())
    assert (cfg.zoo.num_models, cfg.zoo.snapshots) == (4, (1, 2))  # = tune.search's cpu zoo: shared


def test_method_presets_reach_the_cells():
    cfg, diffs = sweeps.sweep_configs("cpu", {"data.dataset": "digits"}, methods.cells(["dm", "dsdm", "dsdm-nosd"]))
    dm = diffs[methods.cells(["dm"])[0].key]
    assert dm["distill.method"] == "dm" and dm["distill.pretrained"] is False and dm["distill.factor"] == 1
    assert "distill.iterations" not in dm  # the budget's iterations win over DM's 20K
    assert diffs[methods.cells(["dsdm"])[0].key] == {}
    assert diffs[methods.cells(["dsdm-nosd"])[0].key] == {"distill.lambda1": 0.0}
    with pytest.raises(DsdmError, match="unknown method"):
        methods.cells(["bogus"])


def test_summary_and_pooled_statistics():
    s = aggregate.summary([90.0, 92.0, None, float("nan")], "test")
    assert s == {"test_mean": 91.0, "test_std": pytest.approx(math.sqrt(2)), "test_n": 2}
    values = [80.0, 82.0, 90.0, 94.0, 95.0]
    parts = [(81.0, math.sqrt(2), 2), (93.0, math.sqrt(7), 3)]
    mean, std, n = cross_arch.pooled(parts)
    ref = pd.Series(values)
    assert (mean, n) == (pytest.approx(ref.mean()), 5) and std == pytest.approx(ref.std())


def test_resolve_budget_serves_both_sweeps_from_one_zoo():
    assert [c.x for c in pretrain_epochs.cells("resolve")] == [1, 2, 5, 10]
    assert [c.x for c in model_count.cells("resolve")] == [1, 2, 4, 8]
    assert all(c.overrides["distill.num_models"] == 8 for c in pretrain_epochs.cells("resolve"))
    assert all(c.overrides["distill.pretrain_epochs"] == 10 for c in model_count.cells("resolve"))
    zoos = {sweeps.sweep_configs("resolve", {"data.dataset": "fashionmnist"}, cells)[0].zoo
            for cells in (pretrain_epochs.cells("resolve"), model_count.cells("resolve"), components.cells(),
                          lambdas.comparison_cells(1.0, 0.5))}
    assert len(zoos) == 1 and zoos.pop().snapshots == (1, 2, 5, 10)
    cfg = make_config("resolve", {"data.dataset": "fashionmnist"})
    assert cfg.distill.iterations >= 1000 and cfg.distill.fast and cfg.eval.epochs >= 300
    seeds = cli.parse_seeds(cli.DEFAULT_SEEDS["resolve"])
    assert cfg.eval.protocol == "dsdm" and len(seeds) >= 2 and cfg.eval.runs * len(seeds) == 10  # nets per cell


def test_every_cell_gets_the_same_seeds():
    """The paired design: grid seed s is the distillation and evaluation seed of every cell."""
    assert sweeps.paired_seeds(3) == {"distill.seed": 3, "eval.seed": 3}
    parsed = []
    cli.cli(lambda a: parsed.append(a.seeds), cli.build_parser("x", "doc"), ["--budget", "resolve"])
    cli.cli(lambda a: parsed.append(a.seeds), cli.build_parser("x", "doc"), ["--budget", "cpu"])
    assert parsed == ["2", "1"]  # >= 2 distillation seeds by default where the statistics need them


def test_seeds_and_ipc_parsing():
    assert cli.parse_seeds("3") == [0, 1, 2]
    assert cli.parse_seeds("4,7") == [4, 7]
    assert cli.parse_ints("1,10", "--ipc") == [1, 10]
    with pytest.raises(DsdmError, match="integers"):
        cli.parse_ints("ten", "--ipc")


# --- slow: every sweep end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_two_cpus():
    import ray

    from tune.runner import start_ray

    start_ray(None, 2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, ray_two_cpus):
    """(storage, results) with the pretrain_epochs sweep done: it trained the smoke zoo."""
    root = tmp_path_factory.mktemp("ablations")
    out = root / "runs", root / "results"
    assert sweep(pretrain_epochs, out) == 0
    return out


@pytest.fixture(scope="module")
def components_run(dirs):
    """Table 4 at the smoke budget, paired (2 seeds x 2 nets), run once for the tests that read it."""
    assert sweep(components, dirs, *PAIRED) == 0
    return table(dirs, "components", "digits-ipc10")


def sweep(module, dirs, *extra: str) -> int:
    storage, results = dirs
    argv = ["--budget", "smoke", "--storage", str(storage), "--results", str(results), *TINY, *extra]
    if "--dataset" not in extra:
        argv += ["--dataset", "digits"]
    return module.main(argv)


def table(dirs, name: str, stem: str) -> pd.DataFrame:
    folder = dirs[1] / name
    assert (folder / f"{stem}.md").is_file() and (folder / f"{stem}.png").stat().st_size > 1000
    return pd.read_parquet(folder / f"{stem}.parquet")


def assert_every_cell(frame: pd.DataFrame, cells) -> None:
    assert list(frame["cell"]) == [c.label for c in cells]
    assert frame["test_mean"].between(0, 100).all(), frame
    assert (frame["test_n"] >= 1).all() and (frame["failed"] == 0).all()
    assert set(STATS_COLUMNS) <= set(frame.columns)
    assert frame["mean"].tolist() == pytest.approx(frame["test_mean"].tolist(), rel=1e-12)  # numpy vs fmean rounding
    assert (frame["session"] == "1").all() and (frame["protocol"] == "dsdm").all()


def assert_paired_statistics(dirs, name: str, frame: pd.DataFrame) -> list[str]:
    """Every cell has the same 4 units (2 seeds x 2 nets), a CI around its mean, and the
    Markdown ends with the verdict line; returns the Markdown's lines."""
    assert (frame["n"] == 4).all() and (frame["ci95_low"] <= frame["mean"]).all()
    assert (frame["mean"] <= frame["ci95_high"]).all()
    runs = pd.read_parquet(dirs[1] / name / "digits-ipc10-runs.parquet")
    units = runs.groupby("cell")["unit"].apply(lambda u: tuple(sorted(u)))
    assert set(units) == {("s0r0", "s0r1", "s1r0", "s1r1")} and len(units) == frame["cell"].nunique()
    assert frame["verdict"].isin(stats.VERDICTS).all() and frame["verdict"].nunique() == 1
    lines = (dirs[1] / name / "digits-ipc10.md").read_text().rstrip().splitlines()
    assert lines[-1].startswith(f"verdict: {frame['verdict'].iloc[0]} — ")
    assert lines[-1] == frame["verdict_line"].iloc[0]
    assert "95% CI of the mean" in "\n".join(lines) and "evaluation protocol `dsdm`" in lines[1]
    return lines



@pytest.mark.slow
def test_pretrain_epochs_smoke(dirs):
    frame = table(dirs, "pretrain_epochs", "digits-ipc10")  # the sweep the dirs fixture ran
    assert_every_cell(frame, pretrain_epochs.cells("smoke"))
    assert frame["paper"].tolist() == [72.9]  # Figure 5's E=1, beside ours
    md = (dirs[1] / "pretrain_epochs" / "digits-ipc10.md").read_text()
    assert "budget `smoke`" in md and "paper, CIFAR-10 IPC 50" in md and "wall time" in md
    assert "zoo M=2 x E=[1] (trained)" in md
    last = md.rstrip().splitlines()[-1]
    assert last == ("verdict: unresolved — one cell (E=1): no effect to estimate under this budget, whose grid has "
                    "a single value here.")


@pytest.mark.slow
def test_model_count_smoke_reuses_the_zoo(dirs):
    assert sweep(model_count, dirs, *PAIRED) == 0
    frame = table(dirs, "model_count", "digits-ipc10")
    assert_every_cell(frame, model_count.cells("smoke"))
    lines = assert_paired_statistics(dirs, "model_count", frame)
    assert "slope of test accuracy on ln(M)" in lines[-1] and "t(1) over 2 distillation seeds (per seed: " in lines[-1]
    assert "x 2 cells; over the 4 (seed, net) units alone" in lines[-1]
    acc, _ = stats.unit_matrix(pd.read_parquet(dirs[1] / "model_count" / "digits-ipc10-runs.parquet"), ["M=1", "M=2"])
    assert frame["effect"].iloc[0] == pytest.approx(stats.log_slope([1, 2], acc.mean(0)))  # slope of the cell means
    assert "(reused)" in "\n".join(lines)
    info = json.loads((dirs[0] / "model_count-digits-ipc10-smoke.zoo.json").read_text())
    assert info["trained"] is False


@pytest.mark.slow
def test_components_smoke(dirs, components_run):
    frame = components_run
    assert_every_cell(frame, components.cells())
    assert frame["paper"].tolist() == [60.6, 63.5, 66.2, 66.5]
    lines = assert_paired_statistics(dirs, "components", frame)
    assert frame["delta_verdict"].tolist()[0] == "" and frame["delta_verdict"].iloc[1:].isin(stats.VERDICTS).all()
    assert lines[-1].startswith(f"verdict: {frame['verdict'].iloc[0]} — + L_h (DSDM) minus proto, random nets: ")
    assert "each row vs the previous: + PM: " in lines[-1]
    runs = pd.read_parquet(dirs[1] / "components" / "digits-ipc10-runs.parquet")
    acc, _ = stats.unit_matrix(runs, frame["cell"].tolist())
    assert frame["delta"].iloc[1:].to_numpy() == pytest.approx((acc[:, 1:] - acc[:, :-1]).mean(0))  # paired
    # MLflow: every trial ran with distill.seed = eval.seed = its grid seed, each seed in every cell
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{dirs[0] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsdm-digits-ipc10")
    parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("dsdm.sweep") == "components"][0]
    trials = [r for r in client.search_runs([exp.experiment_id])
              if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    seeds = sorted((r.data.params["distill.seed"], r.data.params["eval.seed"]) for r in trials)
    assert seeds == [("0", "0")] * 4 + [("1", "1")] * 4


@pytest.mark.slow
def test_lambdas_smoke(dirs):
    assert sweep(lambdas, dirs) == 0
    frame = table(dirs, "lambdas", "digits-ipc10")
    assert_every_cell(frame, lambdas.cells("smoke"))
    shared = frame[frame["overrides"] == json.dumps({"distill.lambda1": 50.0, "distill.lambda2": 0.2})]
    assert len(shared) == 2 and shared["test_mean"].nunique() == 1  # one trial, shown in both panels


@pytest.mark.slow
def test_methods_smoke_two_ipcs_and_mlflow(dirs):
    names = list(methods.METHODS)
    # --fresh: the phase times below are this sweep's own (a cell copied from another sweep has none)
    assert sweep(methods, dirs, "--ipc", "1,2", "--methods", ",".join(names), "--fresh") == 0
    for ipc in (1, 2):
        frame = table(dirs, "methods", f"digits-ipc{ipc}")
        assert_every_cell(frame, methods.cells(names))
        # the phases add up to at most the trial time; coresets distil nothing worth a second
        assert (frame["distill_s"] + frame["eval_s"] <= frame["trial_s"] + 1).all() and (frame["eval_s"] > 0).all()
    assert "distil / eval (s)" in (dirs[1] / "methods" / "digits-ipc2.md").read_text()
    pivot = pd.read_parquet(dirs[1] / "methods" / "digits-ipc1-2.parquet")
    assert sorted(zip(pivot["row"], pivot["ipc"])) == sorted((m, i) for m in names for i in (1, 2))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{dirs[0] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsdm-digits-ipc1")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dsdm.sweep") == "methods"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(trials) == len(names)
    assert {r.data.params["distill.method"] for r in trials} == {"random", "herding", "kcenter", "dm", "dsdm"}


@pytest.mark.slow
def test_cross_arch_smoke(dirs):
    assert sweep(cross_arch, dirs, "--ipc", "2") == 0
    pivot = pd.read_parquet(dirs[1] / "cross_arch" / "digits-ipc2.parquet")
    assert list(pivot["row"]) == ["convnet3", "resnet10", "densenet121"]
    assert pivot["test_mean"].between(0, 100).all()


@pytest.mark.slow
def test_figures_smoke(dirs):
    assert sweep(figures, dirs, "--ipc", "2") == 0
    stem = dirs[1] / "figures" / "digits-ipc2"
    for suffix in ("-tsne", "-curve", "-grid-dm", "-grid-dsdm"):
        assert Path(f"{stem}{suffix}.png").stat().st_size > 1000, suffix


@pytest.mark.slow
def test_speech_smoke(dirs, shared_data):
    root = shared_data / "spoken_commands"
    if not root.is_dir():
        pytest.skip(f"spoken-commands stand-in not found at {root} (set DSDM_SHARED_DATA)")
    assert sweep(speech, dirs, "--dataset", "speechcommands", "--data-root", str(root), "--ipc", "2",
                 "--set", "zoo.max_per_class=10", "--set", "distill.batch_real=8") == 0
    frame = table(dirs, "speech", "speechcommands-ipc2")
    assert_every_cell(frame, methods.cells(speech.METHODS))
    assert "not comparable" in (dirs[1] / "speech" / "speechcommands-ipc2.md").read_text()


@pytest.mark.slow
def test_resume_finished_sweep_reruns_nothing(dirs, components_run, capsys):
    before = components_run
    capsys.readouterr()
    # --seeds asks fewer than the sweep ran: a resume never drops seeds, says so, and the table agrees
    assert sweep(components, dirs, "--seeds", "1", "--set", "eval.runs=2", "--resume") == 0
    assert "this sweep has seeds [0, 1]; --seeds [0] adds seeds to a started sweep but never drops any" in \
        capsys.readouterr().err
    after = table(dirs, "components", "digits-ipc10")
    assert after["test_mean"].tolist() == before["test_mean"].tolist()
    assert after["seeds"].iloc[0] == "0,1"
    assert after["session"].tolist() == ["1"] * 4  # every cell still credited to the first invocation
    ledger = json.loads((dirs[0] / "components-digits-ipc10-smoke.sessions.json").read_text())
    assert [s["session"] for s in ledger] == [1, 2] and "--resume" in ledger[1]["command"]
    assert sweep(components, dirs, *PAIRED) == 2  # without --resume: one line naming the fix


IPC3 = ["--ipc", "3", "--set", "eval.runs=2"]  # sweeps no other test reads


@pytest.fixture(scope="module")
def seeds_added(dirs):
    """model_count at IPC 3 started with seed 0, then resumed with --seeds 2: (runs before, runs after)."""
    assert sweep(model_count, dirs, *IPC3, "--seeds", "1") == 0
    before = pd.read_parquet(dirs[1] / "model_count" / "digits-ipc3-runs.parquet")
    assert sweep(model_count, dirs, *IPC3, "--seeds", "2", "--resume") == 0
    return before, pd.read_parquet(dirs[1] / "model_count" / "digits-ipc3-runs.parquet")


@pytest.mark.slow
def test_resume_with_more_seeds_adds_them_and_keeps_the_finished(dirs, seeds_added):
    """--resume --seeds N on a started sweep runs only the new seeds (a second Tune run, its own
    folder) and the table, runs and MLflow hold every seed once."""
    before, runs = seeds_added
    frame = table(dirs, "model_count", "digits-ipc3")
    assert frame["seeds"].iloc[0] == "0,1" and (frame["n"] == 4).all() and frame["session"].tolist() == ["1,2"] * 2
    kept = runs[runs["seed"] == 0].reset_index(drop=True)
    assert kept[["cell", "unit", "test", "trial_id"]].equals(before[["cell", "unit", "test", "trial_id"]])  # not re-run
    parts = json.loads((dirs[0] / "model_count-digits-ipc3-smoke.parts.json").read_text())
    assert parts == [{"folder": "model_count-digits-ipc3-smoke", "seeds": [0]},
                     {"folder": "model_count-digits-ipc3-smoke.seeds1", "seeds": [1]}]
    trials = pd.read_parquet(dirs[0] / "model_count-digits-ipc3-smoke" / "trials.parquet")
    assert sorted(zip(trials["seed"], trials["part"])) == [(0, parts[0]["folder"])] * 2 + [(1, parts[1]["folder"])] * 2
    client, exp = mlflow_experiment(dirs, "dsdm-digits-ipc3")
    parent, children = sweep_runs(client, exp, "model_count")
    assert parent.data.params["sweep.part2.seeds"] == "[1]"
    assert sorted(r.data.params["distill.seed"] for r in children) == ["0", "0", "1", "1"]
    assert {r.info.status for r in [parent, *children]} == {"FINISHED"}
    # resumed again with the seeds it has: nothing runs, nothing changes
    every = len(client.search_runs([exp]))
    assert sweep(model_count, dirs, *IPC3, "--seeds", "2", "--resume") == 0
    assert pd.read_parquet(dirs[1] / "model_count" / "digits-ipc3-runs.parquet").equals(runs)
    assert len(client.search_runs([exp])) == every


@pytest.mark.slow
def test_a_cell_another_sweep_finished_is_copied_and_equals_a_fresh_run(dirs, seeds_added):
    """E sweep's only smoke cell (E=1, M=2) is the M sweep's M=2 cell: its trials are copied from
    MLflow (tagged, said in the table), and a `--fresh` run of the same config computes the same bits."""
    _, m_runs = seeds_added
    m2 = m_runs[m_runs["cell"] == "M=2"].set_index("unit")["test"]
    assert sweep(pretrain_epochs, dirs, *IPC3, "--seeds", "2") == 0
    frame = table(dirs, "pretrain_epochs", "digits-ipc3")
    e_runs = pd.read_parquet(dirs[1] / "pretrain_epochs" / "digits-ipc3-runs.parquet").set_index("unit")["test"]
    assert e_runs.sort_index().tolist() == m2.sort_index().tolist()
    assert frame["reused"].iloc[0].startswith("s0 ← model_count-digits-ipc3-smoke/")
    assert "reused = trials whose exact config and seed" in (dirs[1] / "pretrain_epochs" / "digits-ipc3.md").read_text()
    client, exp = mlflow_experiment(dirs, "dsdm-digits-ipc3")
    _, m_children = sweep_runs(client, exp, "model_count")
    _, e_children = sweep_runs(client, exp, "pretrain_epochs")
    sources = {r.info.run_id: r for r in m_children}
    for run in e_children:
        source = sources[run.data.tags["dsdm.reused_from"]]
        assert run.data.params == source.data.params and run.info.status == "FINISHED"
        # the final metrics (not the distillation's per-iteration history, which stays with the source)
        assert run.data.metrics.items() <= source.data.metrics.items() and "acc_run1/convnet3" in run.data.metrics
    # the λ grid's (50, 0.2) is the same config again; --fresh computes it: bit-equal to the copy
    assert sweep(lambdas, dirs, *IPC3, "--seeds", "1", "--fresh") == 0
    fresh = pd.read_parquet(dirs[1] / "lambdas" / "digits-ipc3-runs.parquet")
    shared = fresh[fresh["cell"] == "λ1=50, λ2=0.2"].set_index("unit")["test"]
    assert shared.tolist() == m2[shared.index].tolist()
    assert (table(dirs, "lambdas", "digits-ipc3")["reused"] == "").all()


def mlflow_experiment(dirs, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{dirs[0] / 'mlflow.db'}")
    return client, client.get_experiment_by_name(name).experiment_id


def sweep_runs(client, experiment_id: str, name: str):
    """(the sweep's parent run, its trial runs)."""
    every = client.search_runs([experiment_id])
    parents = [r for r in every if r.data.tags.get("dsdm.sweep") == name]
    assert len(parents) == 1
    return parents[0], [r for r in every if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
