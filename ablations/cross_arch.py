"""`python -m ablations.cross_arch`: Table 3, DSDM sets distilled with ConvNet-3, evaluated on
ConvNet-3, ResNet-10 and DenseNet-121.

The DSDM cells run as a Tune grid (seeds); every finished set is then evaluated on the other
architectures as Ray tasks, one per network (tune/cross_arch.py, as tune.search does for its best
trial) and recorded in the trial's MLflow run. A resumed sweep skips sets already evaluated.
"""
from __future__ import annotations

import math
import sys

from ablations.cli import build_parser, cli, parse_ints, parse_seeds, sweep_session
from ablations.sweep import Cell, run_sweep
from ablations.report import PAPER_NAMES, write_pivot

OTHER_ARCHS = ("resnet10", "densenet121")
# Table 3 (CIFAR-10): arch -> {ipc: accuracy}; ConvNet-3 from Table 1
PAPER = {"convnet3": {10: 66.5, 50: 75.8}, "resnet10": {10: 63.7, 50: 70.8}, "densenet121": {10: 63.8, 50: 68.7}}


def evaluate_other_archs(out, args) -> dict[str, list[tuple[float, float, int]]]:
    """{arch: [(mean, std, nets) per trial]}: ConvNet-3 from the trials, the others as Ray tasks
    (tune.cross_arch, the search's driver), each recorded in its trial's run of THIS sweep."""
    from tune import cross_arch as xa
    from tune.zoo import put_dataset

    done = out.trials[out.trials["status"] == "DONE"]
    per_arch = {"convnet3": [(r["test_acc"], r["test_std"], len(r["test_runs"])) for _, r in done.iterrows()]}
    previous = out.recorder.cross_arch_results(OTHER_ARCHS)
    todo = done[~done["trial_id"].isin(previous)]
    sets = xa.put_sets(out.results, todo["trial_id"])
    eval_cfg = xa.eval_section(out.cfg)
    jobs = [xa.CrossArchJob(row["trial_id"], sets[row["trial_id"]], arch,
                            {**eval_cfg, "archs": [arch], "seed": int(row["seed"])})
            for _, row in todo.iterrows() for arch in OTHER_ARCHS]
    results = xa.run_cross_arch(jobs, put_dataset(out.dataset), args.trial_cpus, print, args.trial_gpus) if jobs else {}
    xa.record_cross_arch(out.recorder, out.parent_id, results)
    for _, row in done.iterrows():
        for arch in OTHER_ARCHS:
            if row["trial_id"] in previous:
                mean, std = previous[row["trial_id"]][arch]
                per_arch.setdefault(arch, []).append((mean, std, out.cfg.eval.runs))
            else:
                r = results[row["trial_id"]][arch]
                per_arch.setdefault(arch, []).append((r["mean"], r["std"], len(r["runs"])))
    return per_arch


def pooled(parts: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """Mean and sample std over all nets of several trials, from each trial's (mean, std, nets)."""
    n = sum(k for _, _, k in parts)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(m * k for m, _, k in parts) / n
    ss = sum((k - 1) * s * s + k * (m - mean) ** 2 for m, s, k in parts)
    return mean, math.sqrt(ss / (n - 1)) if n > 1 else 0.0, n


def run(args):
    ipcs = parse_ints(args.ipc, "--ipc")
    rows, outputs = [], {}
    setting = PAPER_NAMES.get(args.dataset, args.dataset)
    with sweep_session(args):
        for ipc in ipcs:
            paper = {"DSDM": PAPER["convnet3"].get(ipc)} if args.dataset == "cifar10" else {}
            out = run_sweep("cross_arch", [Cell("DSDM", {"distill.method": "dsdm"}, group="DSDM")], args,
                            {k: v for k, v in paper.items() if v}, paper_setting=f"{setting} IPC {ipc}", ipc=ipc,
                            stem=f"{args.dataset}-ipc{ipc}-convnet3")
            for arch, parts in evaluate_other_archs(out, args).items():
                mean, std, n = pooled(parts)
                ref = PAPER[arch].get(ipc) if args.dataset == "cifar10" else None
                rows.append({"row": arch, "ipc": ipc, "test_mean": mean, "test_std": std, "test_n": n, "paper": ref})
            outputs[ipc] = out
    first = outputs[ipcs[0]]
    meta = {"cfg": first.cfg, "seeds": parse_seeds(args.seeds), "wall_s": sum(o.wall_s for o in outputs.values()),
            "command": getattr(args, "command", ""),
            "notes": ["Sets distilled with ConvNet-3 (the zoo's architecture); the paper's column is CIFAR-10 "
                      "(Table 3) and appears only for --dataset cifar10."]}
    stem = args.results / "cross_arch" / f"{first.cfg.data.dataset}-ipc{'-'.join(map(str, ipcs))}"
    files = write_pivot(rows, stem, f"cross_arch on {first.cfg.data.dataset}: DSDM set, test accuracy (%) by "
                        "evaluation architecture", meta, row_name="architecture")
    print(files["md"].read_text())
    return {"outputs": outputs, "files": files}


def main(argv=None) -> int:
    return cli(run, build_parser("python -m ablations.cross_arch", __doc__), argv)


if __name__ == "__main__":
    sys.exit(main())
