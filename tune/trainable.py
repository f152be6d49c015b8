"""One Tune trial: DSDM distillation with the trial's config, then ConvNet-3 evaluation.

A plain function of (config, large objects passed once through `tune.with_parameters`, and the
search's `TrialOptions`).
The distiller's full state is checkpointed through Tune every `checkpoint_every`
iterations, so a retried trial continues from its last iteration, not from 0; every report
carries `resumed_from` (the iteration this attempt started at) and `node` (where it ran).
The final record holds seconds and memory per phase (`dsdm.phases.PhaseClock`), and the trial's
run the set, its grid and its manifest (`dsdm.manifest`), as `dsdm distill --evaluate` writes them.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from dsdm import zoo as dsdm_zoo
from dsdm.config import Config
from dsdm.coreset import SELECTORS, select_coreset
from dsdm.distill import Distiller, RunHooks
from dsdm.errors import DsdmError
from dsdm.evaluate import evaluate_set
from dsdm.manifest import manifest_path, write_manifest, zoo_record
from dsdm.phases import PhaseClock
from dsdm.synthetic import SyntheticSet
from dsdm.train import resolve_device
from dsdm.visualize import save_grid
from tune import recorder as rec
from tune.faults import fault_point
from tune.recorder import Recorder, RunLog
from tune.zoo import ZooRefs, dataset_from_store

CHECKPOINT_FILE = "distill.ckpt"
SET_FILE = "distilled.pt"
GRID_FILE = "grid.png"
MANIFEST_FILE = manifest_path(SET_FILE).name  # dsdm/manifest.py: how to reproduce and re-check the set
ARTIFACTS = (SET_FILE, GRID_FILE, MANIFEST_FILE)  # a trial run's files
NOTE_TAG = "mlflow.note.content"  # the run's description in MLflow's UI
METRIC = "val_acc"  # the objective: ConvNet-3 accuracy on the held-out validation split
ERROR_KEY = "error"  # a trial's deterministic error (DsdmError: bad config, non-finite loss), reported, not raised


@dataclass(frozen=True)
class TrialOptions:
    """What every trial of one search or sweep shares besides its config (through with_parameters)."""
    recorder: Recorder
    parent_id: str
    threads: float = 1
    gpus: float = 0
    proxy_every: int = 0  # iterations between proxy validation accuracies (0: none)
    proxy_epochs: int = 5
    reuse: bool = False  # copy an identical finished trial of another search (Recorder.finished_twin)


def proxy_epochs_default(eval_epochs: int) -> int:
    """Epochs of the proxy ConvNet-3: a tenth of the evaluation's (5 when that is the protocol's)."""
    return max(1, eval_epochs // 10 or 5)


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> Config:
    return Config.from_flat(base).override(sampled).validate()


def proxy_accuracy(distiller: Distiller, cfg: Config, epochs: int, device) -> float:
    """Cheap ASHA signal: one ConvNet-3 trained briefly on the current set, validation accuracy."""
    short = replace(cfg.eval, archs=("convnet3",), runs=1, epochs=epochs)
    return evaluate_set(distiller.synthetic_set(), distiller.dataset, short, device)["convnet3"]["val_mean"]


def run_trial(config: dict[str, Any], *, base: dict[str, Any], data: list, zoo: ZooRefs | None,
              options: TrialOptions) -> None:
    """`data` is [ObjectRef of the dataset payload] (a list so it is not resolved twice)."""
    torch.set_num_threads(max(1, int(options.threads)))
    cfg = trial_config(base, config)
    d = cfg.distill
    device = resolve_device("auto" if options.gpus > 0 else "cpu")  # GPUs asked for, none there: CPU
    dataset = dataset_from_store(ray.get(data[0]))
    pretrain_calls_before = dsdm_zoo.PRETRAIN_CALLS

    trial_id = tune.get_context().get_trial_id()
    rec.quiet_mlflow()
    run, final = options.recorder.trial(trial_id, options.parent_id)
    if final is not None:  # evaluated and logged before an interrupt or crash; Tune never saved it
        run.finish()  # it may have been closed as KILLED or FAILED meanwhile
        return report_logged_final(run, final)
    try:
        fault_point("trial_start", trial_number(), trial=trial_id)
        compute = f"{device.type} x{torch.get_num_threads()}"
        twin = options.recorder.finished_twin(cfg.plain(), compute) if options.reuse else None
        if twin is not None:
            return report_twin(run, twin, cfg)
        run.log_params(cfg.plain())
        run.set_tags({rec.COMPUTE_TAG: compute})
        start, clock = time.time(), PhaseClock(device)
        if d.method in SELECTORS:  # coreset baselines: real images picked in a zoo model's embedding
            with clock.phase("zoo"):
                model_zoo = zoo.materialise(1, d.pretrain_epochs) if d.method != "random" else None
            with clock.phase("distill"):
                net = model_zoo.model(0, d.pretrain_epochs, device) if model_zoo is not None else None
                distiller, resumed_from = None, 0
                synset = select_coreset(d.method, dataset, d.ipc, d.seed, net, cfg.plain())
        else:
            with clock.phase("zoo"):  # the trial's share of the zoo: its M snapshots from the object store
                model_zoo = zoo.materialise(d.num_models, d.pretrain_epochs) if (zoo is not None and d.pretrained) else None
            with clock.phase("distill"):
                distiller, resumed_from = distill_with_checkpoints(cfg, dataset, model_zoo, device, run, options)
            clock.carve("distill", "cache_fill", distiller.cache.fill_seconds)
            synset = distiller.synthetic_set()
        with tempfile.TemporaryDirectory(prefix="dsdm-trial-") as folder:  # the set written once, here
            final = evaluate_and_save(synset, cfg, dataset, device, Path(folder), clock, model_zoo)
            final.update(distill_seconds=time.time() - start - final["eval_seconds"], resumed_from=resumed_from,
                         zoo_pretrain_calls=dsdm_zoo.PRETRAIN_CALLS - pretrain_calls_before, iteration=d.iterations)
            if distiller is not None:
                distiller.save_checkpoint(Path(folder) / CHECKPOINT_FILE)
            # the set first, then metrics + marker in one batch: a crash in between re-evaluates, logs once
            run.log_artifacts([Path(folder) / name for name in ARTIFACTS])
            run.set_tags({NOTE_TAG: note(Path(folder) / MANIFEST_FILE)})
            # the loop logged iteration and resumed_from at the last step already
            run.log_final(final, step=d.iterations, logged=("iteration", "resumed_from") if distiller else ())
            run.finish()
            fault_point("trial_final_logged", trial_number(), trial=trial_id)
            tune.report({**final, "node": ray.get_runtime_context().get_node_id()},
                        checkpoint=tune.Checkpoint.from_directory(folder))
    except DsdmError as exc:
        # deterministic (bad config, non-finite loss): a retry would fail the same way, so the trial
        # ends here with its error as its last report (objective NaN: Optuna records the trial failed)
        run.set_tags({rec.ERROR_TAG: str(exc)[:5000]})
        run.finish("FAILED")
        tune.report({ERROR_KEY: str(exc), METRIC: float("nan"), "node": ray.get_runtime_context().get_node_id()})
    except Exception:
        run.finish("FAILED")  # a crash: Tune retries it (--max-failures) from its last checkpoint, reopening the run
        raise


def trial_number() -> int:
    """The n-th trial the search started (1, 2, ...)."""
    context = tune.get_context()
    return trial_number_of(context.get_trial_dir(), context.get_trial_id())


def trial_number_of(trial_path: str, trial_id: str) -> int:
    """Tune's trial folders are `<trainable>_<id>_<n>_<params>`: n (0 when the name has no number)."""
    try:
        return int(Path(trial_path.rstrip("/")).name.split(f"{trial_id}_", 1)[1].split("_")[0])
    except (IndexError, ValueError):
        return 0


def report_twin(run: RunLog, twin, cfg: Config) -> None:
    """Take an identical finished trial's results (Recorder.finished_twin) instead of computing
    them: its final metrics and set go into this trial's run (the marker last, as in run_trial),
    with the original's run id in REUSED_TAG and its sweep/trial in the metrics' `reused_from`."""
    final = json.loads(twin.data.tags[rec.FINAL_TAG])
    original = twin.data.tags.get(rec.REUSED_TAG, twin.info.run_id)
    final.setdefault("reused_from", f"{Path(twin.data.tags[rec.SEARCH_TAG]).name}/{twin.data.tags[rec.TRIAL_TAG]}")
    run.log_params(cfg.plain())
    copied = {k: twin.data.tags[k] for k in (rec.COMPUTE_TAG, NOTE_TAG) if k in twin.data.tags}
    run.set_tags({rec.REUSED_TAG: original, **copied})
    with tempfile.TemporaryDirectory() as folder:  # the twin's set, fetched once: logged here and handed to Tune
        source = run.recorder.run(twin.info.run_id)
        names = [name for name in ARTIFACTS if name in source.artifact_names()]  # a twin from before manifests: none
        run.log_artifacts([source.download(name, Path(folder)) for name in names])
        run.log_final(final, step=cfg.distill.iterations)
        run.finish()
        report_final(final, folder)


def report_logged_final(run: RunLog, final: dict[str, Any]) -> None:
    """Hand Tune the final metrics and set already in MLflow, without evaluating or logging again."""
    with tempfile.TemporaryDirectory() as folder:
        for name in (SET_FILE, GRID_FILE):
            run.download(name, Path(folder))
        report_final(final, folder)


def report_final(final: dict[str, Any], folder: str) -> None:
    """Tune's final report of metrics already in MLflow, with the set in `folder` as the checkpoint."""
    tune.report({**final, "final_from_mlflow": 1, "node": ray.get_runtime_context().get_node_id()},
                checkpoint=tune.Checkpoint.from_directory(folder))


def distill_with_checkpoints(cfg: Config, dataset, model_zoo, device, run: RunLog, options: TrialOptions):
    """Algorithm 1 under Tune: `Distiller.run` (the CLI's loop) with hooks that send every report
    to MLflow and Tune (checkpoint steps with the distiller's state), resumed from Tune's last
    checkpoint, and the named fault point after every iteration."""
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
    # from an earlier checkpoint (bit-exact): MLflow keeps the first record of each step. Also
    # from no checkpoint at all: a driver killed before Tune's experiment snapshot listed one
    # restores the trial at iteration 0, into the run that already holds its first iterations.
    logged_up_to = run.last_step("iteration")

    def log(metrics: dict, it: int) -> None:
        if it > logged_up_to:
            run.log_metrics({**metrics, "iteration": it, "resumed_from": resumed_from}, step=it)
        if not distiller.checkpoint_due(it):  # checkpoint steps report once, with the checkpoint
            tune.report(tune_metrics(metrics, it))

    def save(metrics: dict, it: int) -> None:
        with tempfile.TemporaryDirectory() as folder:
            distiller.save_checkpoint(Path(folder) / CHECKPOINT_FILE)
            tune.report(tune_metrics(metrics, it), checkpoint=tune.Checkpoint.from_directory(folder))

    hooks = RunHooks(log=log, checkpoint=save, proxy_every=int(options.proxy_every),
                     proxy=lambda dist: proxy_accuracy(dist, cfg, int(options.proxy_epochs), device),
                     after_step=lambda it: fault_point("trial_exit_at", it, trial=trial, resumed_from=resumed_from,
                                                         node=node))
    distiller.run(hooks=hooks)
    return distiller, resumed_from


def evaluate_and_save(synset: SyntheticSet, cfg: Config, dataset, device, folder: Path, clock: PhaseClock,
                      model_zoo=None) -> dict[str, Any]:
    """The set, its grid and its manifest into `folder`; ConvNet-3 evaluation (final epoch; selection
    uses val only) of the saved file, as `dsdm distill --evaluate` scores it: the recorded number is
    the number of the file a user downloads. Final metrics carry the seconds and memory per phase."""
    set_file = folder / SET_FILE
    synset.save(set_file)
    save_grid(synset, folder / GRID_FILE)
    scored = replace(cfg, eval=replace(cfg.eval, archs=("convnet3",)))
    with clock.phase("eval"):
        results = evaluate_set(SyntheticSet.load(set_file), dataset, scored.eval, device, clock=clock)
    key, settings = zoo_record(model_zoo, dataset, cfg)
    write_manifest(set_file, cfg.plain(), results, dict(clock.seconds), key, settings, device, dataset.class_names,
                   eval_cfg=scored.plain())
    r = results["convnet3"]
    return {METRIC: r["val_mean"], "test_acc": r["mean"], "test_std": r["std"],
            **rec.eval_metrics(results), "eval_seconds": r["seconds"], **clock.metrics()}


def note(manifest_file: Path) -> str:
    """The run's description in MLflow's UI: what the set is and its ConvNet-3 numbers, from its manifest."""
    manifest = json.loads(manifest_file.read_text())
    r = manifest["evaluation"]["results"]["convnet3"]
    return (f"{manifest['summary']} ConvNet-3, final epoch, n = {r['test']['n']}: test {r['test']['mean']:.2f} "
            f"± {r['test']['sd']:.2f}, val {r['val']['mean']:.2f}. Reproduce and re-check: {MANIFEST_FILE}.")
