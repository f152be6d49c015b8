"""One experiment assembly for `tune.search` and every sweep: the only module that builds Ray objects.

    with open_experiment(cfg, runner, name, prog=..., trials=N, resume=..., check=...) as exp:
        exp.open_parent(run name, params)        # the MLflow parent run (Recorder)
        with exp.running():                      # Ray, dataset + zoo in the object store
            results = exp.fit(make_tuner(exp.trainable(run_trial), ...))

`open_experiment` runs the pre-flight checks (data root, storage folder or URI, the caller's
fresh/resume check under the lock, MLflow, Ray address, IPC, free space), holds the lock and the
space reserve, watches for a full disk, and turns an interrupt into the advice that resumes it
and a full disk into one line. `running` closes the experiment's open MLflow runs KILLED or
FAILED when anything stops it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

from dsdm.config import Config
from dsdm.errors import DsdmError
from tune import preflight
from tune.diskfull import FullDiskWatch, SpaceReserve, disk_full
from tune.lock import search_lock
from tune.recorder import Recorder, RunLog, check_reachable, default_uri, experiment_name, quiet_mlflow
from tune.runner import Runner, ray_session
from tune.signals import STOP, Interrupted, resume_advice
from tune.storage import Storage


@dataclass
class Experiment:
    cfg: Config
    runner: Runner
    storage: Storage
    name: str  # the Tune run's folder under the storage
    prog: str
    dataset: Any
    mlflow_uri: str
    watch: FullDiskWatch
    reserve: SpaceReserve
    recorder: Recorder | None = None
    parent: RunLog | None = None
    data_ref: Any = None
    zoo_refs: Any = None
    zoo_info: dict = field(default_factory=dict)
    search_id: str = ""  # the MLflow runs' dsdm.search_id (tune.resume's record); default: the Tune run's path

    @property
    def tune_path(self) -> str:
        return self.storage.uri(self.name)

    def open_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> RunLog:
        """The experiment's MLflow parent run (reopened on --resume), its params logged once."""
        self.recorder = Recorder.open(self.mlflow_uri, experiment_name(self.dataset.name, self.cfg.distill.ipc),
                                      self.storage.local / "mlartifacts", self.search_id or self.tune_path)
        self.parent = self.recorder.parent(run_name, tags)
        self.parent.log_params(params)
        return self.parent

    @contextlib.contextmanager
    def running(self, keep_ray: bool = False):
        """Ray (unless the caller started it; `keep_ray`: left running for an outer session), the
        dataset and the zoo in the object store (the zoo trained on the actor pool under the local
        zoo cache, or reused); an interrupt or an error ends the experiment's open runs KILLED / FAILED."""
        from tune.zoo import load_or_train_zoo_on_pool, put_dataset

        try:
            with ray_session(self.runner, after_start=self._after_ray_start, keep=keep_ray):
                self.data_ref = put_dataset(self.dataset)
                self.zoo_refs, self.zoo_info = load_or_train_zoo_on_pool(
                    self.dataset, self.data_ref, self.cfg.zoo, self.storage.local, self.cfg.data.seed,
                    self.cfg.data.val_fraction, self.runner.zoo_pool_size(self.cfg.zoo.num_models),
                    self.runner.zoo_cpus, self.runner.zoo_gpus)
                # beside the Tune run (in the bucket on a cluster): what a fresh machine reads of the zoo
                self.storage.write_text(json.dumps(self.zoo_info, indent=1), f"{self.name}.zoo.json")
                yield self
        except BaseException as exc:
            self.reserve.release()  # first: on a full disk, this is the room MLflow's sqlite needs below
            if self.recorder is not None:
                with contextlib.suppress(Exception):  # best effort: a resume reopens the runs
                    self.recorder.close_open_runs("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise

    def _after_ray_start(self) -> None:
        STOP.install()  # ray.init replaced the SIGTERM handler
        self.watch.attach()  # and may have set up Ray's log handlers anew

    def trial_options(self, proxy_every: int = 0, proxy_epochs: int | None = None, reuse: bool = False):
        from tune.trainable import TrialOptions, proxy_epochs_default

        return TrialOptions(self.recorder, self.parent.run_id, self.runner.trial_cpus, self.runner.trial_gpus,
                            proxy_every, proxy_epochs or proxy_epochs_default(self.cfg.eval.epochs), reuse)

    def trainable(self, fn: Callable, options, **params):
        """`fn(config, base=, data=, zoo=, options=, **params)` with its resources, the large
        objects passed once."""
        from ray import tune

        return tune.with_resources(
            tune.with_parameters(fn, base=self.cfg.plain(), data=[self.data_ref], zoo=self.zoo_refs,
                                 options=options, **params),
            {"cpu": self.runner.trial_cpus, "gpu": self.runner.trial_gpus})

    def fit(self, tuner):
        """Tuner.fit under the signal handler; a full disk Tune stopped at becomes its one line."""
        with STOP.fit():
            results = tuner.fit()
        if self.watch.error is not None:
            raise self.watch.error
        return results

    def finish(self, metrics: dict[str, float], files: list, step: int | None = None) -> None:
        """The parent's last metrics and files; runs that died unreported end FAILED; the parent FINISHED.
        With `step` (the search: its number of trials), metrics already logged at that step are not
        logged again, so resuming a finished search adds no second value."""
        if step is None:
            self.parent.log_metrics(metrics)
        else:
            self.parent.log_metrics_once(metrics, step)
        self.parent.log_artifacts(files)
        self.recorder.close_open_runs("FAILED", keep=self.parent.run_id)
        self.parent.finish()


@contextlib.contextmanager
def open_experiment(cfg: Config, runner: Runner, name: str, *, prog: str, trials: int, resume: bool,
                    data_root: str | None = None, check: Callable[[Storage, str], None] = lambda s, n: None,
                    restarts_on_resume: Callable[[Storage, str], bool] = lambda s, n: False):
    """Checks, lock, reserve and full-disk watch around an experiment (see the module docstring).
    `check(storage, name)` refuses a fresh run over an existing one, or a resume of nothing.
    A refused run leaves no folder it created behind."""
    preflight.check_data_root(cfg.data.dataset, data_root, cfg.data.offline)
    local = Path(runner.local_dir if "://" in str(runner.storage) else runner.storage).expanduser().resolve()
    created = not local.exists()
    try:
        with _experiment(cfg, runner, name, prog, trials, resume, check, restarts_on_resume) as exp:
            yield exp
    except DsdmError:
        if created:
            with contextlib.suppress(OSError):  # only while empty: nothing written is ever removed
                local.rmdir()
        raise


@contextlib.contextmanager
def _experiment(cfg: Config, runner: Runner, name: str, prog: str, trials: int, resume: bool,
                check: Callable[[Storage, str], None], restarts_on_resume: Callable[[Storage, str], bool]):
    storage = Storage.open(runner.storage, runner.local_dir)
    with search_lock(storage.local / f"{name}.lock", prog=prog):
        check(storage, name)
        uri = runner.mlflow_uri or default_uri(storage.local)
        quiet_mlflow()
        check_reachable(uri)
        preflight.check_ray_address(runner.address)
        from dsdm.coreset import check_ipc_fits  # torch: the first expensive imports
        from dsdm.data import load_dataset

        dataset = load_dataset(cfg.data.dataset, cfg.data.root or None, cfg.data.offline, cfg.data.val_fraction,
                               cfg.data.seed)
        check_ipc_fits(dataset, cfg)
        preflight.check_free_space(storage.local, preflight.space_needed(cfg, dataset, trials, zoo_on_disk=resume))
        preflight.paper_on_cpu_note(cfg.budget, runner.trial_gpus, trials, prog=prog)
        reserve = SpaceReserve(storage.local, name)
        watch = FullDiskWatch(storage.local, reserve)
        watch.attach()
        exp = Experiment(cfg, runner, storage, name, prog, dataset, uri, watch, reserve)
        try:
            with reserve:
                yield exp
        except KeyboardInterrupt:
            folder_left = not storage.remote and storage.exists(name)
            raise Interrupted(resume_advice(exp.tune_path, folder_left, restarts_on_resume(storage, name))) from None
        except Exception as exc:  # a full disk surfaces as OSError, or inside Ray's, Tune's or torch's errors
            error = None if isinstance(exc, DsdmError) else (watch.error or disk_full(exc, storage.local))
            if error is None:
                raise
            raise error from None
        finally:
            watch.detach()


def make_tuner(trainable, runner: Runner, storage: Storage, name: str, param_space: dict, *, restore: bool = False,
               search_alg=None, scheduler=None, num_samples: int = 1):
    """A new Tuner at storage/name (a folder or a URI), or the one saved there (`restore`).
    Trials reuse their actor: a trial's process (torch, MLflow imported, ~5 CPU-s) serves the next."""
    import os

    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tune.faults import FaultPoints

    # Tune adds a TensorBoard logger when tensorboardX is importable (a dependency of a dependency
    # here) and then prints a `tensorboard --logdir` hint for a tool that is not installed; MLflow
    # holds the records. Its CSV and JSON result files stay (resume and the tests read them).
    # (A restored Tuner keeps the callbacks it was saved with; one from before this keeps Tune's.)
    if restore:
        return tune.Tuner.restore(storage.uri(name), trainable, resume_errored=True)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples, reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=storage.root, verbose=1,
            callbacks=[FaultPoints(), CSVLoggerCallback(), JsonLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=runner.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )
