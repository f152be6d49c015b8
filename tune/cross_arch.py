"""Cross-architecture evaluation of distilled sets as Ray tasks (the search's and ablations.cross_arch's).

The driver reads each set once from its trial's Tune checkpoint through the checkpoint's own
filesystem (a folder or a bucket: no path on the node that wrote it is ever opened), puts it in
the object store, and one task per evaluation network trains on it, so slow architectures
spread over the CPUs. Results are joined per (trial, architecture) in submission order (DenseNet-121 first).
"""
from __future__ import annotations

import json
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from dsdm.evaluate import evaluate_set, merge_results
from dsdm.synthetic import SyntheticSet
from dsdm.train import resolve_device
from tune.recorder import XARCH_ENDED_TAG, XARCH_NODES_TAG, XARCH_STARTED_TAG, Recorder, eval_metrics
from tune.trainable import SET_FILE
from tune.zoo import dataset_from_store

CROSS_ARCHS = ("convnet3", "resnet10", "densenet121")
HEARTBEAT_S = 20.0  # a progress line at least this often while networks train


def read_set(checkpoint) -> SyntheticSet:
    """The distilled set of a Tune checkpoint, fetched through the checkpoint's filesystem."""
    source = posixpath.join(checkpoint.path, SET_FILE)
    with tempfile.TemporaryDirectory(prefix="dsdm-set-") as folder:
        local = Path(folder) / SET_FILE
        with checkpoint.filesystem.open_input_stream(source) as fh:
            local.write_bytes(fh.read())
        return SyntheticSet.load(local)


def put_sets(results, trial_ids) -> dict[str, ray.ObjectRef]:
    """{trial id: ObjectRef of its set} for the finished trials named (the driver owns the objects)."""
    wanted, refs = set(trial_ids), {}
    for r in results:
        trial_id = (r.metrics or {}).get("trial_id")
        if trial_id in wanted and r.checkpoint is not None:
            refs[trial_id] = ray.put(read_set(r.checkpoint))
    return refs


def eval_section(cfg) -> dict:
    """The config's eval section as a plain dict (what a task rebuilds EvalConfig from)."""
    return {k.split(".", 1)[1]: v for k, v in cfg.plain().items() if k.startswith("eval.")}


@dataclass(frozen=True)
class CrossArchJob:
    trial_id: str
    set_ref: ray.ObjectRef
    arch: str
    eval_cfg: dict  # eval section with archs=[arch], runs and seed as this job wants them


def run_cross_arch(jobs: list[CrossArchJob], data_ref, trial_cpus: float, progress=print,
                   trial_gpus: float = 0.0) -> dict[str, dict[str, dict]]:
    """{trial id: {arch: merged result, with the `nodes` its networks trained on}}: one Ray task per
    network of every job, longest first (DenseNet-121), with a trial's resources (on a cluster of GPU
    workers, the GPUs: not a CPU head); one progress line per network finished."""
    owner: dict = {}  # task ref -> (trial id, arch)
    jobs = sorted(jobs, key=lambda j: j.arch != "densenet121")
    for job in jobs:
        for run in range(int(job.eval_cfg["runs"])):
            ref = cross_arch_task.options(num_cpus=trial_cpus, num_gpus=trial_gpus).remote(
                job.set_ref, [data_ref], job.eval_cfg, max(1, int(trial_cpus)), [run])
            owner[ref] = (job.trial_id, job.arch)
    results: dict = {}
    pending, start = list(owner), time.time()
    progress(f"cross-arch: {len(owner)} networks to train on {len({j.trial_id for j in jobs})} distilled set(s) "
             f"({', '.join(dict.fromkeys(j.arch for j in jobs))}); DenseNet-121 first, the slowest")
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=HEARTBEAT_S)
        if not ready:  # a network can take minutes: say the phase is alive
            progress(f"cross-arch: {len(results)}/{len(owner)} networks done, {time.time() - start:.0f}s elapsed")
            continue
        (trial_id, arch), results[ready[0]] = owner[ready[0]], ray.get(ready[0])
        done = results[ready[0]][arch]
        progress(f"cross-arch: trial {trial_id} {arch} network done on node {done['node'][:8]}, {done['runs'][0]:.2f}% "
                 f"test accuracy ({len(results)}/{len(owner)} networks, {time.time() - start:.0f}s elapsed)")
    out: dict[str, dict] = {}
    for key in dict.fromkeys((j.trial_id, j.arch) for j in jobs):  # submission order, not finishing order
        parts = [results[r] for r, k in owner.items() if k == key]
        nodes = [part[key[1]].pop("node") for part in parts]
        out.setdefault(key[0], {}).update(merge_results(parts))
        out[key[0]][key[1]]["nodes"] = nodes
    return out


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def phase_started(parent) -> str:
    """The phase's start time, tagged on the parent run at once (the UI shows a phase running)."""
    started = now_utc()
    parent.set_tags({XARCH_STARTED_TAG: started})
    return started


def record_cross_arch(recorder: Recorder, parent_id: str, results: dict[str, dict], prefix: str = "",
                      started: str | None = None) -> None:
    """Each trial's results into its run of THIS search (found by search id + trial id), with the
    phase's start and end times as tags on that run and on the parent (the metrics arrive after the
    trial run's own end: the tags say when the phase ran)."""
    ended = now_utc()
    times = {XARCH_STARTED_TAG: started or ended, XARCH_ENDED_TAG: ended}
    for trial_id, res in results.items():
        run, _ = recorder.trial(trial_id, parent_id)
        run.log_metrics(eval_metrics(res, prefix=prefix))
        run.set_tags({**times, XARCH_NODES_TAG: json.dumps({arch: r.get("nodes", []) for arch, r in res.items()})})
    recorder.run(parent_id).set_tags(times)


@ray.remote
def cross_arch_task(synset: SyntheticSet, data: list, eval_cfg: dict, threads: int, run_ids: list[int]) -> dict:
    """Evaluate one distilled set on another architecture as a Ray task (the networks `run_ids`)."""
    from dsdm.config import EvalConfig

    torch.set_num_threads(max(1, threads))
    dataset = dataset_from_store(ray.get(data[0]))
    cfg = EvalConfig(**{**eval_cfg, "archs": tuple(eval_cfg["archs"])})
    result = evaluate_set(synset, dataset, cfg, resolve_device("auto"), run_ids=run_ids)  # CPU where no CUDA
    node = ray.get_runtime_context().get_node_id()
    return {arch: {**r, "node": node} for arch, r in result.items()}
