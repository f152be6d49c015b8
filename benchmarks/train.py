"""`python -m benchmarks.train` (or `python -m dsdm.bench --train`): classifier training, today's
loop (`baseline`) against the new default (`fast`), in images x epochs per second.

Workloads (random 8-bit images at MNIST shape, 1x28x28, 10 classes; the cost does not depend
on the pixels):

- eval_convnet3: 10 ConvNet-3s on an MNIST IPC 10 factor-2 set (400 decoded images) with the
  DSDM evaluation protocol (batch 64, DSA colour/crop/scale/rotate per sample, CutMix p 0.5);
- zoo_convnet3: 4 ConvNet-3s pre-trained with the zoo recipe (batch 256, colour + crop DSA,
  CutMix p 0.5) on `--zoo-per-class` images per class;
- batched: N in {1, 2, 5, 10} eval networks trained as one stacked model vs one at a time
  (both on the fast path); ratio = stacked speed / one-at-a-time speed;
- eval_convnet3_bf16 (`--bf16`): the eval workload in bf16 (`eval.precision=bf16`) eager, eager
  with channels_last input, and compiled, against baseline and fast; the compile is timed apart.

The machine may be shared, so the two sides of every ratio are interleaved in one process,
network by network (A, B, A, B, ...), from the same seeds, and the load average is recorded.
Only training is timed (not the accuracy passes after it).

    python -m dsdm.bench --train --epochs 2 --json F      # short form (< 3 min on 2 cores)
    python -m benchmarks.train --epochs 2 --bf16 --json F   # + the bf16 rows (one compile, ~2 min)
    python -m benchmarks.train --epochs 10 --levers       # + one lever at a time, a table
    python -m benchmarks.train --epochs 10 --levers --write-docs   # also rewrite docs/benchmarks.md
"""
from __future__ import annotations

import dsdm  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch starts OpenMP)

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dsdm.config import ZooConfig
from dsdm.recipes import get_protocol
from dsdm.models import build_model
from dsdm.train import TrainRecipe, resolve_device, stack_networks, train_classifier, train_classifiers
from dsdm.recipes import zoo_recipe
from benchmarks.docs import replace_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
MARK = ("<!-- bench-train:start -->", "<!-- bench-train:end -->")
MNIST = {"channels": 1, "size": (28, 28), "classes": 10, "mean": (0.1307,), "std": (0.3081,)}
EVAL_IMAGES = 400  # IPC 10 x 10 classes x 4 tiles (factor 2)
BATCHED_NS = (1, 2, 5, 10)

# --levers: one change to the fast default per row (name, what changed, recipe fields)
LEVERS = [
    ("baseline", "today's loop: draws interleaved with steps, isfinite + .item() sync per step, DSA's strides",
     {"path": "baseline"}),
    ("fast, DSA's strides", "draws per epoch, one finiteness check per epoch; input as DSA returns it",
     {"memory_format": "as_is"}),
    ("fast (default)", "+ NCHW input (crop's channels_last strides made GroupNorm ~3x slower)", {}),
    ("fast, channels_last", "network input (and so every activation) channels_last", {"memory_format": "channels_last"}),
    ("fast + torch.compile", "network + loss compiled (compile time reported apart)", {"compile": True}),
]
# --bf16: the eval workload in bf16 against baseline and fast (name -> recipe fields)
BF16 = {"baseline": {"path": "baseline"}, "fast": {}, "bf16": {"precision": "bf16"},
        "bf16_channels_last": {"precision": "bf16", "memory_format": "channels_last"},
        "bf16_compiled": {"precision": "bf16", "compile": True}}


def images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, MNIST["channels"], *MNIST["size"]), generator=g).float().div_(255)
    return x, torch.arange(n) % MNIST["classes"]


def train_seconds(recipe: TrainRecipe, x, y, seeds: list[int], device, stacked: bool | None = None) -> float:
    """Wall seconds to train one network per seed (stacked=None: train_classifier one by one)."""
    models = [build_model("convnet3", MNIST["channels"], MNIST["classes"], MNIST["size"], s).to(device) for s in seeds]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    _sync(device)
    t = time.perf_counter()
    if stacked is None:
        for m, g in zip(models, gens):
            train_classifier(m, x, y, MNIST["mean"], MNIST["std"], recipe, g)
    else:
        train_classifiers(models, x, y, MNIST["mean"], MNIST["std"], recipe, gens, stacked=stacked)
    _sync(device)
    return time.perf_counter() - t


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def ab(recipes: dict[str, TrainRecipe], x, y, nets: int, device, per_net: bool = True) -> dict:
    """Time each recipe on `nets` networks, interleaved network by network; images*epochs/s each."""
    seconds = {k: 0.0 for k in recipes}
    load0 = os.getloadavg()[0]
    for s in range(nets):
        for name, r in recipes.items():
            seconds[name] += train_seconds(r, x, y, [s], device)
    work = nets * len(x) * next(iter(recipes.values())).epochs
    return {"ips": {k: work / v for k, v in seconds.items()}, "seconds": seconds,
            "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def warm_up(recipe: TrainRecipe, x, y, device) -> None:
    """One short run per path first: allocator, oneDNN primitives, lazy imports."""
    short = replace(recipe, epochs=1)
    for path in ("baseline", "fast"):
        train_seconds(replace(short, path=path), x[:2 * recipe.batch_size], y[:2 * recipe.batch_size], [0], device)


def eval_recipe(epochs: int) -> TrainRecipe:
    return get_protocol("dsdm").recipe("mnist", epochs)


def run(args) -> dict:
    device = resolve_device(args.device)
    fast_default = {"path": "fast"}  # the default TrainRecipe levers (compile off: see --levers)
    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "epochs": args.epochs}

    x, y = images(args.eval_images)
    x, y = x.to(device), y.to(device)
    rec = eval_recipe(args.epochs)
    warm_up(rec, x, y, device)
    r = ab({"baseline": replace(rec, path="baseline"), "fast": replace(rec, **fast_default)}, x, y, args.eval_nets, device)
    out["eval_convnet3"] = _row(r, args.eval_nets)
    _log(f"eval_convnet3: {out['eval_convnet3']}")

    zcfg = ZooConfig(snapshots=(args.epochs,))
    zx, zy = images(MNIST["classes"] * args.zoo_per_class, seed=1)
    zx, zy = zx.to(device), zy.to(device)
    zrec = zoo_recipe(zcfg, "mnist")
    r = ab({"baseline": replace(zrec, path="baseline"), "fast": replace(zrec, **fast_default)}, zx, zy,
           args.zoo_nets, device)
    out["zoo_convnet3"] = {**_row(r, args.zoo_nets), "images": len(zx), "batch_size": zrec.batch_size}
    _log(f"zoo_convnet3: {out['zoo_convnet3']}")

    # batched: one epoch on the first `batched_images` images is enough for a per-step ratio
    bx, by = x[:args.batched_images], y[:args.batched_images]
    brec = replace(rec, epochs=args.batched_epochs)
    out["batched"] = {}
    for n in [int(v) for v in args.batched_ns.split(",") if v.strip()]:
        seeds = list(range(n))
        load0 = os.getloadavg()[0]
        one = stacked = 0.0
        for _ in range(args.repeats):
            one += train_seconds(brec, bx, by, seeds, device, stacked=False)
            stacked += train_seconds(brec, bx, by, seeds, device, stacked=True)
        work = args.repeats * n * len(bx) * brec.epochs
        out["batched"][str(n)] = {"ratio": one / stacked, "one_by_one_ips": work / one, "stacked_ips": work / stacked,
                                  "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        _log(f"batched {n}: {out['batched'][str(n)]}")
    out["batched_default"] = stack_networks("auto", device)

    if args.bf16:
        out["eval_convnet3_bf16"] = bf16_rows(args, x, y, rec, device)
        _log(f"eval_convnet3_bf16: {out['eval_convnet3_bf16']}")
    if args.levers:
        out["levers"] = levers(args, x, y, rec, device)
    return {"train": out}


def compile_seconds(recipes: dict[str, TrainRecipe], x, y, device) -> dict[str, float]:
    """Seconds of the first, compiling run of each compiled recipe (one epoch: both batch sizes,
    64 and the last, smaller one), so the timed runs after it reuse the compiled code."""
    seconds = {}
    for name, r in recipes.items():
        if r.compile:
            t = time.perf_counter()
            train_seconds(replace(r, epochs=1), x, y, [0], device)
            seconds[name] = time.perf_counter() - t
    return seconds


def levers(args, x, y, rec: TrainRecipe, device) -> dict:
    """Each lever alone on the eval workload, interleaved; compile time measured apart."""
    recipes = {name: replace(rec, **opts) for name, _, opts in LEVERS}
    compile_s = compile_seconds(recipes, x, y, device)
    r = ab(recipes, x, y, args.lever_nets, device)
    base = r["ips"]["baseline"]
    return {name: {"ips": r["ips"][name], "ratio": r["ips"][name] / base,
                   "what": what, **({"compile_s": compile_s[name]} if name in compile_s else {})}
            for name, what, _ in LEVERS} | {"_load": r["load"], "_nets": args.lever_nets}


def bf16_rows(args, x, y, rec: TrainRecipe, device) -> dict:
    """The eval workload in bf16 (eager, channels_last, compiled) against baseline and fast fp32,
    interleaved network by network; ratios to the baseline; compile seconds apart."""
    recipes = {name: replace(rec, **opts) for name, opts in BF16.items()}
    compile_s = compile_seconds(recipes, x, y, device)
    r = ab(recipes, x, y, args.eval_nets, device)
    base = r["ips"]["baseline"]
    return {"ips": r["ips"], "ratio": {k: v / base for k, v in r["ips"].items()}, "compile_s": compile_s,
            "nets": args.eval_nets, "seconds": r["seconds"], "load": r["load"]}


def _row(r: dict, nets: int) -> dict:
    b, f = r["ips"]["baseline"], r["ips"]["fast"]
    return {"baseline_ips": b, "fast_ips": f, "ratio": f / b, "nets": nets,
            "seconds": r["seconds"], "load": r["load"]}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(result: dict, command: str) -> str:
    t = result["train"]
    lines = [f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')}); device {t['device']}, "
             f"{t['threads']} threads, {t['epochs']} epochs per network.\n",
             "| workload | networks | baseline img·ep/s | fast img·ep/s | speed-up | load avg |", "|---|---|---|---|---|---|"]
    for key in ("eval_convnet3", "zoo_convnet3"):
        r = t[key]
        lines.append(f"| {key} | {r['nets']} | {r['baseline_ips']:.0f} | {r['fast_ips']:.0f} | **{r['ratio']:.2f}x** | "
                     f"{r['load'][0]}-{r['load'][1]} |")
    lines += ["", "| N networks stacked (vmap) | one by one img·ep/s | stacked img·ep/s | stacked / one by one |",
              "|---|---|---|---|"]
    for n, r in t["batched"].items():
        lines.append(f"| {n} | {r['one_by_one_ips']:.0f} | {r['stacked_ips']:.0f} | {r['ratio']:.2f}x |")
    if "eval_convnet3_bf16" in t:
        b = t["eval_convnet3_bf16"]
        lines += ["", f"bf16 (`eval.precision=bf16`), eval workload, {b['nets']} networks interleaved; load "
                      f"{b['load'][0]}-{b['load'][1]}:", "", "| variant | img·ep/s | vs baseline |", "|---|---|---|"]
        for name in BF16:
            extra = f" (compile {b['compile_s'][name]:.0f} s, not included)" if name in b["compile_s"] else ""
            lines.append(f"| {name}{extra} | {b['ips'][name]:.0f} | {b['ratio'][name]:.2f}x |")
    if "levers" in t:
        lv = t["levers"]
        lines += ["", f"Levers, one at a time (eval workload, {lv['_nets']} networks, interleaved; load "
                      f"{lv['_load'][0]}-{lv['_load'][1]}):", "",
                  "| variant | what changed | img·ep/s | vs baseline |", "|---|---|---|---|"]
        for name, what, _ in LEVERS:
            r = lv[name]
            extra = f" (compile {r['compile_s']:.0f} s, not included)" if "compile_s" in r else ""
            lines.append(f"| {name} | {what}{extra} | {r['ips']:.0f} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs per network (default 2: the short form)")
    p.add_argument("--eval-nets", type=int, default=10)
    p.add_argument("--zoo-nets", type=int, default=4)
    p.add_argument("--zoo-per-class", type=int, default=40, help="zoo images per class (cpu budget: 300)")
    p.add_argument("--batched-images", type=int, default=128, help="images per epoch for the batched rows")
    p.add_argument("--batched-epochs", type=int, default=1)
    p.add_argument("--batched-ns", default=",".join(map(str, BATCHED_NS)), help="N networks stacked (default 1,2,5,10)")
    p.add_argument("--eval-images", type=int, default=EVAL_IMAGES, help="decoded images of the eval set (default 400)")
    p.add_argument("--repeats", type=int, default=1, help="A/B repeats of each batched row")
    p.add_argument("--levers", action="store_true", help="also time one lever at a time (eval workload)")
    p.add_argument("--bf16", action="store_true", help="also time the eval workload in bf16 (eager, compiled)")
    p.add_argument("--lever-nets", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--json", type=Path, help='write {"train": {...}} here')
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the training section of {DOC.name}")
    p.add_argument("--out", type=Path, default=DOC, help="markdown file for --write-docs")
    args = p.parse_args(argv)
    if min(args.epochs, args.eval_nets, args.zoo_nets, args.zoo_per_class, args.batched_images, args.repeats,
           args.eval_images) < 1:
        p.error("--epochs, --eval-nets, --eval-images, --zoo-nets, --zoo-per-class, --batched-images and --repeats "
                "must be >= 1")
    command = "python -m benchmarks.train " + " ".join(sys.argv[1:] if argv is None else argv)
    result = run(args)
    body = table(result, command.strip())
    print(body)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if args.write_docs:
        replace_section(args.out, MARK, body, "Classifier training (python -m benchmarks.train)")
        _log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
