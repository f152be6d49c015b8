"""`python -m benchmarks.train_equivalence`: statistical equivalence of the training paths.

Trains `--nets` networks (`--arch`, default ConvNet-3) per path (`--paths`, default `baseline,fast`: today's loop and the
default; also `fast-bf16` and `fast-bf16-compiled`, `eval.precision=bf16` eager / compiled) with the
DSDM protocol at the cpu budget's epochs on a random coreset of 40 images per class of MNIST
(`--dataset`; the 400 training images of an IPC 10 factor-2 set), interleaved network by network with the same
seeds as `evaluate_set` (run i: seed i), and reports each path's final test accuracy mean ± sd
and standard error, and the largest per-network difference to the first path. JSON after every
network (partial runs count).

    python -m benchmarks.train_equivalence --data-root ../shared/data --json eq.json
    python -m benchmarks.train_equivalence --paths fast,fast-bf16 --epochs 10 --nets 4 --json bf16.json
    python -m benchmarks.train_equivalence --arch resnet10 --paths fast,fast-bf16 --epochs 20 --nets 4
"""
from __future__ import annotations

import dsdm  # noqa: F401  (OMP_WAIT_POLICY before torch)

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsdm.config import make_config
from dsdm.coreset import select_coreset
from dsdm.data import load_dataset
from dsdm.recipes import get_protocol
from dsdm.models import list_models
from dsdm.models import build_model
from dsdm.train import accuracy, train_classifier

PATHS = {"baseline": {"path": "baseline"}, "fast": {}, "fast-bf16": {"precision": "bf16"},
         "fast-bf16-compiled": {"precision": "bf16", "compile": True}}  # name -> TrainRecipe fields


def summary(accs: list[float]) -> dict:
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return {"mean": statistics.fmean(accs), "sd": sd, "sem": sd / len(accs) ** 0.5, "n": len(accs)}


def main(argv: list[str] | None = None) -> int:
    cfg = make_config("cpu", {"data.dataset": "mnist"})
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_equivalence", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="../shared/data")
    p.add_argument("--dataset", default="mnist", help="default mnist (the issue's check); digits runs in seconds")
    p.add_argument("--nets", type=int, default=10)
    p.add_argument("--arch", default="convnet3", choices=list_models())
    p.add_argument("--epochs", type=int, default=cfg.eval.epochs, help=f"default: the cpu budget's {cfg.eval.epochs}")
    p.add_argument("--paths", default="baseline,fast", help=f"comma-separated, >= 2 of: {', '.join(PATHS)}")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    paths = [v.strip() for v in args.paths.split(",") if v.strip()]
    if len(paths) < 2 or not set(paths) <= set(PATHS):
        p.error(f"--paths takes two or more of: {', '.join(PATHS)} (got '{args.paths}')")
    ds = load_dataset(args.dataset, args.data_root, offline=True)
    x, y = select_coreset("random", ds, 40, seed=cfg.distill.seed).decoded()
    rec = get_protocol(cfg.eval.protocol).recipe(args.dataset, args.epochs)
    out = {"dataset": args.dataset, "arch": args.arch, "epochs": args.epochs, "images": len(x), "test": {k: [] for k in paths},
           "seconds": {k: [] for k in paths}, "load": []}
    for run in range(args.nets):
        seed = cfg.eval.seed * 1000 + run
        for path in paths if run % 2 == 0 else paths[::-1]:  # alternate who goes first
            model = build_model(args.arch, ds.channels, ds.num_classes, ds.image_size, seed)
            t = time.time()  # a compiled path's first network includes the compile
            train_classifier(model, x, y, ds.mean, ds.std, replace(rec, **PATHS[path]), torch.Generator().manual_seed(seed))
            out["seconds"][path].append(time.time() - t)
            out["test"][path].append(100 * accuracy(model, ds.test_x, ds.test_y, ds.mean, ds.std))
        out["load"].append(round(os.getloadavg()[0], 2))
        out["summary"] = {k: summary(v) for k, v in out["test"].items()}
        out["max_abs_diff"] = {k: max(abs(a - b) for a, b in zip(out["test"][paths[0]], out["test"][k])) for k in paths[1:]}
        print(f"net {run}: " + ", ".join(f"{k} {out['test'][k][-1]:.2f}% in {out['seconds'][k][-1]:.0f} s" for k in paths)
              + f" (load {out['load'][-1]})", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    for k, s in out["summary"].items():
        print(f"| {k} | {s['n']} | {s['mean']:.2f} ± {s['sd']:.2f} | {s['sem']:.2f} | {sum(out['seconds'][k]):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
