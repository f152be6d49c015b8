"""`python -m dsdm.bench --convrate` (or `python -m benchmarks.convrate`): the rate this CPU attains on
ConvNet-3's convolutions at the evaluation's shapes, and the project's loops' fraction of it.

Three tables, one thread by default (a sweep trial's `trial_cpus`), minimum over `--repeats` runs:

A. **The convolutions alone** (ConvNet-3's three, at the input shape of `--dataset`: 28x28x1 ->
   conv 1->128 at 32x32, 128->128 at 16x16 and at 8x8), fp32 and bf16, batch 64-512, NCHW and
   channels_last, forward (inference mode) and forward + backward (weight gradient; input gradient
   except the first layer, as in training). GFLOP/s of the three together = the attainable rate:
   what a loop would reach if everything but the convolutions were free.
B. **The whole ConvNet-3** (no augmentation): inference and one SGD step, eager and compiled, at
   batch 64 and 256: images/s and its conv GFLOP/s as a fraction of table A's at the same
   precision, batch and layout (the rest is GroupNorm, ReLU, pooling, the optimiser, Python).
C. **The project's loops**: the training loop (fast path, DSDM protocol: DSA + CutMix, batch 64 on
   400 images = MNIST IPC 10; batch 40 = the FashionMNIST IPC 1 set) and the final scoring passes
   (today's `accuracy` at batch 1024, joint at 256 eager and compiled), with the same fraction.

FLOPs are 2 x multiply-adds of the convolutions only (the linear layer and the norms are not
counted); backward = 2 x forward (1 x for the first layer: no input gradient).

    python -m dsdm.bench --convrate --json rate.json                  # ~8 min on 1 idle core (4 compiles)
    python -m dsdm.bench --convrate --no-compile --batches 64,256     # ~2 min
    python -m benchmarks.convrate --quick                             # seconds (tests)
"""
from __future__ import annotations

import dsdm  # noqa: F401  (OMP_WAIT_POLICY before torch)

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from dsdm.recipes import get_protocol
from dsdm.inference import score_networks
from dsdm.models import build_model
from dsdm.train import accuracy, train_classifier

DATASETS = {"mnist": (1, 28), "cifar10": (3, 32)}  # channels, size
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def conv_layers(channels: int, size: int) -> list[dict]:
    """ConvNet-3's convolutions with their input shapes (per image) and forward FLOPs per image."""
    net = build_model("convnet3", channels, 10, (size, size), 0)
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((m, tuple(i[0].shape[1:]), tuple(o.shape[1:]))))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(1, channels, size, size))
    for h in hooks:
        h.remove()
    return [{"conv": m, "in": i, "flops": 2 * o[0] * o[1] * o[2] * m.in_channels * m.kernel_size[0] * m.kernel_size[1],
             "first": k == 0} for k, (m, i, o) in enumerate(shapes)]


def net_flops(layers: list[dict], backward: bool) -> float:
    """Conv FLOPs per image: forward, or forward + backward (weight grad; input grad but for layer 1)."""
    return sum(l["flops"] * (1 + (1 if l["first"] else 2) * backward) for l in layers)


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN primitive creation, allocator, compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def conv_table(layers, batches, dtypes, formats, repeats) -> list[dict]:
    rows = []
    for dname in dtypes:
        for fname in formats:
            for b in batches:
                secs = {"forward": 0.0, "forward_backward": 0.0}
                for layer in layers:
                    conv = torch.nn.Conv2d(layer["conv"].in_channels, layer["conv"].out_channels, 3,
                                           padding=layer["conv"].padding).to(DTYPES[dname], memory_format=FORMATS[fname])
                    x = torch.randn(b, *layer["in"], dtype=DTYPES[dname]).contiguous(memory_format=FORMATS[fname])

                    def fwd():
                        with torch.inference_mode():
                            conv(x)

                    def fwd_bwd():
                        xi = x.detach().requires_grad_(not layer["first"])
                        conv(xi).sum().backward()
                    secs["forward"] += best_seconds(fwd, repeats)
                    secs["forward_backward"] += best_seconds(fwd_bwd, repeats)
                rows.append({"dtype": dname, "format": fname, "batch": b,
                             "forward_gflops": b * net_flops(layers, False) / secs["forward"] / 1e9,
                             "forward_backward_gflops": b * net_flops(layers, True) / secs["forward_backward"] / 1e9})
                _log(f"A {rows[-1]}")
    return rows


def attainable(conv_rows, dtype: str, batch: int, backward: bool, fmt: str = "nchw") -> float | None:
    """Table A's rate at this precision and layout, at the nearest batch measured."""
    rows = [r for r in conv_rows if r["dtype"] == dtype and r["format"] == fmt]
    if not rows:
        return None
    r = min(rows, key=lambda r: abs(r["batch"] - batch))
    return r["forward_backward_gflops" if backward else "forward_gflops"]


def net_table(layers, channels, size, batches, dtypes, compiled_modes, repeats, conv_rows) -> list[dict]:
    rows = []
    for dname in dtypes:
        for compiled in compiled_modes:
            for b in batches:
                for kind in ("inference", "train_step"):
                    net = build_model("convnet3", channels, 10, (size, size), 0)
                    x, y = torch.randn(b, channels, size, size), torch.arange(b) % 10
                    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
                    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dname == "bf16")

                    def infer(m):
                        with torch.inference_mode(), bf16:
                            return m(x)

                    def step(m):
                        with bf16:
                            loss = F.cross_entropy(m(x).float(), y)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    run = infer if kind == "inference" else step
                    model = torch.compile(net, dynamic=False) if compiled else net
                    if kind == "inference":
                        net.eval()
                    t0 = time.perf_counter()
                    run(model)  # the compile, if any
                    compile_s = time.perf_counter() - t0 if compiled else 0.0
                    s = best_seconds(lambda: run(model), repeats)
                    backward = kind == "train_step"
                    gflops = b * net_flops(layers, backward) / s / 1e9
                    ceiling = attainable(conv_rows, dname, b, backward)
                    rows.append({"dtype": dname, "compiled": compiled, "batch": b, "kind": kind, "images_per_s": b / s,
                                 "conv_gflops": gflops, "fraction": gflops / ceiling if ceiling else None,
                                 "compile_s": compile_s})
                    _log(f"B {rows[-1]}")
    return rows


def loop_table(layers, channels, size, repeats, conv_rows, compiled: bool, quick: bool) -> list[dict]:
    """The project's training loop and scoring passes on random pixels of the dataset's shape."""
    g = torch.Generator().manual_seed(0)
    mean, std = (0.5,) * channels, (0.25,) * channels
    rows = []
    epochs = 1 if quick else 4
    for images, what in ((400, "train loop, 400 images (MNIST IPC 10), batch 64"),
                         (40, "train loop, 40 images (FashionMNIST IPC 1), batch 40")):
        x = torch.rand(images if not quick else min(images, 80), channels, size, size, generator=g)
        y = torch.arange(len(x)) % 10
        rec = replace(get_protocol("dsdm").recipe("fashionmnist" if channels == 1 else "cifar10", epochs),
                      epochs=epochs * (10 if images == 40 and not quick else 1))

        def train():
            net = build_model("convnet3", channels, 10, (size, size), 0)
            train_classifier(net, x, y, mean, std, rec, torch.Generator().manual_seed(0))
        s = best_seconds(train, max(1, repeats - 1))
        work = len(x) * rec.epochs
        gflops = work * net_flops(layers, True) / s / 1e9
        ceiling = attainable(conv_rows, "fp32", min(64, len(x)), True)
        rows.append({"loop": what, "images_per_s": work / s, "conv_gflops": gflops,
                     "fraction": gflops / ceiling if ceiling else None})
        _log(f"C {rows[-1]}")
    n = 256 if quick else 2048
    vx, vy = torch.rand(n, channels, size, size, generator=g), torch.arange(n) % 10
    nets = [build_model("convnet3", channels, 10, (size, size), s) for s in range(2)]
    passes = [("scoring, today (accuracy, batch 1024, one network at a time)",
               lambda: [accuracy(m, vx, vy, mean, std) for m in nets]),
              ("scoring, joint eager (batch 256, networks over a shared batch)",
               lambda: score_networks(nets, {"v": (vx, vy)}, mean, std, 256))]
    if compiled:
        passes.append(("scoring, joint compiled (batch 256)",
                       lambda: score_networks(nets, {"v": (vx, vy)}, mean, std, 256, compiled=True)))
    for what, fn in passes:
        s = best_seconds(fn, repeats)
        work = n * len(nets)
        gflops = work * net_flops(layers, False) / s / 1e9
        ceiling = attainable(conv_rows, "fp32", 256, False)
        rows.append({"loop": what, "images_per_s": work / s, "conv_gflops": gflops,
                     "fraction": gflops / ceiling if ceiling else None})
        _log(f"C {rows[-1]}")
    return rows


def tables(result: dict, command: str) -> str:
    r = result["convrate"]
    out = [f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M')}); {r['threads']} thread(s), {r['dataset']} shapes, "
           f"conv FLOPs per image: forward {r['flops_forward'] / 1e6:.1f} M, forward + backward "
           f"{r['flops_forward_backward'] / 1e6:.1f} M; load average {r['load'][0]}-{r['load'][1]}.", "",
           "A. The convolutions alone (GFLOP/s of ConvNet-3's three together):", "",
           "| precision | layout | batch | forward | forward + backward |", "|---|---|---|---|---|"]
    out += [f"| {c['dtype']} | {c['format']} | {c['batch']} | {c['forward_gflops']:.0f} | {c['forward_backward_gflops']:.0f} |"
            for c in r["conv"]]
    out += ["", "B. The whole ConvNet-3 (no augmentation), NCHW:", "",
            "| precision | compiled | batch | pass | images/s | conv GFLOP/s | fraction of A |", "|---|---|---|---|---|---|---|"]
    out += [f"| {n['dtype']} | {'yes (%.0f s to compile)' % n['compile_s'] if n['compiled'] else 'no'} | {n['batch']} | "
            f"{n['kind']} | {n['images_per_s']:.0f} | {n['conv_gflops']:.0f} | {_pct(n['fraction'])} |" for n in r["net"]]
    out += ["", "C. The project's loops (fp32, NCHW):", "", "| loop | images/s | conv GFLOP/s | fraction of A |",
            "|---|---|---|---|"]
    out += [f"| {c['loop']} | {c['images_per_s']:.0f} | {c['conv_gflops']:.0f} | {_pct(c['fraction'])} |" for c in r["loops"]]
    return "\n".join(out)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=list(DATASETS), default="mnist", help="input shape (default mnist: 1x28x28)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="64,128,256,512")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--formats", default="nchw,channels_last")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip the compiled rows of tables B and C")
    p.add_argument("--quick", action="store_true", help="tiny: batch 8, fp32, NCHW, 1 repeat, no compile (tests)")
    p.add_argument("--device", default="cpu", help="cpu only (the GPU has its own check: scripts/device_check.sh)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("--device: this benchmark measures the CPU; use scripts/device_check.sh on a GPU")
    if args.quick:
        args.batches, args.dtypes, args.formats, args.repeats, args.no_compile = "8", "fp32", "nchw", 1, True
    torch.set_num_threads(args.threads)
    channels, size = DATASETS[args.dataset]
    layers = conv_layers(channels, size)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    dtypes = [d for d in args.dtypes.split(",") if d.strip()]
    formats = [f for f in args.formats.split(",") if f.strip()]
    load0 = os.getloadavg()[0]
    conv = conv_table(layers, batches, dtypes, formats, args.repeats)
    compiled_modes = [False] if args.no_compile else [False, True]
    net = net_table(layers, channels, size, [b for b in batches if b in (64, 256)] or batches[:1], dtypes,
                    compiled_modes, args.repeats, conv)
    loops = loop_table(layers, channels, size, args.repeats, conv, not args.no_compile, args.quick)
    result = {"convrate": {"dataset": args.dataset, "threads": torch.get_num_threads(), "conv": conv, "net": net,
                           "loops": loops, "flops_forward": net_flops(layers, False),
                           "flops_forward_backward": net_flops(layers, True),
                           "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}}
    command = "python -m dsdm.bench --convrate " + " ".join(sys.argv[1:] if argv is None else argv)
    print(tables(result, command.strip()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
