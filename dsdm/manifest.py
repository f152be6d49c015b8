"""`SET.manifest.json`: what a distilled set is, how it was made and what it scored.

Written beside the set file (`x.pt` -> `x.manifest.json`), atomically, by `python -m dsdm distill`
(and by whatever else calls `write_manifest`). It records the dataset, IPC, factor and method,
every config value, the zoo, the seeds, code and library versions, the device, the evaluation
recipe by name and in full, the per-network final-epoch test and validation accuracies with
mean, sd, t-based 95% CI and n, wall time per phase, and the sha256 of the set and its exports.
`SCHEMA` is its JSON schema; `read_manifest` refuses a foreign or corrupt file in one line.
Why one file over 350 lines: the schema (its last 50 lines) stays beside the code that fills it.
"""
from __future__ import annotations

import json
import math
import platform
import statistics
import subprocess
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dsdm.errors import DsdmError
from dsdm.io import atomic_write_text, plain, sha256_file

FORMAT = "dsdm-set-manifest"
VERSION = 1
FIX = "pass a manifest written by dsdm beside its set, or delete it (`python -m dsdm evaluate SET --record` writes a new one)"


def manifest_path(set_path: str | Path) -> Path:
    """`runs/x.pt` -> `runs/x.manifest.json`."""
    return Path(set_path).with_suffix(".manifest.json")


# --- statistics ------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, Any]:
    """mean, sd, the t-based 95% CI of the mean, n, and the values (per network, run order)."""
    from scipy.stats import t

    n = len(values)
    mean = statistics.fmean(values) if n else float("nan")
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else None
    ci = [mean - half, mean + half] if half is not None else None
    return {"mean": mean, "sd": sd, "ci95": ci, "n": n, "runs": list(values)}


def results_record(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`dsdm.evaluate.evaluate_set` output -> per architecture test and val summaries."""
    return {arch: {"test": summary(r["runs"]), "val": summary(r["val_runs"]), "protocol": r["protocol"],
                   "epochs": r["epochs"], "train_images": r["train_images"], "seconds": r["seconds"]}
            for arch, r in results.items()}


# --- provenance -------------------------------------------------------------------------
def code_version() -> dict[str, Any]:
    """The package version, and the git commit (and whether the tree had changes) when dsdm runs
    from a checkout."""
    import dsdm

    out: dict[str, Any] = {"dsdm": dsdm.__version__, "git_commit": None, "git_dirty": None}
    root = Path(dsdm.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        pass
    return out


def environment() -> dict[str, str]:
    import numpy
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "platform": platform.platform()}


def device_record(device: Any) -> dict[str, Any]:
    import torch

    device = torch.device(device if device is not None else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"type": device.type, "name": name, "threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:  # Linux names the model here; platform.processor() is often empty
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def recipe_record(synset, dataset: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The evaluation recipe by name and in full, as `dsdm evaluate` resolves it for this set."""
    from dsdm.config import Config
    from dsdm.recipes import get_protocol, set_recipe
    from dsdm.train import speed_levers

    eval_cfg = Config.from_flat({k: v for k, v in cfg.items() if k.startswith("eval.")}).eval
    protocol = get_protocol(eval_cfg.protocol)
    n = len(synset.labels) * synset.grid[0] * synset.grid[1]
    recipe = speed_levers(set_recipe(protocol, synset, dataset, eval_cfg.epochs), n, eval_cfg)
    aug = protocol.augmentation(dataset, max(synset.grid), synset.ipc)
    full = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(recipe).items()}
    full["ops"] = [op.value for op in recipe.ops]
    return {"name": protocol.name, "describe": aug.describe(), "train": full,
            "archs": list(eval_cfg.archs), "runs": eval_cfg.runs, "seed": eval_cfg.seed,
            "network_seeds": "eval.seed * 1000 + run"}


def zoo_record(zoo, dataset, cfg) -> tuple[str | None, dict | None]:
    """The key and settings of the zoo (a `ModelZoo`) a set was distilled with (None, None: no zoo)."""
    from dsdm.config import ZooConfig
    from dsdm.zoo import zoo_key

    if zoo is None:
        return None, None
    names = {f.name for f in fields(ZooConfig)}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in zoo.config.items() if k in names}
    return zoo_key(dataset, ZooConfig(**settings), cfg.data.seed, cfg.data.val_fraction), zoo.config


# --- build, write, read -----------------------------------------------------------------
def build_manifest(set_path: str | Path, cfg: dict[str, Any], results: dict[str, dict[str, Any]] | None = None,
                   phases: dict[str, float] | None = None, zoo_key: str | None = None,
                   zoo_settings: dict[str, Any] | None = None, device: Any = None,
                   class_names: list[str] | None = None, exports: dict[str, dict[str, str]] | None = None,
                   command: str | None = None, eval_cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of the set file at `set_path`; `cfg` is the flat config that made it,
    `results` `evaluate_set`'s output (None: not evaluated yet), `eval_cfg` the flat config of
    that evaluation when it differs from `cfg`."""
    from dsdm.synthetic import SyntheticSet

    set_path = Path(set_path)
    synset = SyntheticSet.load(set_path)
    cfg = plain(cfg)
    factor = max(synset.grid)
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "summary": describe(synset, cfg),
        "set": {"file": set_path.name, "sha256": sha256_file(set_path), "bytes": set_path.stat().st_size,
                "dataset": synset.dataset, "ipc": synset.ipc, "factor": factor, "grid": list(synset.grid),
                "method": cfg.get("distill.method", "dsdm"), "num_classes": synset.num_classes,
                "stored_images": len(synset.labels), "decoded_images": len(synset.labels) * synset.grid[0] * synset.grid[1],
                "image_shape": list(synset.images.shape[1:]), "mean": list(synset.mean), "std": list(synset.std),
                "class_names": list(class_names) if class_names else [str(c) for c in range(synset.num_classes)]},
        "config": cfg,
        "budget": cfg.get("budget"),
        "distill_seed": cfg.get("distill.seed"),
        "zoo": {"key": zoo_key, "settings": plain(zoo_settings)} if zoo_key or zoo_settings else None,
        "code": code_version(),
        "environment": environment(),
        "device": device_record(device),
        "phases": {k: float(v) for k, v in (phases or {}).items()},
        "command": command,
        "evaluation": None,
        "exports": dict(exports or {}),
    }
    if results is not None:
        manifest["evaluation"] = evaluation_record(synset, eval_cfg or cfg, results)
    return manifest


def evaluation_record(synset, cfg: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    cfg = plain(cfg)
    return {"recipe": recipe_record(synset, synset.dataset, cfg),
            "config": {k: v for k, v in cfg.items() if k.startswith(("eval.", "data.")) or k == "budget"},
            "results": results_record(results)}


def describe(synset, cfg: dict[str, Any]) -> str:
    """One sentence: what the set is (also the MLflow run description)."""
    method = cfg.get("distill.method", "dsdm")
    made = f"{method.upper() if method in ('dsdm', 'dm') else method} at budget {cfg.get('budget')}, seed {cfg.get('distill.seed')}"
    if method == "dsdm":
        made += f", λ1={cfg.get('distill.lambda1'):g}, λ2={cfg.get('distill.lambda2'):g}"
    return (f"{synset.dataset} distilled to {synset.ipc} stored image(s) per class "
            f"({len(synset.labels)} in all, factor {max(synset.grid)}) by {made}.")


def write_manifest(set_path: str | Path, cfg: dict[str, Any], results: dict[str, dict[str, Any]] | None = None,
                   phases: dict[str, float] | None = None, zoo_key: str | None = None,
                   zoo_settings: dict[str, Any] | None = None, device: Any = None,
                   class_names: list[str] | None = None, exports: dict[str, dict[str, str]] | None = None,
                   command: str | None = None, eval_cfg: dict[str, Any] | None = None) -> Path:
    """Build the manifest of `set_path`, check it against SCHEMA and write it beside the set."""
    manifest = build_manifest(set_path, cfg, results, phases, zoo_key, zoo_settings, device, class_names,
                              exports, command, eval_cfg)
    return save_manifest(manifest, manifest_path(set_path))


def save_manifest(manifest: dict[str, Any], path: str | Path) -> Path:
    validate(manifest, str(path))
    return atomic_write_text(path, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest at `path`, checked; foreign, corrupt or newer files get a one-line DsdmError."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except OSError as exc:
        raise DsdmError(f"cannot read manifest '{path}' ({exc.strerror}); {FIX}") from None
    except ValueError as exc:
        raise DsdmError(f"'{path}' is not valid JSON ({str(exc).splitlines()[0][:80]}); {FIX}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DsdmError(f"'{path}' is not a dsdm set manifest (format tag missing or different); {FIX}")
    if isinstance(manifest.get("version"), int) and manifest["version"] > VERSION:
        raise DsdmError(f"'{path}' was written by a newer dsdm (manifest version {manifest['version']}); upgrade dsdm")
    validate(manifest, str(path))
    return manifest


def validate(manifest: dict[str, Any], where: str = "manifest") -> None:
    """Check against SCHEMA with jsonschema where it is installed (with Ray it always is); without
    it, the top-level keys and their types (a machine with torch alone still reads manifests)."""
    try:
        import jsonschema
    except ImportError:
        _validate_top_level(manifest, where)
        return
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(SCHEMA).iter_errors(manifest))
    if error is not None:
        at = "/".join(str(p) for p in error.absolute_path) or "top level"
        raise DsdmError(f"'{where}' does not match the dsdm set manifest schema at {at}: "
                        f"{error.message[:120]}; {FIX}")


_JSON_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
               "boolean": bool, "null": type(None)}


def _validate_top_level(manifest: dict[str, Any], where: str) -> None:
    for key in SCHEMA["required"]:
        if key not in manifest:
            raise DsdmError(f"'{where}' does not match the dsdm set manifest schema: '{key}' is missing; {FIX}")
        types = SCHEMA["properties"][key].get("type")
        types = [types] if isinstance(types, str) else (types or [])
        if types and not isinstance(manifest[key], tuple(_JSON_TYPES[t] for t in types)):
            raise DsdmError(f"'{where}' does not match the dsdm set manifest schema: '{key}' is not {' or '.join(types)}; {FIX}")


def record_export(set_path: str | Path, fmt: str, out: str | Path, sha256: str) -> Path | None:
    """Add an export's path and sha256 to the manifest beside `set_path` (if there is one)."""
    path = manifest_path(set_path)
    if not path.is_file():
        return None
    manifest = read_manifest(path)
    out = Path(out)
    try:
        where = str(out.resolve().relative_to(path.parent.resolve()))
    except ValueError:
        where = str(out.resolve())
    manifest["exports"][fmt] = {"path": where, "sha256": sha256}
    return save_manifest(manifest, path)


def record_evaluation(set_path: str | Path, cfg: dict[str, Any], results: dict[str, dict[str, Any]],
                      seconds: float) -> Path:
    """Store an evaluation (and its wall time) in the manifest beside `set_path`."""
    from dsdm.synthetic import SyntheticSet

    path = manifest_path(set_path)
    manifest = read_manifest(path)
    manifest["evaluation"] = evaluation_record(SyntheticSet.load(set_path), cfg, results)
    manifest["phases"]["eval"] = float(seconds)
    return save_manifest(manifest, path)


# --- comparison of a re-score with the manifest ----------------------------------------
# what must match for a re-score to estimate the same number (eval.epochs 0: the protocol's)
_SAME_KEYS = ("eval.protocol", "eval.epochs", "eval.seed", "eval.precision", "data.seed", "data.val_fraction")


def recipe_differences(manifest: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """'eval.epochs 1500 here vs 50', ... for each evaluation setting `cfg` changes (none: [])."""
    recorded = (manifest.get("evaluation") or {}).get("config", {})
    return [f"{k} {cfg.get(k)!r} here vs {recorded.get(k)!r}" for k in _SAME_KEYS if recorded and cfg.get(k) != recorded.get(k)]


def compare(manifest: dict[str, Any], set_sha256: str, cfg: dict[str, Any],
            results: dict[str, dict[str, Any]]) -> list[str]:
    """Lines: per architecture, the re-score beside the manifest's and whether it lies within the
    manifest's 95% CI; 'not comparable' where the set or the recipe differs."""
    evaluation = manifest.get("evaluation")
    if not evaluation:
        return ["manifest: no evaluation recorded (`python -m dsdm evaluate SET --record` adds one)"]
    lines = []
    other_set = manifest["set"]["sha256"] != set_sha256
    if other_set:
        lines.append("manifest: the set file's sha256 differs from the manifest's: a different set, numbers not comparable")
    differ = recipe_differences(manifest, cfg)
    for arch, r in results.items():
        old = evaluation["results"].get(arch)
        if old is None:
            lines.append(f"manifest: no {arch} result recorded")
            continue
        new = summary(r["runs"])
        lines.append(f"{arch}: this run {_fmt(new)} | manifest {_fmt(old['test'])}")
        if differ or other_set:
            lines.append(f"{arch}: not comparable: {'; '.join(differ) or 'another set'}")
            continue
        same_runs = sum(abs(a - b) < 1e-9 for a, b in zip(r["runs"], old["test"]["runs"]))
        ci = old["test"]["ci95"]
        inside = ci is not None and ci[0] <= new["mean"] <= ci[1]
        verdict = "agree" if inside else "disagree"
        lines.append(f"{arch}: {verdict}: the mean {new['mean']:.2f} is {'inside' if inside else 'outside'} the manifest's "
                     f"95% CI" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else " (n = 1: no CI)")
                     + f"; {same_runs} of {min(len(r['runs']), len(old['test']['runs']))} networks identical run for run")
    return lines


def _fmt(s: dict[str, Any]) -> str:
    ci = f", 95% CI [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]" if s.get("ci95") else ""
    return f"{s['mean']:.2f} ± {s['sd']:.2f}{ci}, n={s['n']}"


# --- JSON schema (Draft 2020-12) --------------------------------------------------------
_NUM = {"type": "number"}
_STATS = {"type": "object", "required": ["mean", "sd", "ci95", "n", "runs"], "properties": {
    "mean": _NUM, "sd": {"type": "number", "minimum": 0},
    "ci95": {"oneOf": [{"type": "null"}, {"type": "array", "items": _NUM, "minItems": 2, "maxItems": 2}]},
    "n": {"type": "integer", "minimum": 1}, "runs": {"type": "array", "items": _NUM, "minItems": 1}}}
_SHA = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "dsdm distilled-set manifest",
    "type": "object",
    "required": ["format", "version", "created", "summary", "set", "config", "budget", "distill_seed", "zoo",
                 "code", "environment", "device", "phases", "command", "evaluation", "exports"],
    "properties": {
        "format": {"const": FORMAT},
        "version": {"type": "integer", "minimum": 1},
        "created": {"type": "string"},
        "summary": {"type": "string"},
        "set": {"type": "object", "required": ["file", "sha256", "bytes", "dataset", "ipc", "factor", "grid", "method",
                                               "num_classes", "stored_images", "decoded_images", "image_shape",
                                               "mean", "std", "class_names"],
                "properties": {"file": {"type": "string"}, "sha256": _SHA, "bytes": {"type": "integer"},
                               "dataset": {"type": "string"}, "ipc": {"type": "integer", "minimum": 1},
                               "factor": {"type": "integer", "minimum": 1},
                               "grid": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
                               "method": {"type": "string"}, "num_classes": {"type": "integer", "minimum": 1},
                               "stored_images": {"type": "integer"}, "decoded_images": {"type": "integer"},
                               "image_shape": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
                               "mean": {"type": "array", "items": _NUM}, "std": {"type": "array", "items": _NUM},
                               "class_names": {"type": "array", "items": {"type": "string"}}}},
        "config": {"type": "object", "required": ["budget", "data.dataset", "distill.method", "distill.ipc",
                                                  "distill.factor", "distill.seed", "eval.protocol"]},
        "budget": {"type": ["string", "null"]},
        "distill_seed": {"type": ["integer", "null"]},
        "zoo": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["key", "settings"]}]},
        "code": {"type": "object", "required": ["dsdm", "git_commit", "git_dirty"],
                 "properties": {"dsdm": {"type": "string"}, "git_commit": {"type": ["string", "null"]},
                                "git_dirty": {"type": ["boolean", "null"]}}},
        "environment": {"type": "object", "required": ["python", "torch", "torchvision"],
                        "additionalProperties": {"type": "string"}},
        "device": {"type": "object", "required": ["type", "name"]},
        "phases": {"type": "object", "additionalProperties": {"type": "number", "minimum": 0}},
        "command": {"type": ["string", "null"]},
        "evaluation": {"oneOf": [{"type": "null"}, {
            "type": "object", "required": ["recipe", "config", "results"],
            "properties": {
                "recipe": {"type": "object", "required": ["name", "train", "archs", "runs", "seed"],
                           "properties": {"name": {"type": "string"},
                                          "train": {"type": "object", "required": ["epochs", "batch_size", "lr", "milestones",
                                                                                   "gamma", "cutmix_p", "ops"]}}},
                "config": {"type": "object"},
                "results": {"type": "object", "minProperties": 1, "additionalProperties": {
                    "type": "object", "required": ["test", "val", "protocol", "epochs"],
                    "properties": {"test": _STATS, "val": _STATS, "protocol": {"type": "string"},
                                   "epochs": {"type": "integer", "minimum": 1}}}}}}]},
        "exports": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["path", "sha256"], "properties": {"path": {"type": "string"}, "sha256": _SHA}}},
    },
}
