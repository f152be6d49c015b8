"""`python -m dsdm pretrain | distill | evaluate | show | export` — the library without Ray.

Every command builds one `Config` (defaults < method preset < --budget < flags/--set),
prints a short result, and maps a `DsdmError` to one line on stderr and exit code 2.
Why one file over 350 lines: eight subcommands of a few lines each, sharing one parser builder.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from dsdm.config import BUDGETS, Config, make_config, parse_set_pairs, zoo_covering
from dsdm.errors import DsdmError
from dsdm.phases import PhaseClock


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default; flags without one (None, off) and defaults the help names stay as
    written; descriptions and epilogs keep their paragraphs (wrapped by `paragraphs`)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# --- help texts shared by every command (dsdm, tune.search, the sweeps) --------------------------
BUDGET_HELP = ("preset of iterations, epochs and zoo size; leaving --budget out means paper, the paper's "
               "settings, sized for a GPU (hours per run); cpu = minutes on a CPU, resolve = sweeps sized to "
               "resolve their effects on 2 cores (hours), smoke = seconds, numbers meaningless")
DATASET_HELP = "digits (ships offline), mnist, fashionmnist, svhn, cifar10, cifar100 or speechcommands"
SET_HELP = "set any config key for this run, e.g. --set distill.lr_img=0.05 (repeatable; the keys are listed below; default: none)"


def paragraphs(*texts: str, width: int = 100) -> str:
    """Texts as wrapped paragraphs (for a RawDescription help)."""
    import textwrap

    return "\n\n".join(textwrap.fill(" ".join(t.split()), width) for t in texts if t)


def config_keys_help() -> str:
    """The keys --set accepts, grouped by section, each with its value under --budget paper."""
    import textwrap

    from dsdm.config import make_config

    sections: dict[str, list[str]] = {}
    for key, value in make_config("paper", {}).plain().items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, []).append(f"{name}={value}")
    lines = ["config keys for --set SECTION.KEY=VALUE (their values under --budget paper; a budget or flag may "
             "change them):"]
    for section, items in sections.items():
        lines.append(textwrap.fill(f"{section}: " + ", ".join(items), 100, initial_indent="  ",
                                   subsequent_indent="    "))
    return "\n".join(lines)


class CheckpointedInterrupt(KeyboardInterrupt):
    """An interrupt during distillation, which checkpoints (OUT.ckpt): the rerun resumes from there."""


def line_buffered() -> None:
    """Each line out as it is printed, also into a file or a CI log (Python block-buffers a redirected
    stdout, so progress would arrive minutes late)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def default_cache() -> Path:
    return Path(os.environ.get("DSDM_CACHE", Path.home() / ".cache" / "dsdm"))


# --- argument groups ---------------------------------------------------------------------
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help=DATASET_HELP + " (default: digits)")
    p.add_argument("--data-root", help="dataset folder (default $DSDM_DATA, else ./data)")
    p.add_argument("--offline", action="store_true", help="never download; fail if files are missing (default: off)")
    p.add_argument("--budget", default="paper", choices=list(BUDGETS), help=BUDGET_HELP)
    p.add_argument("--seed", type=int, help="seed of distillation and evaluation (default: the config's, 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--cache", type=Path, default=None, help="where pre-trained zoos are kept (default $DSDM_CACHE or ~/.cache/dsdm)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)


def _eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="comma-separated: convnet3,resnet10,densenet121 (default: the budget's eval.archs, listed below)")
    p.add_argument("--runs", type=int, help="fresh networks per architecture (default: the budget's eval.runs, listed below)")
    p.add_argument("--epochs", type=int, help="training epochs per network (default: the protocol's)")
    p.add_argument("--protocol", choices=["dsdm", "dsdm-uniform", "dm"],
                   help="evaluation recipe (dsdm.recipes.PROTOCOLS; default dsdm: the official one per dataset)")
    p.add_argument("--json", type=Path, help="also write the results here as JSON (default: none)")


def _budget(key: str) -> str:
    return f"(default: the budget's {key}, listed below)"


DESCRIPTIONS = {
    None: "Distil a labelled dataset into a few synthetic images per class with DSDM, without Ray: pre-train a "
          "zoo, distil, evaluate on fresh networks, or draw a set. Each command builds one config (defaults < "
          "method preset < --budget < flags and --set) and prints a short result; bad input gets one line and "
          "exit code 2. Run `python -m dsdm COMMAND --help` for a command's flags.",
    "pretrain": "Pre-train a zoo of M networks on the real data and keep snapshots at chosen epochs, the models "
                "DSDM matches features against.",
    "distill": "Distil the dataset into --ipc stored images per class with DSDM (or DM, or pick a coreset), "
               "pre-training and caching the zoo it needs unless --zoo gives one; an interrupted run resumes "
               "from its checkpoint when rerun.",
    "evaluate": "Train fresh networks on a distilled set (or on a coreset picked with --method) and report "
                "final-epoch test accuracy, mean and standard deviation over --runs networks per architecture.",
    "show": "Draw a distilled set as a class-by-class image grid: the decoded images the classifier trains on, "
            "enlarged, or with --stored the stored tiles.",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = HelpFormatter  # --help shows every default
    keys = config_keys_help()
    parser = argparse.ArgumentParser(prog="python -m dsdm", description=paragraphs(DESCRIPTIONS[None]),
                                     formatter_class=defaults)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=paragraphs(DESCRIPTIONS[name]), epilog=keys,
                              formatter_class=defaults)

    p = command("pretrain", "pre-train a model zoo")
    _common(p)
    p.add_argument("--models", type=int, help=f"M, number of networks {_budget('zoo.num_models')}")
    p.add_argument("--epochs", type=int, help="E, train to this epoch (added to the snapshots; default: the last snapshot)")
    p.add_argument("--snapshots", help=f"comma-separated epochs to keep, e.g. 1,5,10 {_budget('zoo.snapshots')}")
    p.add_argument("--out", type=Path, required=True, help="zoo folder to write")

    p = command("distill", "distil a dataset into a small synthetic set")
    _common(p)
    p.add_argument("--method", choices=["dsdm", "dm", "random", "herding", "kcenter"],
                   help="dsdm (default), dm (distribution matching, the baseline) or a coreset of real images: "
                        "random, herding, kcenter")
    p.add_argument("--ipc", type=int, help=f"stored images per class {_budget('distill.ipc')}")
    p.add_argument("--zoo", type=Path, help="zoo folder from `pretrain` (default: pre-train and cache)")
    p.add_argument("--iterations", type=int, help="distillation iterations (default: the budget's)")
    p.add_argument("--lambda1", type=float, help=f"weight of L_SD (covariance matching) {_budget('distill.lambda1')}")
    p.add_argument("--lambda2", type=float, help=f"weight of L_h (memory bank) {_budget('distill.lambda2')}")
    p.add_argument("--models", type=int, help=f"M zoo models sampled from {_budget('distill.num_models')}")
    p.add_argument("--pretrain-epochs", type=int, help=f"E, which zoo snapshot {_budget('distill.pretrain_epochs')}")
    p.add_argument("--factor", type=int, help=f"l of partition-and-expand, 1 = off {_budget('distill.factor')}")
    p.add_argument("--lr-img", type=float, help="learning rate of the stored images (default 0: 0.1 * ipc / 10)")
    p.add_argument("--reference", action="store_true", help="the straightforward loop instead of the fast path (default: off)")
    p.add_argument("--checkpoint", type=Path, help="resume from / write here (default: OUT.ckpt)")
    p.add_argument("--evaluate", action="store_true",
                   help="then evaluate the set with the budget's eval.* settings and record the result in its manifest (default: off)")
    p.add_argument("--out", type=Path, required=True, help="distilled-set file to write (its manifest goes beside it)")

    p = command("evaluate", "train fresh networks on a distilled set (or a coreset)")
    _common(p)
    p.add_argument("file", nargs="?", type=Path, help="distilled-set file; omit to select a coreset with --method")
    p.add_argument("--method", choices=["random", "herding", "kcenter"], help="coreset to select and evaluate (default: none, FILE is evaluated)")
    p.add_argument("--ipc", type=int, help=f"images per class of the coreset {_budget('distill.ipc')}")
    p.add_argument("--record", action="store_true",
                   help="store this result (and its recipe) in the set's manifest, replacing the one there (default: off)")
    _eval_flags(p)

    p = sub.add_parser("show", help="draw a distilled set as a class-by-class image grid",
                       description=paragraphs(DESCRIPTIONS["show"]), formatter_class=defaults)
    p.add_argument("file", type=Path, help="distilled-set file")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--stored", action="store_true",
                   help="draw the stored tiles (a factor-l set keeps l x l tiles per image) instead of the decoded "
                        "images (default: off)")
    p.add_argument("--decoded", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts

    from dsdm.export import FORMATS

    p = sub.add_parser("export", help="write a distilled set in a format other tools read", formatter_class=defaults,
                       description="Decoded images sorted by class: imagefolder (PNG folders + metadata.csv: torchvision "
                                   "ImageFolder, Hugging Face imagefolder), npz (numpy), ddranking (images.pt, labels.pt, "
                                   "lr.pt for DD-Ranking), tuple (a (data, target) .pt). docs/sets.md shows how to load each.")
    p.add_argument("file", type=Path, help="distilled-set file")
    p.add_argument("--to", required=True, choices=FORMATS, help="export format")
    p.add_argument("out", type=Path, help="folder (imagefolder, ddranking) or file (npz, tuple) to write")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Flags and --set pairs become dotted overrides on the chosen budget."""
    flags = {
        "data.dataset": getattr(args, "dataset", None), "data.root": getattr(args, "data_root", None),
        "distill.method": getattr(args, "method", None), "distill.ipc": getattr(args, "ipc", None),
        "distill.iterations": getattr(args, "iterations", None),
        "distill.lambda1": getattr(args, "lambda1", None), "distill.lambda2": getattr(args, "lambda2", None),
        "distill.num_models": getattr(args, "models", None) if args.command == "distill" else None,
        "distill.pretrain_epochs": getattr(args, "pretrain_epochs", None),
        "distill.factor": getattr(args, "factor", None), "distill.lr_img": getattr(args, "lr_img", None),
        "distill.seed": args.seed, "eval.seed": args.seed,
        "eval.archs": getattr(args, "arch", None), "eval.runs": getattr(args, "runs", None),
        "eval.epochs": getattr(args, "epochs", None) if args.command == "evaluate" else None,
        "eval.protocol": getattr(args, "protocol", None),
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.offline:
        overrides["data.offline"] = True
    if getattr(args, "reference", False):
        overrides["distill.fast"] = False
    if args.command == "pretrain":
        if args.models is not None:
            overrides["zoo.num_models"] = args.models
        if args.snapshots or args.epochs:
            snaps = {int(s) for s in (args.snapshots or "").split(",") if s.strip()}
            overrides["zoo.snapshots"] = tuple(sorted(snaps | ({args.epochs} if args.epochs else set())))
    overrides.update(parse_set_pairs(args.set))
    if args.command == "distill":
        # a zoo trained for this run covers the M and E the run asks for (and keeps the budget's otherwise)
        zoo = zoo_covering([max(int(overrides.get("distill.num_models", 1)), 1)],
                           [int(overrides.get("distill.pretrain_epochs", 1))])
        for asked, zoo_key in (("distill.num_models", "zoo.num_models"), ("distill.pretrain_epochs", "zoo.snapshots")):
            if asked in overrides:
                overrides.setdefault(zoo_key, zoo[zoo_key])
    return make_config(args.budget, overrides)


# --- commands ----------------------------------------------------------------------------
def _dataset(cfg: Config):
    from dsdm.data import load_dataset

    d = cfg.data
    return load_dataset(d.dataset, d.root or None, offline=d.offline, val_fraction=d.val_fraction, seed=d.seed)


def _zoo(cfg: Config, dataset, device, cache: Path):
    from dsdm.zoo import load_or_train_zoo

    zoo, folder = load_or_train_zoo(dataset, cfg.zoo, cache / "zoos", cfg.data.seed, cfg.data.val_fraction,
                                    device, progress=lambda msg: print(msg, file=sys.stderr))
    print(f"zoo: {folder}", file=sys.stderr)
    return zoo


def cmd_pretrain(args, cfg: Config) -> None:
    from dsdm.train import resolve_device
    from dsdm.zoo import ModelZoo, pretrain_one, zoo_arch

    dataset, device = _dataset(cfg), resolve_device(args.device)
    _paper_on_cpu(cfg, device)
    z = cfg.zoo
    zoo = ModelZoo(zoo_arch(z, dataset), dataset.name, dataset.channels, dataset.num_classes,
                   dataset.image_size, {k.split(".", 1)[1]: v for k, v in cfg.flat().items() if k.startswith("zoo.")})
    from tqdm import tqdm

    with tqdm(total=z.num_models * max(z.snapshots), desc="pretrain (model-epochs)", unit="ep") as bar:
        for i in range(z.num_models):
            zoo.add(pretrain_one(dataset, z, i, device, on_epoch=lambda e: bar.update(1)))
    zoo.save(args.out)
    for epoch in zoo.epochs:
        accs = zoo.test_acc[epoch]
        print(f"epoch {epoch}: test accuracy of the {len(accs)} models "
              f"{100 * sum(accs) / len(accs):.2f}% (min {100 * min(accs):.2f}, max {100 * max(accs):.2f})")
    print(f"wrote {args.out}")


def cmd_distill(args, cfg: Config) -> None:
    from tqdm import tqdm

    from dsdm.coreset import select_coreset
    from dsdm.distill import Distiller
    from dsdm.synthetic import SyntheticSet
    from dsdm.train import resolve_device
    from dsdm.zoo import ModelZoo

    dataset, device = _dataset(cfg), resolve_device(args.device)
    d, cache = cfg.distill, args.cache or default_cache()
    from dsdm.coreset import check_ipc_fits

    check_ipc_fits(dataset, cfg)  # before a zoo is pre-trained for nothing
    _paper_on_cpu(cfg, device)
    clock = PhaseClock(device)
    needs_zoo = d.method in ("herding", "kcenter") or (d.method == "dsdm" and d.pretrained)
    with clock.phase("zoo"):
        zoo = (ModelZoo.load(args.zoo) if args.zoo else _zoo(cfg, dataset, device, cache)) if needs_zoo else None
    if zoo is not None and zoo.dataset != dataset.name:  # same shapes (mnist/fashionmnist) would run silently
        raise DsdmError(f"zoo '{args.zoo}' was pre-trained on {zoo.dataset}, not {dataset.name}; "
                        f"pass a zoo pre-trained on {dataset.name} or drop --zoo")
    if d.method in ("random", "herding", "kcenter"):
        net = zoo.model(0, zoo.epochs[-1], device) if zoo is not None else None
        with clock.phase("distill"):
            synset = select_coreset(d.method, dataset, d.ipc, d.seed, net, config=cfg.plain())
    else:
        distiller = Distiller(dataset, cfg, zoo, device)
        checkpoint = args.checkpoint or args.out.with_suffix(args.out.suffix + ".ckpt")
        if Path(checkpoint).is_file():  # a foreign or mismatched file fails here, before the progress bar
            distiller.load_checkpoint(checkpoint)
        with tqdm(total=d.iterations, desc=f"distill {d.method}", unit="it") as bar:
            def log(metrics: dict, step: int) -> None:
                bar.update(step - bar.n)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss/")})
            try:
                with clock.phase("distill"):
                    synset = distiller.run(checkpoint=checkpoint, log=log)
            except KeyboardInterrupt:
                raise CheckpointedInterrupt from None
        clock.carve("distill", "cache_fill", distiller.cache.fill_seconds)
    synset.save(args.out)
    print(f"wrote {args.out}: {len(synset.labels)} stored images ({synset.ipc} per class, tiles {synset.grid}); "
          f"{clock.summary()}")
    results = None
    if args.evaluate:
        # the saved file (float16), not the float32 set in memory: the manifest's number is the file's
        results = _evaluate(SyntheticSet.load(args.out), dataset, cfg, device, clock)
        print(results_table(args.out.name, dataset.name, results))
    phases = dict(clock.seconds)
    from dsdm.manifest import write_manifest, zoo_record

    key, settings = zoo_record(zoo, dataset, cfg)
    path = write_manifest(args.out, cfg.plain(), results, phases, key, settings, device, dataset.class_names,
                          command=_command(args))
    print(f"wrote {path}")


def _command(args) -> str:
    return "python -m dsdm " + shlex.join(args.argv)


def _evaluate(synset, dataset, cfg: Config, device, clock: PhaseClock) -> dict:
    """Train and score the evaluation networks, timed on `clock` (phase `eval`: training and scoring)."""
    from tqdm import tqdm

    from dsdm.evaluate import evaluate_set

    e = cfg.eval
    with tqdm(total=len(e.archs) * e.runs, desc="evaluate (networks)", unit="net") as bar, clock.phase("eval"):
        return evaluate_set(synset, dataset, e, device, on_run=lambda arch, run, s: bar.update(1), clock=clock)


def cmd_evaluate(args, cfg: Config) -> None:
    from dsdm import manifest as mf
    from dsdm.coreset import select_coreset
    from dsdm.synthetic import SyntheticSet
    from dsdm.train import resolve_device

    device = resolve_device(args.device)
    recorded = None
    if args.record and args.file is None:
        raise DsdmError("--record stores the result in a set's manifest; pass the set FILE")
    if args.file is not None:
        synset = SyntheticSet.load(args.file)
        if mf.manifest_path(args.file).is_file():  # a foreign or corrupt manifest fails here, before training
            recorded = mf.read_manifest(mf.manifest_path(args.file))
        if args.dataset and args.dataset != synset.dataset:
            raise DsdmError(f"'{args.file}' was distilled from {synset.dataset}, not {args.dataset}; drop --dataset")
        cfg = cfg.override({"data.dataset": synset.dataset})
        dataset = _dataset(cfg)
        label = f"{args.file.name}"
    else:
        if not args.method:
            raise DsdmError("evaluate needs a distilled-set FILE or --method random|herding|kcenter")
        dataset = _dataset(cfg)
        zoo = _zoo(cfg, dataset, device, args.cache or default_cache()) if args.method != "random" else None
        net = zoo.model(0, zoo.epochs[-1], device) if zoo is not None else None
        synset = select_coreset(args.method, dataset, cfg.distill.ipc, cfg.distill.seed, net, config=cfg.plain())
        label = f"{args.method} ipc{cfg.distill.ipc}"
    _paper_on_cpu(cfg, device)
    if recorded is not None and mf.recipe_differences(recorded, cfg.plain()):
        print(f"dsdm: note: this evaluation differs from the one in the manifest "
              f"({'; '.join(mf.recipe_differences(recorded, cfg.plain()))}); to re-check its number, pass the "
              f"budget and flags of its command: {recorded.get('command') or 'see the manifest'}", file=sys.stderr, flush=True)
    clock = PhaseClock(device)
    results = _evaluate(synset, dataset, cfg, device, clock)
    print(results_table(label, dataset.name, results))
    print(f"phases: {clock.summary()}")
    if recorded is not None:
        from dsdm.io import sha256_file

        print("\n".join(mf.compare(recorded, sha256_file(args.file), cfg.plain(), results)))
    if args.record:
        if recorded is None:
            path = mf.write_manifest(args.file, synset.config, results, dict(clock.seconds),
                                     device=device, class_names=dataset.class_names, eval_cfg=cfg.plain())
        else:
            path = mf.record_evaluation(args.file, cfg.plain(), results, clock.seconds["eval"])
        print(f"recorded in {path}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"set": label, "dataset": dataset.name, "budget": cfg.budget,
                                         "config": cfg.plain(), "results": results, "phases": clock.metrics()},
                                        indent=1))


def results_table(label: str, dataset: str, results: dict) -> str:
    lines = ["| set | dataset | arch | protocol | epochs | test acc % (final epoch) | val acc % | runs | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, r in results.items():
        lines.append(f"| {label} | {dataset} | {arch} | {r['protocol']} | {r['epochs']} | {r['mean']:.2f} ± {r['std']:.2f} "
                     f"| {r['val_mean']:.2f} ± {r['val_std']:.2f} | {len(r['runs'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def cmd_export(args) -> None:
    from dsdm.export import ddranking_takes, export_file
    from dsdm.synthetic import SyntheticSet

    synset = SyntheticSet.load(args.file)  # a foreign file fails here, before anything is written
    if args.to == "ddranking" and not ddranking_takes(synset.dataset):
        print(f"dsdm: note: DD-Ranking scores 3-channel CIFAR-10/100, Tiny-ImageNet and ImageNet sets only, "
              f"not {synset.dataset}; the export is written all the same (docs/sets.md)", file=sys.stderr)
    out, manifest = export_file(args.file, args.to, args.out)
    n = len(synset.labels) * synset.grid[0] * synset.grid[1]
    print(f"wrote {out}: {n} decoded images of {synset.dataset} ({args.to})")
    if manifest is not None:
        print(f"recorded its sha256 in {manifest}")


def cmd_show(args) -> None:
    from dsdm.synthetic import SyntheticSet
    from dsdm.visualize import save_grid

    synset = SyntheticSet.load(args.file)
    save_grid(synset, args.out, decoded=not args.stored)
    print(f"wrote {args.out}")



def _paper_on_cpu(cfg: Config, device) -> None:
    """`--budget paper` is the GPU preset: on a CPU, one line saying so once the inputs passed their
    checks (bad input stays one line)."""
    if cfg.budget == "paper" and device.type == "cpu":
        print("dsdm: note: --budget paper is the GPU preset (at least an hour per run on this CPU-only machine, "
              "more on larger datasets); pass --budget cpu for a run of minutes", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    line_buffered()
    try:
        if args.command in ("show", "export"):
            {"show": cmd_show, "export": cmd_export}[args.command](args)
            return 0
        cfg = config_from_args(args)
        {"pretrain": cmd_pretrain, "distill": cmd_distill, "evaluate": cmd_evaluate}[args.command](args, cfg)
    except DsdmError as exc:
        print(f"dsdm: error: {exc}", file=sys.stderr)
        return 2
    except CheckpointedInterrupt:
        print("dsdm: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a zoo or an evaluation stopped midway keeps nothing
        print("dsdm: interrupted before anything was saved; rerun the same command to start again", file=sys.stderr)
        return 130
    return 0
