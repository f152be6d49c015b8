"""`python -m dsdm.bench --eval-cell` (or `python -m benchmarks.evalcell`): one sweep cell's evaluation,
today's path against the new default, in one run, with the ratio.

A cell's evaluation is `dsdm.evaluate.evaluate_set` on one distilled set: N fresh networks trained
for the budget's epochs, then scored on the validation and test splits. Paths (eval.* config values):

- `today`: `eval.scoring=each` - each network scored alone by `accuracy` (batches of 1024);
- `new` (the default): `eval.scoring=joint` - all N networks scored in one pass over each split
  (batches of 256, compiled on CPU: the compile is timed inside the cell, from a warm on-disk
  cache that a subprocess fills first, as every sweep trial after the first finds it);
- `new_bf16` (`--bf16`, opt-in): `new` + `eval.precision=bf16` (training forward in bf16).

Cells (`--cells`, default both): `resolve-fashionmnist-ipc1` (5 ConvNet-3s, 300 epochs, the E/M
sweeps' and Table 4's cell) and `cpu-mnist-ipc10` (3 ConvNet-3s, 50 epochs). The synthetic set is
`--synset FILE` or, without one, uniform noise of the set's shape (stored images x tiles; the cost does
not depend on the pixels), so no zoo or distillation is needed; the data is read from `--data-root`
or, where it is absent, replaced by random pixels of the dataset's shape and split sizes.

Per cell and path: wall seconds of the whole evaluation, and of its training and scoring apart
(`evaluate_set(..., clock=)`), so that a shortened run (`--epochs`) can be projected to the budget's
epochs (projected = training x budget epochs / epochs + scoring; labelled as such).
Per-network accuracies of `new` are compared with `today`'s (equal, or the largest difference).

    python -m dsdm.bench --eval-cell --data-root ../shared/data --json cell.json            # ~25 min on 1 idle core
    python -m dsdm.bench --eval-cell --data-root ../shared/data --bf16 --json cell.json     # + bf16 beside
    python -m dsdm.bench --eval-cell --epochs 20 --nets 2 --json quick.json                 # minutes; projected
"""
from __future__ import annotations

import dsdm  # noqa: F401  (OMP_WAIT_POLICY before torch)

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsdm.config import make_config
from dsdm.data import Dataset, load_dataset
from dsdm.errors import DsdmError
from dsdm.evaluate import evaluate_set
from dsdm.inference import scoring_plan
from dsdm.phases import PhaseClock
from dsdm.synthetic import SyntheticSet, tile_grid
from dsdm.train import resolve_device

ROOT = Path(__file__).resolve().parents[1]
CELLS = {"resolve-fashionmnist-ipc1": ("resolve", "fashionmnist", 1), "cpu-mnist-ipc10": ("cpu", "mnist", 10)}
PATHS = {"today": {"scoring": "each"}, "new": {}, "new_bf16": {"precision": "bf16"}}  # eval.* overrides
# shapes of the datasets a cell may use, for random data where the files are absent:
# (channels, size, classes, validation images (10% of train), test images, mean, std)
SHAPES = {"mnist": (1, 28, 10, 6000, 10000, (0.1307,), (0.3081,)),
          "fashionmnist": (1, 28, 10, 6000, 10000, (0.2860,), (0.3530,)),
          "cifar10": (3, 32, 10, 5000, 10000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


def random_dataset(name: str, seed: int = 0, limit: int = 0) -> Dataset:
    """Random 8-bit pixels with the dataset's shape and val/test sizes (at most `limit` each if > 0;
    a small train split)."""
    ch, s, classes, n_val, n_test, mean, std = SHAPES[name]
    if limit:
        n_val, n_test = min(n_val, limit), min(n_test, limit)
    g = torch.Generator().manual_seed(seed)

    def split(n):
        return torch.randint(0, 256, (n, ch, s, s), generator=g).float().div_(255), torch.arange(n) % classes
    (tx, ty), (vx, vy), (sx, sy) = split(10 * classes), split(n_val), split(n_test)
    return Dataset(name, "image", tx, ty, vx, vy, sx, sy, [str(c) for c in range(classes)], mean, std,
                   info={"random_pixels": True})


def cell_dataset(name: str, root: str | None, limit: int = 0) -> Dataset:
    if root:
        try:
            return load_dataset(name, root, offline=True)
        except DsdmError as exc:
            _log(f"evalcell: {exc.args[0][:120]}...; using random pixels of {name}'s shape")
    return random_dataset(name, limit=limit)


def noise_set(cfg, dataset: Dataset, seed: int = 0) -> SyntheticSet:
    """Uniform noise with the distilled set's shape: ipc stored images per class, factor x factor tiles."""
    d, C = cfg.distill, dataset.num_classes
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(C * d.ipc, dataset.channels, *dataset.image_size, generator=g)
    return SyntheticSet(images, torch.arange(C).repeat_interleave(d.ipc), tile_grid(d.factor, dataset.kind),
                        dataset.name, dataset.mean, dataset.std)


def warm_compile_cache(dataset: Dataset, batch: int, device: str) -> float:
    """Fill the on-disk inductor cache for the scoring graph in a fresh process; its seconds (a cold
    compile when the cache was empty)."""
    code = ("import dsdm, torch; from dsdm.models import build_model; from dsdm.inference import compiled_forward; "
            f"m = build_model('convnet3', {dataset.channels}, {dataset.num_classes}, {dataset.image_size}, 0).to('{device}').eval(); "
            f"x = torch.zeros({batch}, {dataset.channels}, *{dataset.image_size}, device='{device}'); "
            "torch.inference_mode()(compiled_forward())(m, x)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, capture_output=True)
    return time.perf_counter() - t


def warm_up(synset: SyntheticSet, dataset: Dataset, eval_cfg, device) -> None:
    """One network, one epoch, 64 images scored, both paths: oneDNN primitives, allocator, lazy imports
    (so the first path timed does not pay them)."""
    small = replace(dataset, val_x=dataset.val_x[:64], val_y=dataset.val_y[:64], test_x=dataset.test_x[:64],
                    test_y=dataset.test_y[:64])
    for path in ("today", "new"):
        evaluate_set(synset, small, replace(eval_cfg, runs=1, epochs=1, score_compile="off", **PATHS[path]), device)


def run_cell(name: str, args, device) -> dict:
    budget, ds_name, ipc = CELLS[name]
    over = {"data.dataset": ds_name, "distill.ipc": ipc, **({"eval.runs": args.nets} if args.nets else {}),
            **({"eval.epochs": args.epochs} if args.epochs else {}),
            **({"eval.batch_nets": args.batch_nets} if args.batch_nets else {})}
    cfg = make_config(budget, over)
    full_epochs = make_config(budget, {"data.dataset": ds_name}).eval.epochs
    dataset = cell_dataset(ds_name, args.data_root, args.score_images)
    if args.score_images:  # tests and dry runs: the first N validation and test images only
        n = args.score_images
        dataset = replace(dataset, val_x=dataset.val_x[:n], val_y=dataset.val_y[:n], test_x=dataset.test_x[:n],
                          test_y=dataset.test_y[:n])
    synset = SyntheticSet.load(args.synset) if args.synset else noise_set(cfg, dataset)
    paths = ["today", "new"] + (["new_bf16"] if args.bf16 else [])
    out = {"budget": budget, "dataset": ds_name, "ipc": ipc, "nets": cfg.eval.runs, "epochs": cfg.eval.epochs,
           "budget_epochs": full_epochs, "train_images": len(synset.decoded()[1]),
           "score_images": len(dataset.val_y) + len(dataset.test_y), "random_pixels": bool(dataset.info.get("random_pixels")),
           "set": str(args.synset) if args.synset else "noise", "threads": torch.get_num_threads(), "device": str(device)}
    plan = scoring_plan(cfg.eval, device, cfg.eval.runs * out["score_images"])
    if plan["compiled"]:
        out["compile_cache_fill_s"] = warm_compile_cache(dataset, plan["batch_size"], str(device))
        _log(f"{name}: inductor cache filled in {out['compile_cache_fill_s']:.1f} s (subprocess)")
    warm_up(synset, dataset, cfg.eval, device)
    for path in paths:
        ecfg = replace(cfg.eval, **PATHS[path], **(args.new_levers if path != "today" else {}))
        clock = PhaseClock(device)
        load0 = os.getloadavg()[0]
        with clock.phase("eval"):
            res = evaluate_set(synset, dataset, ecfg, device, clock=clock)["convnet3"]
        cell_s, train_s, score_s = (clock.seconds.get(k, 0.0) for k in ("eval", "eval_train", "eval_score"))
        out[path] = {"cell_s": cell_s, "score_s": score_s, "train_s": train_s,
                     "projected_cell_s": train_s * full_epochs / cfg.eval.epochs + score_s,
                     "test_runs": res["runs"], "val_runs": res["val_runs"], "memory": clock.metrics(),
                     "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        _log(f"{name} {path}: cell {cell_s:.1f} s (training {train_s:.1f} s, scoring {score_s:.1f} s), "
             f"load {out[path]['load']}")
    base = out["today"]
    for path in paths[1:]:
        r = out[path]
        r["cell_speedup"] = base["cell_s"] / r["cell_s"]
        r["projected_cell_speedup"] = base["projected_cell_s"] / r["projected_cell_s"]
        diffs = [abs(a - b) for a, b in zip(base["test_runs"] + base["val_runs"], r["test_runs"] + r["val_runs"])]
        r["max_acc_diff_vs_today"] = max(diffs)
    out["new"]["accuracies_equal_today"] = out["new"]["max_acc_diff_vs_today"] == 0.0
    return out


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    return {"eval_cell": {c: run_cell(c, args, device) for c in cells}}


def table(result: dict, command: str) -> str:
    lines = [f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')})\n",
             "| cell | nets x epochs | threads | path | cell s | of which scoring s | cell speed-up | "
             "projected to budget epochs: s (speed-up) | accuracies vs today | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in result["eval_cell"].items():
        for path in ("today", "new", "new_bf16"):
            if path not in c:
                continue
            r = c[path]
            ratio = f"**{r['cell_speedup']:.2f}x**" if "cell_speedup" in r else "1x"
            proj = (f"{r['projected_cell_s']:.0f} ({r['projected_cell_speedup']:.2f}x)" if "projected_cell_speedup" in r
                    else f"{r['projected_cell_s']:.0f}")
            acc = ("-" if path == "today" else "equal" if r["max_acc_diff_vs_today"] == 0
                   else f"max diff {r['max_acc_diff_vs_today']:.2f} points")
            lines.append(f"| {name}{' (random pixels)' if c['random_pixels'] else ''} | {c['nets']} x {c['epochs']} | "
                         f"{c['threads']} | {path} | {r['cell_s']:.1f} | {r['score_s']:.1f} | {ratio} | {proj} | {acc} | "
                         f"{r['load'][0]}-{r['load'][1]} |")
    return "\n".join(lines)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evalcell", description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of: {', '.join(CELLS)}")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"),
                   help="dataset folder (random pixels of the right shape where absent)")
    p.add_argument("--synset", type=Path, help="a distilled set to evaluate (default: noise of the cell's shape)")
    p.add_argument("--nets", type=int, default=0, help="networks per cell (default: the budget's)")
    p.add_argument("--epochs", type=int, default=0, help="epochs per network (default: the budget's; fewer: projected)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a sweep trial's trial_cpus)")
    p.add_argument("--batch-nets", choices=["on", "off", "auto"], help="eval.batch_nets (default auto: stacked on CUDA)")
    p.add_argument("--score-images", type=int, default=0, help="score only the first N val and test images (tests)")
    p.add_argument("--bf16", action="store_true", help="also time new + eval.precision=bf16 (opt-in)")
    p.add_argument("--set", dest="levers", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="an eval.* setting of the new path(s), e.g. eval.score_batch=64 or eval.compile=on (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--json", type=Path, help='write {"eval_cell": {...}} here')
    args = p.parse_args(argv)
    try:  # validated as config values: a bad key or value is one line
        pairs = dict(kv.split("=", 1) for kv in args.levers)
        if not all(k.startswith("eval.") for k in pairs):
            raise DsdmError("--set takes eval.* keys only")
        new = make_config("smoke", pairs).eval
        args.new_levers = {k[5:]: getattr(new, k[5:]) for k in pairs}
    except (DsdmError, ValueError) as exc:
        p.error(f"--set: {exc}")
    bad = [c for c in args.cells.split(",") if c.strip() and c.strip() not in CELLS]
    if bad or min(args.nets, args.epochs, args.threads, args.score_images) < 0:
        p.error(f"--cells takes {', '.join(CELLS)}; --nets, --epochs, --threads >= 0")
    command = "python -m dsdm.bench --eval-cell " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(args)
    print(table(result, command.strip()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
