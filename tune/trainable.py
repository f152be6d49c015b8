"""One Tune trial: DSDM distillation with the trial's config, then ConvNet-3 evaluation.

A plain function of (config, large objects passed once through `tune.with_parameters`).
The distiller's full state is checkpointed through Tune every `checkpoint_every`
iterations, so a retried trial continues from its last iteration, not from 0; every report
carries `resumed_from` (the iteration this attempt started at) and `node` (where it ran).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from dsdm import zoo as dsdm_zoo
from dsdm.config import Config
from dsdm.coreset import SELECTORS, select_coreset
from dsdm.distill import Distiller, RunHooks
from dsdm.evaluate import evaluate_set
from dsdm.synthetic import SyntheticSet
from dsdm.train import resolve_device
from dsdm.visualize import save_grid
from tune import tracking
from tune.zoo import ZooRefs, dataset_from_store, fault_point

CHECKPOINT_FILE = "distill.ckpt"
SET_FILE = "distilled.pt"
GRID_FILE = "grid.png"
METRIC = "val_acc"  # the objective: ConvNet-3 accuracy on the held-out validation split


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    return Config.from_flat(base).override(sampled).validate()


def proxy_accuracy(distiller: Distiller, cfg: Config, epochs: int, device) -> float:
    """Cheap ASHA signal: one ConvNet-3 trained briefly on the current set, validation accuracy."""
    short = replace(cfg.eval, archs=("convnet3",), runs=1, epochs=epochs)
    return evaluate_set(distiller.synthetic_set(), distiller.dataset, short, device)["convnet3"]["val_mean"]


def run_trial(config: dict[str, Any], *, base: dict[str, Any], data: list, zoo: ZooRefs | None,
              options: dict[str, Any]) -> None:
    """`data` is [ObjectRef of the dataset payload] (a list so it is not resolved twice)."""
    torch.set_num_threads(max(1, int(options.get("threads", 1))))
    cfg = trial_config(base, config)
    d = cfg.distill
    device = resolve_device("cuda" if options.get("gpus", 0) > 0 else "cpu")
    dataset = dataset_from_store(ray.get(data[0]))
    pretrain_calls_before = dsdm_zoo.PRETRAIN_CALLS

    trial_id = tune.get_context().get_trial_id()
    uri = options["mlflow_uri"]
    tracking.quiet_mlflow()
    run_id, final = tracking.trial_run(uri, options["experiment_id"], options["search_id"], trial_id,
                                       options["parent_run_id"])
    if final is not None:  # evaluated and logged before an interrupt or crash; Tune never saved it
        tracking.finish(uri, run_id)  # it may have been closed as KILLED or FAILED meanwhile
        return report_logged_final(uri, run_id, final)
    try:
        fault_point("trial_start", trial_number(), trial=trial_id)
        compute = f"{device.type} x{torch.get_num_threads()}"
        twin = (tracking.finished_twin(uri, options["experiment_id"], cfg.plain(), compute, options["search_id"])
                if options.get("reuse") else None)
        if twin is not None:
            return report_twin(uri, run_id, twin, cfg)
        tracking.log_params(uri, run_id, cfg.plain())
        tracking.set_tags(uri, run_id, {tracking.COMPUTE_TAG: compute})
        start = time.time()
        if d.method in SELECTORS:  # coreset baselines: real images picked in a zoo model's embedding
            net = zoo.materialise(1, d.pretrain_epochs).model(0, d.pretrain_epochs, device) if d.method != "random" else None
            distiller, resumed_from = None, 0
            synset = select_coreset(d.method, dataset, d.ipc, d.seed, net, cfg.plain())
        else:
            distiller, resumed_from = distill_with_checkpoints(cfg, dataset, zoo, device, uri, run_id, options)
            synset = distiller.synthetic_set()
        final = evaluate_and_save(synset, cfg, dataset, device)
        final.update(distill_seconds=time.time() - start - final["eval_seconds"], resumed_from=resumed_from,
                     zoo_pretrain_calls=dsdm_zoo.PRETRAIN_CALLS - pretrain_calls_before, iteration=d.iterations)
        with tempfile.TemporaryDirectory() as folder:
            if distiller is not None:
                distiller.save_checkpoint(Path(folder) / CHECKPOINT_FILE)
            for name, path in final.pop("files").items():
                os.replace(path, Path(folder) / name)
            # the set first, then metrics + marker in one batch: a crash in between re-evaluates, logs once
            tracking.log_artifacts(uri, run_id, [Path(folder) / SET_FILE, Path(folder) / GRID_FILE])
            tracking.log_final(uri, run_id, final, step=d.iterations)
            tracking.finish(uri, run_id)
            fault_point("trial_final_logged", trial_number(), trial=trial_id)
            tune.report({**final, "node": ray.get_runtime_context().get_node_id()},
                        checkpoint=tune.Checkpoint.from_directory(folder))
    except Exception:
        tracking.finish(uri, run_id, "FAILED")  # Tune may retry it: the retry reopens the run
        raise


def trial_number() -> int:
    """The n-th trial the search started (1, 2, ...): Tune's trial folders are `<name>_<id>_<n>_<params>`."""
    context = tune.get_context()
    return int(Path(context.get_trial_dir()).name.split(f"{context.get_trial_id()}_", 1)[1].split("_")[0])


def report_twin(uri: str, run_id: str, twin, cfg: Config) -> None:
    """Take an identical finished trial's results (tracking.finished_twin) instead of computing
    them: its final metrics and set go into this trial's run (the marker last, as in run_trial),
    with the original's run id in REUSED_TAG and its sweep/trial in the metrics' `reused_from`."""
    final = json.loads(twin.data.tags[tracking.FINAL_TAG])
    original = twin.data.tags.get(tracking.REUSED_TAG, twin.info.run_id)
    final.setdefault("reused_from", f"{Path(twin.data.tags[tracking.SEARCH_TAG]).name}/{twin.data.tags[tracking.TRIAL_TAG]}")
    tracking.log_params(uri, run_id, cfg.plain())
    tracking.set_tags(uri, run_id, {tracking.REUSED_TAG: original,
                                    **({tracking.COMPUTE_TAG: twin.data.tags[tracking.COMPUTE_TAG]}
                                       if tracking.COMPUTE_TAG in twin.data.tags else {})})
    with tempfile.TemporaryDirectory() as folder:  # the twin's set, fetched once: logged here and handed to Tune
        files = [tracking.download_artifact(uri, twin.info.run_id, name, Path(folder)) for name in (SET_FILE, GRID_FILE)]
        tracking.log_artifacts(uri, run_id, files)
        tracking.log_final(uri, run_id, final, step=cfg.distill.iterations)
        tracking.finish(uri, run_id)
        report_final(final, folder)


def report_logged_final(uri: str, run_id: str, final: dict[str, Any]) -> None:
    """Hand Tune the final metrics and set already in MLflow, without evaluating or logging again."""
    with tempfile.TemporaryDirectory() as folder:
        for name in (SET_FILE, GRID_FILE):
            tracking.download_artifact(uri, run_id, name, Path(folder))
        report_final(final, folder)


def report_final(final: dict[str, Any], folder: str) -> None:
    """Tune's final report of metrics already in MLflow, with the set in `folder` as the checkpoint."""
    tune.report({**final, "final_from_mlflow": 1, "node": ray.get_runtime_context().get_node_id()},
                checkpoint=tune.Checkpoint.from_directory(folder))


def distill_with_checkpoints(cfg: Config, dataset, zoo: ZooRefs | None, device, uri: str, run_id: str,
                             options: dict[str, Any]):
    """Algorithm 1 under Tune: `Distiller.run` (the CLI's loop) with hooks that send every report
    to MLflow and Tune (checkpoint steps with the distiller's state), resumed from Tune's last
    checkpoint, and the named fault point after every iteration."""
    d = cfg.distill
    model_zoo = zoo.materialise(d.num_models, d.pretrain_epochs) if (zoo is not None and d.pretrained) else None
    distiller = Distiller(dataset, cfg, model_zoo, device)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            distiller.load_checkpoint(Path(folder) / CHECKPOINT_FILE)
    resumed_from = distiller.iteration
    node = ray.get_runtime_context().get_node_id()
    trial = tune.get_context().get_trial_id()
    last_proxy = {"val": float("nan")}  # Optuna wants the objective in every report: the latest proxy, NaN before any

    def tune_metrics(metrics: dict, it: int) -> dict:
        last_proxy["val"] = metrics.get("proxy_val_acc", last_proxy["val"])
        return {**metrics, "iteration": it, "resumed_from": resumed_from, "node": node, METRIC: last_proxy["val"]}

    # An attempt stopped after logging iteration i but before Tune kept its checkpoint replays i
    # from an earlier checkpoint (bit-exact): MLflow keeps the first record of each step.
    logged_up_to = tracking.last_step(uri, run_id, "iteration") if resumed_from else -1

    def log(metrics: dict, it: int) -> None:
        if it > logged_up_to:
            tracking.log_metrics(uri, run_id, {**metrics, "iteration": it, "resumed_from": resumed_from}, step=it)
        if not distiller.checkpoint_due(it):  # checkpoint steps report once, with the checkpoint
            tune.report(tune_metrics(metrics, it))

    def save(metrics: dict, it: int) -> None:
        with tempfile.TemporaryDirectory() as folder:
            distiller.save_checkpoint(Path(folder) / CHECKPOINT_FILE)
            tune.report(tune_metrics(metrics, it), checkpoint=tune.Checkpoint.from_directory(folder))

    proxy_every = int(options.get("proxy_every", 0))
    hooks = RunHooks(log=log, checkpoint=save, proxy_every=proxy_every,
                     proxy=lambda dist: proxy_accuracy(dist, cfg, int(options.get("proxy_epochs", 5)), device),
                     after_step=lambda it: fault_point("trial_exit_at", it, trial=trial, resumed_from=resumed_from))
    distiller.run(hooks=hooks)
    return distiller, resumed_from


def evaluate_and_save(synset: SyntheticSet, cfg: Config, dataset, device) -> dict[str, Any]:
    """ConvNet-3 evaluation (final epoch; selection uses val only) and the set + its grid as files."""
    results = evaluate_set(synset, dataset, replace(cfg.eval, archs=("convnet3",)), device)
    out_dir = Path(tempfile.mkdtemp(prefix="dsdm-trial-"))
    synset.save(out_dir / SET_FILE)
    save_grid(synset, out_dir / GRID_FILE)
    r = results["convnet3"]
    return {METRIC: r["val_mean"], "test_acc": r["mean"], "test_std": r["std"],
            **tracking.eval_metrics(results), "eval_seconds": r["seconds"],
            "files": {SET_FILE: out_dir / SET_FILE, GRID_FILE: out_dir / GRID_FILE}}


def cross_arch_refs(set_path: str, data_ref, eval_cfg: dict, cpus: float) -> list:
    """One cross_arch_task per evaluation network, so slow architectures spread over the CPUs;
    join the results with dsdm.evaluate.merge_results(ray.get(refs))."""
    return [cross_arch_task.options(num_cpus=cpus).remote(set_path, [data_ref], eval_cfg, max(1, int(cpus)), [run])
            for run in range(int(eval_cfg["runs"]))]


@ray.remote
def cross_arch_task(set_path: str, data: list, eval_cfg: dict, threads: int, run_ids: list[int]) -> dict:
    """Evaluate one distilled set on other architectures as a Ray task (the networks `run_ids`)."""
    from dsdm.config import EvalConfig

    torch.set_num_threads(max(1, threads))
    dataset = dataset_from_store(ray.get(data[0]))
    cfg = EvalConfig(**{**eval_cfg, "archs": tuple(eval_cfg["archs"])})
    return evaluate_set(SyntheticSet.load(set_path), dataset, cfg, resolve_device("auto"), run_ids=run_ids)


class FaultPoints(tune.Callback):
    """Driver-side fault point DSDM_FAULT_DRIVER_CHECKPOINT="<trial number>:<iteration>[@actions]":
    fires once Tune has registered that trial's checkpoint of that iteration (so a stop that
    follows keeps it, and the resumed trial continues right after it). Inert unless set."""

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        it = (trial.last_result or {}).get("iteration")
        number = trial.experiment_tag.split("_")[0]  # the n of the trial's folder name
        fault_point("driver_checkpoint", f"{number}:{it}", trial=trial.trial_id)
