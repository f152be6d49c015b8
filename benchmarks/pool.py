"""Zoo pre-training throughput through the Ray pool: 1 actor vs N actors, threads pinned.

    python -m benchmarks.pool --dataset mnist --data-root ../shared/data --models 4 --max-per-class 100

Prints models/minute for each pool size and the speed-up; with --write-docs the table replaces
its section of docs/benchmarks.md (or --out). Each actor holds `--actor-cpus` CPUs and pins torch to as
many threads, so actors do not fight over cores.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import ray

from dsdm.config import ZooConfig
from dsdm.data import load_dataset
from benchmarks.docs import replace_section
from tune.runner import start_ray
from tune.zoo import put_dataset, train_zoo_on_pool


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-root")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-per-class", type=int, default=100)
    p.add_argument("--actors", default="1,2", help="pool sizes to compare")
    p.add_argument("--actor-cpus", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    p.add_argument("--write-docs", action="store_true", help="replace the section in --out with this run's table")
    args = p.parse_args(argv)

    dataset = load_dataset(args.dataset, args.data_root, offline=True)
    cfg = ZooConfig(num_models=args.models, snapshots=(args.epochs,), max_per_class=args.max_per_class)
    sizes = [int(s) for s in args.actors.split(",")]
    start_ray(None, max(sizes) * args.actor_cpus)
    rows = []
    try:
        data_ref = put_dataset(dataset)
        for n in sizes:
            start = time.time()
            train_zoo_on_pool(data_ref, dataset, cfg, n, args.actor_cpus, progress=lambda msg: None)
            seconds = time.time() - start
            rows.append((n, seconds, 60 * args.models / seconds))
            print(f"{n} actor(s): {args.models} models in {seconds:.1f}s = {rows[-1][2]:.2f} models/min")
    finally:
        ray.shutdown()
    base = rows[0][2]
    table = [f"Machine: {platform.node()}, Ray {ray.__version__}\n",
             f"`python -m benchmarks.pool --dataset {args.dataset} --models {args.models} --epochs {args.epochs} "
             f"--max-per-class {args.max_per_class} --actors {args.actors} --actor-cpus {args.actor_cpus}`\n",
             "| actors | CPUs/actor | seconds | models/min | speed-up vs 1 |", "|---|---|---|---|---|"]
    table += [f"| {n} | {args.actor_cpus} | {s:.1f} | {r:.2f} | {r / base:.2f}x |" for n, s, r in rows]
    text = "\n".join(table) + "\n"
    print(text)
    if args.write_docs:
        replace_section(args.out, ("<!-- pool:begin -->", "<!-- pool:end -->"), text,
                        "Zoo pre-training through the Ray pool (`python -m benchmarks.pool`)")


if __name__ == "__main__":
    main()
