"""`python -m benchmarks.distill`: seconds per DSDM iteration, fast path vs the straightforward one.

A development tool of the repository (not installed with dsdm); run it from the repository root
(`python -m dsdm.bench` forwards here). Times both paths of `dsdm.distill.Distiller` at CIFAR-10
shapes (3x32x32, 10 classes, 256 real images per class, factor 2, ConvNet-3, d = 2048, lambda2 > 0
so the memory bank runs from the first iteration) on random images and a zoo of random-init
ConvNet-3s (timing does not depend on the weights), each path in its own process (so peak memory
is its own), and prints a table:

- straightforward: `distill.fast=False` - per class a fresh real batch and augmentation draw,
  real + synthetic forward, one optimiser step per class, then a separate memory-bank forward;
- fast: `distill.fast=True` (the default of `dsdm distill`) - real features cached per
  (zoo model, draw), all classes in one synthetic forward, batched losses, the per-class steps
  replayed from that one forward, bank prototypes reused; `distill.compile=auto` compiles it at
  this run length (10K iterations).

Only steady-state iterations are timed: the fast path's cache is filled first (its cost is
reported per entry and amortised over a 10K-iteration run with K draws x M models) and the
first iterations (torch.compile) are reported apart. s/iteration is the minimum over the timed
iterations (the machine is shared; the median and CPU seconds are printed too). It prints the
tables; only `--write-docs` rewrites their sections of docs/benchmarks.md (or `--out`).

    python -m benchmarks.distill                          # IPC 10 and 50, prints the tables
    python -m benchmarks.distill --write-docs             # ... and rewrites docs/benchmarks.md
    python -m benchmarks.distill --levers                 # the fast path with one lever changed at a time
    python -m benchmarks.distill --iterations 3 --ipc 10 --json bench.json
    python -m benchmarks.distill --small --iterations 1 --ipc 1   # seconds (tests)
"""
from __future__ import annotations

import dsdm  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch starts OpenMP)

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.docs import replace_section

PAPER_ITERATIONS = 10_000
PAPER_MODELS, PAPER_DRAWS = 10, 16  # M and K of a paper-budget run: the cache fill is amortised over these
ROOT = Path(__file__).resolve().parents[1]  # the repository
DOC = ROOT / "docs" / "benchmarks.md"
MARK = ("<!-- bench:start -->", "<!-- bench:end -->")
LEVER_MARK = ("<!-- bench-levers:start -->", "<!-- bench-levers:end -->")

# shapes: CIFAR-10 (the unit of work) and a tiny one for tests
SHAPES = {
    "cifar10": {"classes": 10, "channels": 3, "size": 32, "per_class": 256, "batch_real": 256},
    "small": {"classes": 4, "channels": 3, "size": 16, "per_class": 24, "batch_real": 16},
}

# --levers: (name, what changes, distill.* overrides). A-D is the ladder from the fast path as
# first written to the default, one lever per row; the rest change one setting of C (eager) or D.
ALL = 1_000_000  # forward_chunk larger than any batch: one forward of all decoded images
DEFAULT_LEVER = "D. C + torch.compile = default"
LEVERS = [
    ("A. fast path as first written", "eager, DSA's channels_last output fed to the net, one forward of all "
     "decoded images", {"compile": "off", "nchw_input": False, "forward_chunk": ALL}),
    ("B. A + NCHW input", "distill.nchw_input: the synthetic batch copied to NCHW strides before the net",
     {"compile": "off", "forward_chunk": ALL}),
    ("C. B + chunks of 40 images", "distill.forward_chunk=auto (40 on CPU) instead of one forward", {"compile": "off"}),
    (DEFAULT_LEVER, "distill.compile=auto (on at 10K iterations)", {}),
    ("D without chunks", "compiled, one forward of all decoded images", {"forward_chunk": ALL}),
    ("C + per-class loss loop", "distill.batched_loss=false: the loss formula class by class instead of one bmm",
     {"compile": "off", "batched_loss": False}),
    ("C + separate bank forward", "distill.bank_forward: an extra no-grad synthetic forward (new draw) for the "
     "memory bank after the step, as the reference does", {"compile": "off", "bank_forward": True}),
    ("C + bf16 autocast", "distill.precision=bf16, eager", {"compile": "off", "precision": "bf16"}),
    ("D + bf16 autocast", "distill.precision=bf16, compiled", {"precision": "bf16"}),
    ("D + bf16 cache storage", "distill.cache_dtype=bfloat16", {"cache_dtype": "bfloat16"}),
    ("D + refresh every use", "distill.aug_refresh=1: a new real batch and draw every iteration (one cache fill each)",
     {"aug_refresh": 1}),
    ("D + one joint step", "distill.per_class_step=false: one step on the summed loss", {"per_class_step": False}),
]


# --- the workload ----------------------------------------------------------------------------

def bench_dataset(shape: dict, seed: int = 0):
    """Random 8-bit images in [0, 1] at the given shape, `per_class` training images per class."""
    from dsdm.data import Dataset

    g = torch.Generator().manual_seed(seed)
    C, ch, s = shape["classes"], shape["channels"], shape["size"]
    n = C * shape["per_class"]
    x = torch.randint(0, 256, (n, ch, s, s), generator=g).float().div_(255)
    y = torch.arange(C).repeat_interleave(shape["per_class"])
    small_x, small_y = x[::shape["per_class"]].clone(), y[::shape["per_class"]].clone()  # tiny val/test
    return Dataset("bench", "image", x, y, small_x, small_y, small_x, small_y, [str(c) for c in range(C)],
                   (0.4914, 0.4822, 0.4465)[:ch], (0.2023, 0.1994, 0.2010)[:ch])


def bench_zoo(dataset, models: int):
    """`models` random-init ConvNet-3s as a zoo with one snapshot (epoch 1)."""
    from dsdm.models import build_model
    from dsdm.zoo import ModelZoo

    zoo = ModelZoo("convnet3", dataset.name, dataset.channels, dataset.num_classes, dataset.image_size, {})
    for m in range(models):
        net = build_model("convnet3", dataset.channels, dataset.num_classes, dataset.image_size, seed=m)
        zoo.add({"snapshots": {1: net.state_dict()}, "test_acc": {1: 0.0}})
    return zoo


def bench_config(shape: dict, ipc: int, fast: bool, models: int, draws: int, opts: dict):
    """The benchmark's config; `opts` are distill.* settings (the levers) applied on top."""
    from dsdm.config import make_config

    over = {"distill.ipc": ipc, "distill.factor": 2, "distill.batch_real": shape["batch_real"],
            "distill.num_models": models, "distill.pretrain_epochs": 1, "zoo.num_models": models,
            "zoo.snapshots": (1,), "distill.lambda2": 0.2, "distill.warmup": 0, "distill.per_class_step": True,
            "distill.fast": fast, "distill.aug_pool": draws, "distill.iterations": PAPER_ITERATIONS}
    return make_config("paper", {**over, **{f"distill.{k}": v for k, v in opts.items()}})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_worker(path: str, ipc: int, iterations: int, shape_name: str, models: int, draws: int,
               device_name: str, opts: dict) -> dict:
    """Time `iterations` steady-state iterations of one path; returns a JSON-able dict."""
    import dsdm.distill as dd
    from dsdm.train import resolve_device

    device = resolve_device(device_name)
    shape = SHAPES[shape_name]
    dataset = bench_dataset(shape)
    zoo = bench_zoo(dataset, models)
    fast = path == "fast"
    cfg = bench_config(shape, ipc, fast, models, draws, opts)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    distiller = dd.Distiller(dataset, cfg, zoo, device)
    out = {"path": path, "ipc": ipc, "device": str(device), "machine": machine(), "threads": torch.get_num_threads(),
           "compiled": bool(distiller.compiled), "options": opts}
    if fast:  # fill every (model, draw) entry first: steady state is what 10K iterations see
        cpu0 = time.process_time()
        for m in range(models):
            net = distiller._nets.setdefault(m, zoo.model(m, 1, device))
            for k in range(draws):
                distiller.cache.get(m, k, net)
        c = distiller.cache
        per_entry = c.fill_seconds / max(c.fills, 1)
        entry_bytes = c.nbytes / max(len(c.entries), 1)
        out["cache"] = {"entries": len(c.entries), "fill_s_per_entry": per_entry, "mb_per_entry": entry_bytes / 2**20,
                        "fill_cpu_s_per_entry": (time.process_time() - cpu0) / max(c.fills, 1),
                        "paper_entries": PAPER_MODELS * PAPER_DRAWS,
                        "paper_fill_s": per_entry * PAPER_MODELS * PAPER_DRAWS,
                        "paper_fill_s_per_iter": per_entry * PAPER_MODELS * PAPER_DRAWS / PAPER_ITERATIONS,
                        "paper_cache_gb": entry_bytes * PAPER_MODELS * PAPER_DRAWS / 2**30}
    warmup = 2 if fast else 1  # first fast iteration compiles; the first reference one warms the allocator
    firsts = []
    for _ in range(warmup):
        _sync(device)
        t = time.perf_counter()
        distiller.step()
        _sync(device)
        firsts.append(time.perf_counter() - t)
    walls, cpus = [], []
    load_before = os.getloadavg()
    for _ in range(iterations):
        _sync(device)
        w, c = time.perf_counter(), time.process_time()
        distiller.step()
        _sync(device)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    shape_imgs = dataset.num_classes * (shape["batch_real"] + ipc * 4)  # real + decoded synthetic per iteration
    best = min(walls)
    out.update({
        "s_per_iter": best, "s_per_iter_median": statistics.median(walls), "s_per_iter_all": walls,
        "cpu_s_per_iter": min(cpus), "images_per_s": shape_imgs / best,
        "first_iters_s": firsts, "compile_s": max(firsts[0] - best, 0.0) if distiller.compiled else 0.0,
        "loadavg": [round(v, 2) for v in load_before] + [round(v, 2) for v in os.getloadavg()],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    if device.type == "cuda":
        out["peak_device_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if fast:
        out["cache"]["fills_while_timed"] = distiller.cache.fills - out["cache"]["entries"]
    return out


# --- the driver ------------------------------------------------------------------------------

def _spawn(args, path: str, ipc: int, opts: dict) -> dict:
    if args.in_process:
        return run_worker(path, ipc, args.iterations, args.shape, args.models, args.draws, args.device, opts)
    cmd = [sys.executable, "-m", "benchmarks.distill", "--worker", path, "--ipc", str(ipc),
           "--iterations", str(args.iterations), "--models", str(args.models), "--draws", str(args.draws),
           "--device", args.device, "--options", json.dumps(opts)] + (["--small"] if args.shape == "small" else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks.distill: the {path} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; Python {platform.python_version()}")


def table(results: dict) -> str:
    lines = ["| IPC | path | s/iteration (min) | median | CPU s/iteration | images/s | peak RSS MB | first iterations s | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, paths in results.items():
        ref, fast = paths["straightforward"], paths["fast"]
        for name, r in (("straightforward", ref), ("fast", fast)):
            ratio = f"**{ref['s_per_iter'] / r['s_per_iter']:.2f}x**" if name == "fast" else "1x"
            mem = f"{r['peak_rss_mb']:.0f}" + (f" (GPU {r['peak_device_mb']:.0f})" if "peak_device_mb" in r else "")
            lines.append(f"| {r['ipc']} | {name}{' (compiled)' if r['compiled'] else ''} | {r['s_per_iter']:.3f} | "
                         f"{r['s_per_iter_median']:.3f} | {r['cpu_s_per_iter']:.2f} | {r['images_per_s']:.0f} | {mem} | "
                         f"{' / '.join(f'{t:.1f}' for t in r['first_iters_s'])} | {ratio} |")
    return "\n".join(lines)


def notes(results: dict) -> str:
    out = []
    for key, paths in results.items():
        ref, fast = paths["straightforward"], paths["fast"]
        c = fast["cache"]
        amort = fast["s_per_iter"] + c["paper_fill_s_per_iter"] + fast["compile_s"] / PAPER_ITERATIONS
        out.append(f"- IPC {fast['ipc']}: cache fill {c['fill_s_per_entry']:.2f} s ({c['fill_cpu_s_per_entry']:.2f} CPU s) "
                   f"per (model, draw) entry "
                   f"({c['mb_per_entry']:.1f} MB each); a paper run (M={PAPER_MODELS}, K={PAPER_DRAWS}: "
                   f"{c['paper_entries']} entries, {c['paper_cache_gb']:.2f} GB) fills it in {c['paper_fill_s']:.0f} s "
                   f"= {c['paper_fill_s_per_iter']:.3f} s/iteration over {PAPER_ITERATIONS} iterations; compile "
                   f"{fast['compile_s']:.0f} s. Fast path with both amortised: {amort:.3f} s/iteration, "
                   f"{ref['s_per_iter'] / amort:.2f}x. 10K iterations: straightforward "
                   f"{ref['s_per_iter'] * PAPER_ITERATIONS / 3600:.1f} h, fast {amort * PAPER_ITERATIONS / 3600:.1f} h. "
                   f"Load average during the timed iterations: straightforward {ref['loadavg'][0]}-{ref['loadavg'][3]}, "
                   f"fast {fast['loadavg'][0]}-{fast['loadavg'][3]}.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=5, help="timed steady-state iterations per path (default 5)")
    p.add_argument("--ipc", default="10,50", help="comma-separated IPCs (default 10,50)")
    p.add_argument("--models", type=int, default=2, help="M random-init zoo models (steady-state cost does not depend on it)")
    p.add_argument("--draws", type=int, default=2, help="K augmentation draws cached per model (ditto)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--compile", choices=["auto", "on", "off"], default=None,
                   help="distill.compile of the fast path (default auto: compiled, as a 10K-iteration run; off with --small)")
    p.add_argument("--small", action="store_true", help="tiny shapes (4 classes, 3x16x16, 16 real per class): seconds, for tests")
    p.add_argument("--levers", action="store_true", help="also time the fast path with one lever changed at a time (IPC 10)")
    p.add_argument("--json", type=Path, help='write {"ipc10": {"fast": {...}, "straightforward": {...}}, ...} here')
    p.add_argument("--write-docs", action="store_true", help="rewrite the tables' sections of the markdown file (--out)")
    p.add_argument("--out", type=Path, default=DOC, help="markdown file --write-docs rewrites (default docs/benchmarks.md)")
    p.add_argument("--in-process", action="store_true", help="run the paths in this process (default with --small)")
    p.add_argument("--worker", choices=["fast", "straightforward"], help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = "small" if args.small else "cifar10"
    args.in_process = args.in_process or args.small
    ipcs = [int(v) for v in str(args.ipc).split(",") if v.strip()]
    if args.worker:
        print(json.dumps(run_worker(args.worker, ipcs[0], args.iterations, args.shape, args.models, args.draws,
                                    args.device, json.loads(args.options))))
        return 0
    if args.iterations < 1 or not ipcs or min(ipcs) < 1:
        p.error("--iterations and every --ipc must be >= 1")

    compile_mode = args.compile or ("off" if args.small else "auto")
    base = {} if compile_mode == "auto" else {"compile": compile_mode}
    results: dict[str, dict] = {}
    for ipc in ipcs:
        results[f"ipc{ipc}"] = {}
        for path in ("straightforward", "fast"):
            print(f"timing {path} at IPC {ipc} ...", file=sys.stderr, flush=True)
            results[f"ipc{ipc}"][path] = _spawn(args, path, ipc, base)
    shape = SHAPES[args.shape]
    header = (f"Machine: {machine()}.\n\nShapes: {shape['classes']} classes, {shape['channels']}x{shape['size']}x{shape['size']}, "
              f"{shape['batch_real']} real images per class, factor 2, ConvNet-3, lambda2 > 0 (memory bank every iteration), "
              f"{args.iterations} timed iterations per path.\n\nCommand: `python -m benchmarks.distill "
              f"{' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip() + f" ({time.strftime('%Y-%m-%d %H:%M')})")
    body = header + "\n\n" + table(results) + "\n\n" + notes(results)
    print(body)

    lever_rows = []
    if args.levers:
        for name, what, opts in LEVERS:
            print(f"timing lever: {name} ...", file=sys.stderr, flush=True)
            r = _spawn(args, "fast", ipcs[0], {**base, **opts})
            lever_rows.append((name, what, r))
        r0 = next(r for name, _, r in lever_rows if name == DEFAULT_LEVER)["s_per_iter"]
        lines = [f"IPC {ipcs[0]}, fast path; each row changes one thing. Same machine and command as above.\n",
                 "| variant | what changed | s/iteration (min) | median | CPU s/iteration | vs default |", "|---|---|---|---|---|---|"]
        for name, what, r in lever_rows:
            lines.append(f"| {name} | {what} | {r['s_per_iter']:.3f} | {r['s_per_iter_median']:.3f} | "
                         f"{r['cpu_s_per_iter']:.2f} | {r['s_per_iter'] / r0:.2f}x |")
        lever_body = "\n".join(lines)
        print(lever_body)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(results)
        if lever_rows:
            payload["levers"] = {name: r for name, _, r in lever_rows}
        args.json.write_text(json.dumps(payload, indent=1))
    if args.write_docs:
        replace_section(args.out, MARK, body, "Seconds per iteration (python -m benchmarks.distill)")
        if lever_rows:
            replace_section(args.out, LEVER_MARK, lever_body, "Levers, one at a time (python -m benchmarks.distill --levers)")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
