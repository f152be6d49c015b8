"""`python -m ablations.figures`: the paper's pictures for DM and DSDM sets on one dataset.

- Figure 4: validation accuracy vs distillation iteration (a proxy: one ConvNet-3 trained for a
  few epochs on the current set every `--proxy-every` iterations, run_trial's proxy_val_acc);
- Figure 7: t-SNE of real vs distilled embeddings of one class, for DM and DSDM, in zoo
  model 0's embedding at snapshot E;
- Figure 8: the distilled image grids.
DM and DSDM run as one Tune grid (like every sweep), so their sets and curves are also in MLflow.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ablations.cli import build_parser, cli, for_each_ipc  # noqa: E402
from ablations.sweep import Cell, common_overrides, run_sweep  # noqa: E402
from dsdm.config import make_config  # noqa: E402

CELLS = [Cell("DM", {"distill.method": "dm"}, group="method"), Cell("DSDM", {"distill.method": "dsdm"}, group="method")]


def accuracy_curves(out, path: Path, proxy_epochs: int) -> Path:
    """Figure 4: proxy validation accuracy vs iteration, mean over seeds, one line per method."""
    cell_of = dict(zip(out.trials["trial_id"], out.trials["cell"]))
    curves: dict[str, list] = {}
    for r in out.results:
        frame = r.metrics_dataframe
        if frame is None or "proxy_val_acc" not in frame:
            continue
        frame = frame.loc[frame["proxy_val_acc"].notna(), ["iteration", "proxy_val_acc"]]
        curves.setdefault(cell_of.get((r.metrics or {}).get("trial_id"), "?"), []).append(frame)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, parts in sorted(curves.items()):
        mean = pd.concat(parts).groupby("iteration")["proxy_val_acc"].mean()
        ax.plot(mean.index, mean.values, marker="o", label=label)
    ax.set_xlabel("distillation iteration")
    ax.set_ylabel(f"validation accuracy (proxy: {proxy_epochs} epochs)")
    ax.set_title(f"{out.cfg.data.dataset} IPC {out.cfg.distill.ipc} (budget {out.cfg.budget})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def class_embeddings(out, sets: dict, cls: int, max_real: int = 300):
    """Zoo model 0 at snapshot E embeds real images of `cls` and each set's decoded images of it."""
    from dsdm.coreset import embed_all
    from dsdm.zoo import ModelZoo

    ds, e = out.dataset, out.cfg.distill.pretrain_epochs
    net = ModelZoo.load(out.zoo_info["folder"]).model(0, e)
    real = ds.train_x[ds.class_indices()[cls][:max_real]]
    feats = {"real": embed_all(net, real, ds.mean, ds.std)}
    for label, synset in sets.items():
        x, y = synset.decoded()
        feats[label] = embed_all(net, x[y == cls], ds.mean, ds.std)
    return feats


def tsne_figure(feats: dict, path: Path, title: str) -> Path:
    """Figure 7: one panel per method; real (grey) and distilled (red) in a t-SNE fitted on both."""
    from sklearn.manifold import TSNE

    methods = [k for k in feats if k != "real"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 3.8), squeeze=False)
    for ax, label in zip(axes[0], methods):
        both = torch.cat([feats["real"], feats[label]]).numpy()
        perplexity = max(2.0, min(30.0, (len(both) - 1) / 3))
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(both)
        n = len(feats["real"])
        ax.scatter(xy[:n, 0], xy[:n, 1], s=6, c="tab:gray", alpha=0.5, label="real")
        ax.scatter(xy[n:, 0], xy[n:, 1], s=40, c="tab:red", marker="*", label=f"{label} (decoded)")
        ax.set_title(label)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_figures(args, ipc: int) -> dict[str, Path]:
    from dsdm.visualize import save_grid
    from tune.cross_arch import put_sets
    from tune.trainable import proxy_epochs_default

    base = make_config(args.budget, common_overrides(args, ipc))
    log = base.distill.log_every  # run_trial computes the proxy only at its report iterations
    every = args.proxy_every or max(1, base.distill.iterations // 5)
    every = max(log, -(-every // log) * log) if base.distill.iterations >= log else every
    proxy_epochs = args.proxy_epochs or proxy_epochs_default(base.eval.epochs)
    out = run_sweep("figures", CELLS, args, {}, ipc=ipc, proxy_every=every, proxy_epochs=proxy_epochs)
    stem = Path(args.results) / "figures" / f"{out.cfg.data.dataset}-ipc{ipc}"
    import ray

    done = out.trials[out.trials["status"] == "DONE"].sort_values("seed")
    first = {label: done[done["cell"] == label]["trial_id"].iloc[0]
             for label in ("DM", "DSDM") if (done["cell"] == label).any()}
    refs = put_sets(out.results, first.values())  # through the storage, as the cross-arch phase reads them
    sets = {label: ray.get(refs[trial_id]) for label, trial_id in first.items()}
    files = {f"grid-{k.lower()}": save_grid(s, f"{stem}-grid-{k.lower()}.png", class_names=out.dataset.class_names)
             for k, s in sets.items()}
    files["curve"] = accuracy_curves(out, Path(f"{stem}-curve.png"), proxy_epochs)
    cls = args.tsne_class
    feats = class_embeddings(out, sets, cls)
    files["tsne"] = tsne_figure(feats, Path(f"{stem}-tsne.png"),
                                f"{out.cfg.data.dataset} class '{out.dataset.class_names[cls]}': real vs distilled "
                                f"(zoo model 0, E={out.cfg.distill.pretrain_epochs})")
    for name, path in files.items():
        print(f"{name}: {path}")
    return files


def parser():
    p = build_parser("python -m ablations.figures", __doc__)
    p.add_argument("--proxy-every", type=int, default=0, help="iterations between proxy accuracies (default: 5 points)")
    p.add_argument("--proxy-epochs", type=int, default=0, help="epochs of the proxy ConvNet-3 (default: eval epochs / 10)")
    p.add_argument("--tsne-class", type=int, default=0, help="class shown in the t-SNE")
    return p


def run(args):
    return for_each_ipc(args, lambda ipc: make_figures(args, ipc))


def main(argv=None) -> int:
    return cli(run, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
