"""`scripts/device_check.sh` (or `python -m benchmarks.device_check`): the GPU check, one table at the end.

Runs, each as its own process with a time limit (a phase that fails or runs out of time is a row
that says so; the table is always printed):

1. the tests that skip without CUDA (CUDA_TESTS, by file and `-k cuda`; no Ray/MLflow imports);
2. one evaluation cell per budget, today's scoring vs the joint default, N networks stacked
   (`benchmarks.evalcell`; `eval.batch_nets` is `auto`: stacked on CUDA);
3. `benchmarks.train`: classifier training, baseline vs fast, and N = 1, 2, 5, 10 networks stacked;
4. `benchmarks.distill`: s/iteration, fast and reference, at CIFAR-10 IPC 10 and IPC 50 shapes
   (random pixels: the benchmark never reads CIFAR);
5. zoo pre-training: model-epochs per second, stacked and one by one (`--worker zoo`, random
   CIFAR-10-shaped images);

and for each phase the peak GPU memory (nvidia-smi's used memory polled every 0.2 s, minus the
value before the phase; plus the allocator's peak where the benchmark reports it). Every phase's
output goes to `OUT/<phase>.log`, the numbers to `OUT/device_check.json`, the table to
`OUT/device_check.md` and stdout.

    bash scripts/device_check.sh                # about 5 minutes on one H200
    bash scripts/device_check.sh --quick        # about 2.5 minutes: fewer networks, IPC 10 only, no compile
    bash scripts/device_check.sh --dry-run      # CPU, tiny sizes: the suite runs this
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TESTS = ["tests/test_memory.py", "tests/test_inference.py"]  # files with tests that skip without CUDA

# per mode: the phases' command-line arguments and time limits (seconds); full fits 6 minutes on an H200
MODES = {
    "full": {
        "tests": ([], 45),
        "eval_cell": (["--cells", "resolve-fashionmnist-ipc1,cpu-mnist-ipc10"], 60),
        "train": (["--epochs", "2", "--batched-ns", "1,2,5,10"], 45),
        "distill_ipc10": (["--ipc", "10", "--iterations", "5"], 90),
        "distill_ipc50": (["--ipc", "50", "--iterations", "5"], 90),
        "zoo": (["--zoo-models", "10", "--zoo-epochs", "2", "--zoo-per-class", "500"], 30),
    },
    "quick": {
        "tests": ([], 45),
        "eval_cell": (["--cells", "resolve-fashionmnist-ipc1", "--epochs", "100"], 40),
        "train": (["--epochs", "1", "--eval-nets", "4", "--zoo-nets", "2", "--batched-ns", "1,5"], 30),
        "distill_ipc10": (["--ipc", "10", "--iterations", "3", "--compile", "off"], 60),
        "zoo": (["--zoo-models", "5", "--zoo-epochs", "1", "--zoo-per-class", "200"], 20),
    },
    "dry-run": {
        "tests": ([], 120),
        "eval_cell": (["--cells", "resolve-fashionmnist-ipc1", "--nets", "2", "--epochs", "1", "--score-images", "32",
                       "--data-root", "/nonexistent"], 120),
        "train": (["--epochs", "1", "--eval-nets", "1", "--eval-images", "20", "--zoo-nets", "1",
                   "--zoo-per-class", "2", "--batched-images", "8", "--batched-ns", "2"], 120),
        "distill_ipc1": (["--small", "--iterations", "1", "--ipc", "1"], 120),
        "zoo": (["--zoo-models", "2", "--zoo-epochs", "1", "--zoo-per-class", "4", "--zoo-size", "8"], 120),
    },
}
MODULES = {"tests": "pytest", "eval_cell": "benchmarks.evalcell", "train": "benchmarks.train",
           "distill": "benchmarks.distill", "zoo": "benchmarks.device_check"}  # phase name (before '_ipc') -> module


class GpuMemoryPoll:
    """Peak of nvidia-smi's used memory (MiB, GPU 0) while a phase runs; None without nvidia-smi."""

    def __init__(self):
        self.smi = shutil.which("nvidia-smi")
        self.peak = self.base = None
        self._stop = threading.Event()

    def _read(self) -> float | None:
        try:
            out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=5).stdout
            return float(out.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def __enter__(self):
        if self.smi:
            self.base = self.peak = self._read()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.2):
            v = self._read()
            if v is not None and (self.peak is None or v > self.peak):
                self.peak = v

    def __exit__(self, *exc):
        self._stop.set()
        if self.smi:
            self._thread.join(timeout=2)

    @property
    def mb(self) -> float | None:
        return None if self.peak is None or self.base is None else self.peak - self.base


def command(name: str, opts: list[str], device: str, out: Path) -> list[str]:
    """The phase's command line: pytest for the CUDA tests, else its benchmark module with --json."""
    if name == "tests":
        return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rs", "-k", "cuda",
                *CUDA_TESTS]
    module = MODULES[name.split("_ipc")[0]]
    worker = ["--worker", "zoo"] if name == "zoo" else []
    return [sys.executable, "-m", module, *worker, *opts, "--device", device, "--json", str(out / f"{name}.json")]


def run_phase(name: str, cmd: list[str], limit: float, out: Path) -> dict:
    """Run one phase's command with a time limit; its output to OUT/<name>.log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    print(f"device_check: {name}: {' '.join(cmd)} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
    t = time.perf_counter()
    with GpuMemoryPoll() as poll, open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=limit).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit:.0f} s"
    return {"status": status, "seconds": time.perf_counter() - t, "gpu_mb_smi": poll.mb}


def zoo_worker(args) -> int:
    """Model-epochs per second of zoo pre-training, stacked (zoo.batch_nets=on) and one by one."""
    import dsdm  # noqa: F401
    import torch

    from dsdm.config import ZooConfig
    from dsdm.data import Dataset
    from dsdm.train import resolve_device
    from dsdm.zoo import pretrain_group

    device = resolve_device(args.device)
    classes, size = 10, args.zoo_size
    g = torch.Generator().manual_seed(0)
    n = classes * args.zoo_per_class
    x = torch.randint(0, 256, (n, 3, size, size), generator=g).float().div_(255)
    y = torch.arange(n) % classes
    ds = Dataset("cifar10", "image", x, y, x[:100], y[:100], x[:100], y[:100], [str(c) for c in range(classes)],
                 (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    out = {"device": str(device), "models": args.zoo_models, "epochs": args.zoo_epochs, "images": n}
    for mode in ("on", "off"):
        cfg = ZooConfig(num_models=args.zoo_models, snapshots=(args.zoo_epochs,), max_per_class=0, batch_nets=mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        pretrain_group(ds, ZooConfig(num_models=1, snapshots=(1,), batch_nets=mode), [0], device)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        pretrain_group(ds, cfg, list(range(args.zoo_models)), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        s = time.perf_counter() - t
        key = "stacked" if mode == "on" else "one_by_one"
        out[key] = {"seconds": s, "model_epochs_per_s": args.zoo_models * args.zoo_epochs / s}
        if device.type == "cuda":
            out[key]["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt(v, spec=".0f") -> str:
    return "-" if v is None else format(v, spec)


def rows(results: dict, out: Path) -> list[list[str]]:
    """The table's rows: [phase, what, result, seconds, GPU MB (smi), allocator peak MB]."""
    table = []

    def add(phase, what, result, alloc=None):
        r = results[phase]
        table.append([phase, what, result if r["status"] == "ok" else f"{r['status']}; {result}",
                      f"{r['seconds']:.0f}", _fmt(r["gpu_mb_smi"]), _fmt(alloc)])

    log = (out / "tests.log").read_text() if (out / "tests.log").is_file() else ""
    summary = re.findall(r"^=* ?(\d+ (?:passed|failed|skipped|error|deselected).*?) in [\d.]+s", log, re.M)
    add("tests", f"pytest {' '.join(CUDA_TESTS)} -k cuda", summary[-1] if summary else "no summary line")

    cell = _json(out / "eval_cell.json").get("eval_cell", {})
    for name, c in cell.items():
        t, n = c.get("today", {}), c.get("new", {})
        if t and n:
            add("eval_cell", f"{name}: {c['nets']} nets x {c['epochs']} epochs, {c['device']}",
                f"today {t['cell_s']:.1f} s, joint {n['cell_s']:.1f} s: {n['cell_speedup']:.2f}x; accuracies "
                f"{'equal' if n['accuracies_equal_today'] else 'max diff %.2f' % n['max_acc_diff_vs_today']}",
                n["memory"].get("peak_cuda_mb"))
    if not cell:
        add("eval_cell", "evaluation cells", "no result")

    tr = _json(out / "train.json").get("train", {})
    if tr:
        e = tr["eval_convnet3"]
        add("train", "eval workload img·ep/s, baseline vs fast",
            f"{e['baseline_ips']:.0f} vs {e['fast_ips']:.0f} ({e['ratio']:.2f}x)")
        for k, b in tr.get("batched", {}).items():
            add("train", f"{k} networks stacked vs one by one", f"{b['stacked_ips']:.0f} vs {b['one_by_one_ips']:.0f} "
                f"img·ep/s ({b['ratio']:.2f}x)")
    else:
        add("train", "python -m benchmarks.train", "no result")

    for name in [k for k in results if k.startswith("distill")]:
        dist = _json(out / f"{name}.json")
        for key, paths in dist.items():
            if key.startswith("ipc") and {"fast", "straightforward"} <= set(paths):
                f, s = paths["fast"], paths["straightforward"]
                add(name, f"IPC {f['ipc']}: s/iteration fast{' (compiled)' if f['compiled'] else ''} vs reference",
                    f"{f['s_per_iter']:.3f} vs {s['s_per_iter']:.3f} ({s['s_per_iter'] / f['s_per_iter']:.1f}x)",
                    max(f.get("peak_device_mb", 0), s.get("peak_device_mb", 0)) or None)
        if not dist:
            add(name, "python -m benchmarks.distill", "no result")

    zoo = _json(out / "zoo.json")
    if zoo:
        st, one = zoo["stacked"], zoo["one_by_one"]
        add("zoo", f"{zoo['models']} ConvNet-3s x {zoo['epochs']} epochs on {zoo['images']} images",
            f"stacked {st['model_epochs_per_s']:.2f} vs one by one {one['model_epochs_per_s']:.2f} model-epochs/s",
            max(st.get("peak_allocated_mb", 0), one.get("peak_allocated_mb", 0)) or None)
    else:
        add("zoo", "zoo pre-training", "no result")
    return table


def markdown(table: list[list[str]], header: str) -> str:
    lines = [header, "", "| phase | what | result | s | peak GPU MB (nvidia-smi) | peak allocated MB |",
             "|---|---|---|---|---|---|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller phases (about half the time)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, seconds (the test suite)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "device_check_out"))
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--worker", choices=["zoo"], help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--zoo-models", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--zoo-epochs", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--zoo-per-class", type=int, default=500, help=argparse.SUPPRESS)
    p.add_argument("--zoo-size", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    if args.worker == "zoo":
        return zoo_worker(args)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    commands = {name: (command(name, opts, args.device, out), limit) for name, (opts, limit) in MODES[mode].items()}
    start = time.perf_counter()
    results = {name: run_phase(name, cmd, limit, out) for name, (cmd, limit) in commands.items()}
    header = (f"Device check ({mode}, device {args.device}, {time.strftime('%Y-%m-%d %H:%M')}): "
              f"{time.perf_counter() - start:.0f} s in all. Logs and JSON: {out}")
    body = markdown(rows(results, out), header)
    (out / "device_check.json").write_text(json.dumps({"mode": mode, "device": args.device, "phases": results,
                                                       "files": sorted(f.name for f in out.glob("*.json"))}, indent=1))
    (out / "device_check.md").write_text(body + "\n")
    print(body)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
