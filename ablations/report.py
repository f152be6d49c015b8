"""Sweep tables (markdown + parquet, each replaced whole by dsdm.io's writer) and plots in the style of
the paper's figures."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

from dsdm.config import Config  # noqa: E402
from dsdm.io import atomic_write, atomic_write_text  # noqa: E402


def budget_line(cfg: Config) -> str:
    z, d, e = cfg.zoo, cfg.distill, cfg.eval
    per_class = f"{z.max_per_class} img/class" if z.max_per_class else "the full training split"
    return (f"budget `{cfg.budget}`: zoo {z.num_models} ConvNets x snapshots {list(z.snapshots)} epochs on {per_class}; "
            f"{d.iterations} distillation iterations, {d.batch_real} real/class; "
            f"evaluation {e.epochs or 'protocol'} epochs ({e.protocol} protocol), {e.runs} nets per seed")


def fmt(mean: float, std: float) -> str:
    return "–" if mean != mean else f"{mean:.2f} ± {std:.2f}"


def fmt_ci(low: float, high: float) -> str:
    return "–" if low != low else f"{low:.2f} to {high:.2f}"


def protocol_line(cfg: Config) -> str:
    """The evaluation protocol by name and what it is (dsdm.evaluate.PROTOCOLS)."""
    from dsdm.recipes import get_protocol

    recipe = get_protocol(cfg.eval.protocol).recipe(cfg.data.dataset, cfg.eval.epochs)
    return (f"evaluation protocol `{cfg.eval.protocol}`: fresh ConvNet-3s, {recipe.epochs} epochs, batch "
            f"{recipe.batch_size}, lr {recipe.lr} x{recipe.gamma} at epochs {list(recipe.milestones)}, CutMix p "
            f"{recipe.cutmix_p}, DSA per sample; final-epoch accuracy")


PAPER_NAMES = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "svhn": "SVHN", "cifar10": "CIFAR-10",
               "cifar100": "CIFAR-100", "speechcommands": "Mini Speech Commands"}


def comparable(meta: dict) -> bool:
    """The paper's numbers are for this very dataset and IPC (else: another setting, shown for the trend)."""
    setting = meta.get("paper_setting")
    name = PAPER_NAMES.get(meta["dataset"], meta["dataset"])
    return not setting or setting.startswith(f"{name} IPC {meta['ipc']}")


def paper_column(meta: dict) -> str:
    setting = meta.get("paper_setting")
    return f"paper, {setting} (%)" if setting else "paper (%)"


def display_table(table, meta: dict):
    """The columns a reader wants: setting, ours, the paper's value next to it, val, n, time."""
    import pandas as pd

    out = pd.DataFrame()
    if table["group"].nunique() > 1:
        out["sweep"] = table["group"]
    out["setting"] = table["cell"]
    out["test acc (%)"] = [fmt(m, s) for m, s in zip(table["test_mean"], table["test_std"])]
    if "ci95_low" in table:
        out["95% CI of the mean"] = [fmt_ci(lo, hi) for lo, hi in zip(table["ci95_low"], table["ci95_high"])]
    if "delta" in table:  # Table 4: each row minus the previous one, paired
        out["Δ vs previous row (95% CI)"] = [
            "" if d != d else f"{d:+.2f} ({fmt_ci(lo, hi)})"
            for d, lo, hi in zip(table["delta"], table["delta_ci95_low"], table["delta_ci95_high"])]
        out["verdict"] = table["delta_verdict"]
    if table["paper"].notna().any():
        out[paper_column(meta)] = ["–" if p is None or p != p else f"{p:.1f}" for p in table["paper"]]
    # val: each trial reports its nets' mean, so a spread exists only across seeds
    out["val acc (%)"] = [fmt(m, s) if n > 1 else ("–" if m != m else f"{m:.2f}")
                          for m, s, n in zip(table["val_mean"], table["val_std"], table["val_n"])]
    out["nets (seeds x runs)"] = table["test_n"]
    out["trial time (s)"] = [f"{t:.0f}" for t in table["trial_s"]]
    if "distill_s" in table and table["distill_s"].notna().any():  # the phases of the trial time
        out["distil / eval (s)"] = [f"{d:.0f} / {e:.0f}" for d, e in zip(table["distill_s"], table["eval_s"])]
    if table["failed"].any():
        out["failed trials"] = table["failed"]
    if "session" in table:  # which invocation (1 = the first, 2 = the first --resume, ...) finished the cell
        out["session"] = table["session"]
    if any_reused(table):  # trials copied from another sweep's identical one
        out["reused (seed ← sweep/trial)"] = table["reused"]
    return out


def any_reused(table) -> bool:
    return "reused" in table and bool((table["reused"] != "").any())


def markdown(table, meta: dict) -> str:
    lines = [f"**{meta['sweep']}** on {meta['dataset']}, IPC {meta['ipc']}; {budget_line(meta['cfg'])}; "
             f"seeds {meta['seeds']}; zoo {meta['zoo']}; wall time {meta['wall_s']:.0f} s.",
             f"ConvNet-3 test accuracy, final epoch, mean ± std over seeds x evaluation nets, with the t-based "
             f"95% CI of the mean; {protocol_line(meta['cfg'])}. Seed s is every cell's distillation and evaluation "
             "seed (paired). val = the same nets on the held-out validation split (± over seeds); session = the "
             "invocation that finished the cell (2 and up: --resume).", *meta.get("notes", [])]
    if any_reused(table):
        lines.append("reused = trials whose exact config and seed another sweep under the same storage had already "
                     "finished on the same compute: their results were copied (a trial is bit-deterministic), not "
                     "re-run (their time is not in this table's); `--fresh` computes them.")
    if meta.get("command"):
        lines.append(f"Command: `{meta['command']}`")
    text = "\n".join(lines) + "\n\n" + display_table(table, meta).to_markdown(index=False) + "\n"
    return text + (f"\n{meta['verdict']}\n" if meta.get("verdict") else "")


def write_sweep(table, stem: Path, meta: dict, runs=None) -> dict[str, Path]:
    """stem.md, stem.parquet, stem.png and (given the per-network values) stem-runs.parquet,
    each replaced atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    cfg = meta["cfg"]
    frame = table.assign(sweep=meta["sweep"], dataset=meta["dataset"], ipc=meta["ipc"],
                         paper_setting=meta.get("paper_setting") or "", command=meta.get("command", ""),
                         protocol=cfg.eval.protocol, eval_epochs=cfg.eval.epochs, eval_runs=cfg.eval.runs,
                         seeds=",".join(map(str, meta["seeds"])), verdict_line=meta.get("verdict", ""))
    md = atomic_write_text(stem.with_suffix(".md"), markdown(table, meta))
    pq = atomic_write(stem.with_suffix(".parquet"), lambda fh: frame.to_parquet(fh, engine="pyarrow", index=False))
    png = atomic_write(stem.with_suffix(".png"), lambda fh: plot_sweep(table, fh, meta))
    files = {"md": md, "parquet": pq, "png": png}
    if runs is not None:
        files["runs"] = atomic_write(stem.with_name(f"{stem.name}-runs.parquet"),
                                     lambda fh: runs.to_parquet(fh, engine="pyarrow", index=False))
    return files


def plot_sweep(table, path, meta: dict):
    """One panel per group: accuracy vs x with 95% CI error bars like Figure 5, or bars; the
    paper's CIFAR-10 curve in a panel of its own (its shape, not its level, is comparable);
    the verdict line as the caption."""
    groups = list(dict.fromkeys(table["group"]))
    curve = meta.get("paper_curve")  # the paper's whole curve gets a panel of its own
    panels = len(groups) + bool(curve)
    width = max(6.4, 4.2 * panels)
    caption = textwrap.fill(meta.get("verdict", ""), width=int(18 * width))  # ~18 characters of 7 pt per inch
    lines = caption.count("\n") + 1 if caption else 0
    height = 3.4 + 0.13 * lines
    fig, axes = plt.subplots(1, panels, figsize=(width, height), squeeze=False)
    for ax, group in zip(axes[0], groups):
        rows = table[table["group"] == group]
        _panel(ax, rows, meta, group)
    if curve:
        xs, ys = zip(*sorted(curve.items()))
        ax = axes[0][-1]
        ax.plot(xs, ys, "s--", color="tab:gray")
        ax.set_xscale(table["xscale"].iloc[0])
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xticks([], minor=True)  # a log axis would label its minor ticks (3 x 10^0) between ours
        ax.set_xlabel(groups[0].split(" (")[0])  # the paper's own M/E, not ours
        ax.set_ylabel("paper's test accuracy (%)")
        ax.set_title(f"paper, {meta.get('paper_setting') or meta['dataset']}\n(for its shape only)", fontsize=9)
        ax.grid(alpha=0.3)
    cfg = meta["cfg"]
    fig.suptitle(f"{meta['sweep']}: {meta['dataset']} IPC {meta['ipc']} (budget {meta['budget']}, "
                 f"{cfg.eval.protocol} protocol, {cfg.eval.epochs or 'full'} epochs)", fontsize=10)
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.13 * lines / height + (0.02 if lines else 0), 1, 1))
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path


def ci_errors(rows) -> list:
    """Error bars from the 95% CI of the mean (none where it is undefined, n < 2)."""
    if "ci95_low" not in rows:
        return [rows["test_std"].fillna(0).tolist()] * 2
    return [(rows["test_mean"] - rows["ci95_low"]).fillna(0).tolist(),
            (rows["ci95_high"] - rows["test_mean"]).fillna(0).tolist()]


def _panel(ax, rows, meta: dict, group: str) -> None:
    numeric = rows["x"].notna().all()
    xs = list(rows["x"]) if numeric else list(range(len(rows)))
    err = ci_errors(rows)
    if numeric:
        ax.errorbar(xs, rows["test_mean"], yerr=err, marker="o", capsize=3, label="ours (95% CI)")
        ax.set_xscale(rows["xscale"].iloc[0])
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xticks([], minor=True)
        ax.set_xlabel(group or "setting")
    else:
        ax.bar(xs, rows["test_mean"], yerr=err, capsize=3, color="tab:blue", alpha=0.8, label="ours (95% CI)")
        ax.set_xticks(xs, list(rows["cell"]), rotation=20, ha="right", fontsize=8)
        finite = [v for v in rows["test_mean"] if v == v]
        if finite:
            low = min(finite) - max(err[0]) - 2
            ax.set_ylim(max(0.0, low), min(100.0, max(finite) + 3))
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    paper = [(x, p) for x, p in zip(xs, rows["paper"]) if p is not None and not math.isnan(p)]
    if paper and not meta.get("paper_curve"):
        target = ax if comparable(meta) else ax.twinx()
        target.plot(*zip(*paper), "s--", color="tab:gray", label=paper_column(meta).replace(" (%)", "")
                    + ("" if target is ax else ", shape only"))
        if target is not ax:
            target.set_ylabel(f"paper: {meta['paper_setting']} (%, own axis)", color="tab:gray")
            target.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)


def pivot_display(long, row_name: str):
    """Rows x IPC: 'IPC n' (ours, mean ± std) and 'paper IPC n' next to it where the paper has one."""
    import pandas as pd

    out = pd.DataFrame({row_name: list(dict.fromkeys(long["row"]))})
    for ipc in dict.fromkeys(long["ipc"]):
        part = long[long["ipc"] == ipc].set_index("row")
        out[f"IPC {ipc} (%)"] = [fmt(part.at[r, "test_mean"], part.at[r, "test_std"]) for r in out[row_name]]
        paper = [part.at[r, "paper"] for r in out[row_name]]
        if any(p is not None and p == p for p in paper):
            out[f"paper IPC {ipc}"] = ["–" if p is None or p != p else f"{p:.1f}" for p in paper]
    return out


def write_pivot(rows: list[dict], stem: Path, title: str, meta: dict[str, Any], row_name: str = "row") -> dict[str, Path]:
    """Rows x IPC columns (methods, cross-arch, speech): md + long-format parquet + a grouped bar plot."""
    import pandas as pd

    long = pd.DataFrame(rows)
    long["paper"] = pd.to_numeric(long["paper"], errors="coerce")
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"**{title}**; {budget_line(meta['cfg'])}; seeds {meta['seeds']}; wall time {meta['wall_s']:.0f} s.",
             "Mean ± std over seeds x evaluation nets, final epoch.", *meta.get("notes", [])]
    if meta.get("command"):
        lines.append(f"Command: `{meta['command']}`")
    text = "\n".join(lines) + "\n\n" + pivot_display(long, row_name).to_markdown(index=False) + "\n"
    frame = long.assign(budget=meta["cfg"].budget, wall_s=meta["wall_s"], command=meta.get("command", ""))
    md = atomic_write_text(stem.with_suffix(".md"), text)
    pq = atomic_write(stem.with_suffix(".parquet"), lambda fh: frame.to_parquet(fh, engine="pyarrow", index=False))
    png = atomic_write(stem.with_suffix(".png"), lambda fh: _pivot_plot(long, fh, title))
    return {"md": md, "parquet": pq, "png": png}


def _pivot_plot(long, path, title: str):
    """Grouped bars: one group per row, one bar per IPC; the paper's value as a black tick."""
    names, ipcs = list(dict.fromkeys(long["row"])), list(dict.fromkeys(long["ipc"]))
    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(names) * max(1, len(ipcs)) * 0.7, 3.6))
    width = 0.8 / max(1, len(ipcs))
    for j, ipc in enumerate(ipcs):
        part = long[long["ipc"] == ipc].set_index("row").reindex(names)
        xs = [i + (j - (len(ipcs) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, part["test_mean"], width, yerr=part["test_std"], capsize=2, label=f"IPC {ipc}")
        paper = [(x, p) for x, p in zip(xs, part["paper"]) if p == p]
        if paper:
            ax.scatter(*zip(*paper), marker="_", s=300, linewidths=2, color="black", zorder=3,
                       label="paper" if j == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path
