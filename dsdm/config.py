"""One frozen config tree that flows from the CLI into Tune trials and MLflow params.

`Config(data, zoo, distill, eval)` has a flat dotted view (`distill.lambda1`) used by
search spaces, `--set key=value` on the command line and MLflow params. Budgets are
named sets of dotted overrides on top of the defaults (which are the paper's numbers).

The official DSDM code's flags (Li-Hongcheng/DSDM argument.py) and our keys:

    official flag                 our key                   meaning
    --cov_weight 50               distill.lambda1           weight of L_SD (covariance matching)
    --h_p_weight 0.2              distill.lambda2           weight of L_h (historical prototypes)
    --smooth_factor 0.99          distill.alpha             EMA decay of the memory bank
    --smooth_iter 2000            distill.warmup            L_h from iteration > smooth_iter (ours: >= warmup)
    --pretrained_model_number 10  distill.num_models (M)    zoo models sampled from (zoo.num_models trains them)
    --pretrained_epochs 20        distill.pretrain_epochs   E, the zoo snapshot used (zoo.snapshots keeps it)
    --lr_img 0.1 (x ipc/10)       distill.lr_img            0 = 0.1 * ipc / 10, as --reproduce's tune_lr_img
    --batch_real 256              distill.batch_real        real images per class per match
    -f / --factor 2               distill.factor            l x l tiles per stored image (multi-formation)
    -i / --ipc 10                 distill.ipc               stored images per class
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, get_type_hints

from dsdm.errors import DsdmError

# The values each speed lever takes (dsdm.train, dsdm.distill read them; validate() checks them).
TRAIN_PATHS = ("fast", "baseline")
SWITCH = ("on", "off", "auto")
PRECISIONS = ("fp32", "bf16")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
# Named recipes of dsdm.recipes.PROTOCOLS (listed here so a config validates without torch).
PROTOCOL_NAMES = ("dsdm", "dsdm-uniform", "dm")
SCORINGS = ("joint", "each")  # joint: all networks in one pass (default); each: one by one (before 2026-12)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    root: str = ""  # "" -> $DSDM_DATA, else ./data
    offline: bool = False
    val_fraction: float = 0.1  # stratified hold-out, seen by neither zoo nor distillation
    seed: int = 0


@dataclass(frozen=True)
class ZooConfig:
    """Pre-training of the model zoo (spec section 3)."""
    arch: str = "auto"  # convnet3 for images, convnet4 for speech
    num_models: int = 10  # M models in the zoo
    snapshots: tuple[int, ...] = (20,)  # epochs at which weights are kept; trains to the max
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    cutmix_p: float = 0.5
    max_per_class: int = 0  # 0 = whole training split; >0 subsamples for CPU budgets
    seed: int = 0
    # speed levers (dsdm.train; same draws, same weights up to float rounding; not part of zoo_key)
    train_path: str = "fast"  # fast | baseline (the original loop)
    compile: str = "off"  # torch.compile the training step: on | off | auto (on for >= 10K steps per network)
    batch_nets: str = "auto"  # train the M models as one stacked model: on | off | auto (on for CUDA)
    precision: str = "fp32"  # fast path: fp32 | bf16 (autocast forward; a bf16 zoo has its own zoo_key)
    group_size: int = 0  # models per training call (a Ray actor's call too); 0 = auto: split over the workers when stacked (CUDA), else 1


@dataclass(frozen=True)
class DistillConfig:
    """Algorithm 1 and its ablation switches (spec sections 2, 3, 5)."""
    method: str = "dsdm"  # dsdm | dm | random | herding | kcenter
    ipc: int = 10
    factor: int = 2  # l x l tiles per stored image (speech: 1 x l along time)
    iterations: int = 10_000
    num_models: int = 10  # M: zoo models sampled from
    pretrain_epochs: int = 20  # E: which snapshot of each zoo model
    pretrained: bool = True  # False = a fresh random ConvNet per iteration (DM, Table 4 row 1)
    lambda1: float = 50.0  # weight of L_SD
    lambda2: float = 0.2  # weight of L_h
    alpha: float = 0.99  # memory-bank EMA
    warmup: int = 2000  # iterations before L_h enters the loss
    lr_img: float = 0.0  # 0 = 0.1 * ipc / 10 (DSDM) or 1.0 (DM)
    momentum: float = 0.5
    batch_real: int = 256
    per_class_step: bool = True  # reference DSDM: one optimiser step per class
    fast: bool = True  # cached real features over a pool of augmentation draws
    aug_pool: int = 16  # K Siamese draws cached per zoo snapshot (fast path)
    aug_refresh: int = 0  # fast path: redraw a pool slot after R uses; 0 = never (measured as good as R=4 and the reference)
    bank_forward: bool = False  # fast path: memory bank from a separate pass after the step (as the reference)
    batched_loss: bool = True  # fast path: losses of all classes in one bmm (False: class by class; speed lever)
    nchw_input: bool = True  # copy augmented batches to NCHW strides before the net (speed lever, CPU)
    compile: str = "auto"  # fast path: torch.compile the synthetic forward (auto: iterations >= 1000) | on | off
    precision: str = "fp32"  # fast path synthetic forward: fp32 | bf16 (autocast)
    cache_dtype: str = "float32"  # storage of the cached centred real features: float32 | bfloat16 | float16
    cache_max_mb: int = 0  # cap on the real-feature cache, LRU beyond it (exact: entries recompute); 0 = none
    forward_chunk: int = 0  # fast path: images per synthetic forward; 0 = auto (40 on CPU, all on GPU)
    # the recipe whose matching augmentation (its row per dataset, factor, IPC) the Siamese draws use;
    # apart from eval.protocol, so evaluating a set another way never changes how it is distilled
    match_protocol: str = "dsdm"  # dsdm | dsdm-uniform | dm (dsdm.recipes.PROTOCOLS)
    log_every: int = 100
    checkpoint_every: int = 500
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """Training fresh networks on the distilled set (spec section 4)."""
    protocol: str = "dsdm"  # dsdm | dsdm-uniform | dm (dsdm.recipes.PROTOCOLS)
    archs: tuple[str, ...] = ("convnet3",)
    runs: int = 5
    epochs: int = 0  # 0 = the protocol's number
    seed: int = 0
    # speed levers (dsdm.train; same draws, same weights up to float rounding)
    train_path: str = "fast"  # fast | baseline (the original loop)
    compile: str = "off"  # torch.compile the training step: on | off | auto (on for >= 10K steps per network)
    batch_nets: str = "auto"  # train the runs of an architecture as one stacked model: on | off | auto (on for CUDA)
    precision: str = "fp32"  # fast path: fp32 | bf16 (autocast forward; weights, optimiser and loss in fp32)
    # final scoring (dsdm.inference; the same accuracies up to float reassociation)
    scoring: str = "joint"  # joint: all networks of an architecture in one pass over val/test | each: one by one (before 2026-12)
    score_compile: str = "auto"  # joint: torch.compile the scoring forward: on | off | auto (CPU, >= 40K image-forwards)
    score_batch: int = 0  # joint: images per scoring batch; 0 = auto (256 on CPU, 4096 on CUDA)


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    budget: str = "paper"

    # --- flat dotted view -------------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        """{'data.dataset': 'digits', 'distill.lambda1': 50.0, ...}; tuples stay tuples."""
        out: dict[str, Any] = {"budget": self.budget}
        for section in SECTIONS:
            for f in dataclasses.fields(getattr(self, section)):
                out[f"{section}.{f.name}"] = getattr(getattr(self, section), f.name)
        return out

    def plain(self) -> dict[str, Any]:
        """The flat view with tuples as lists: JSON, MLflow params and weights_only files take it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.flat().items()}

    def override(self, updates: dict[str, Any]) -> "Config":
        """A new Config with dotted keys replaced; strings are parsed to the field type."""
        sections = {s: {} for s in SECTIONS}
        top: dict[str, Any] = {}
        for key, value in updates.items():
            section, _, name = key.partition(".")
            if key == "budget":
                top["budget"] = str(value)
                continue
            if section not in sections or name not in _field_types(section):
                raise DsdmError(f"unknown config key '{key}'; valid keys: {', '.join(sorted(self.flat()))}")
            sections[section][name] = _coerce(value, _field_types(section)[name], key)
        replaced = {s: dataclasses.replace(getattr(self, s), **kw) for s, kw in sections.items() if kw}
        return dataclasses.replace(self, **replaced, **top)

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> "Config":
        return cls().override(flat)

    def validate(self) -> "Config":
        """Raise a one-line DsdmError for values no run can use; return self."""
        d, z = self.distill, self.zoo
        for key, value in self.flat().items():
            if isinstance(value, float) and not math.isfinite(value):
                raise DsdmError(f"config key '{key}' cannot take {value}; pass a finite number")
        checks = [
            (d.lambda1 >= 0 and d.lambda2 >= 0, f"lambda1/lambda2 must be >= 0 (got {d.lambda1}, {d.lambda2}); pass a non-negative weight"),
            (d.ipc >= 1, f"ipc must be >= 1 (got {d.ipc})"),
            (d.factor >= 1, f"factor must be >= 1 (got {d.factor})"),
            (d.iterations >= 0, f"iterations must be >= 0 (got {d.iterations})"),
            (0 <= d.alpha <= 1, f"alpha must be in [0, 1] (got {d.alpha})"),
            (d.batch_real >= 2, f"batch_real must be >= 2 (got {d.batch_real})"),
            (d.aug_pool >= 1, f"aug_pool must be >= 1 (got {d.aug_pool})"),
            (z.num_models >= 1 and len(z.snapshots) >= 1 and min(z.snapshots) >= 1,
             f"the zoo needs >= 1 model and snapshot epochs >= 1 (got {z.num_models}, {z.snapshots})"),
            (z.group_size >= 0, f"zoo.group_size must be >= 0 (0 = auto), got {z.group_size}"),
            (not d.pretrained or d.method != "dsdm" or d.num_models <= z.num_models,
             f"distill.num_models={d.num_models} is larger than the zoo ({z.num_models} models); raise zoo.num_models or lower M"),
            (not d.pretrained or d.method != "dsdm" or d.pretrain_epochs in z.snapshots,
             f"distill.pretrain_epochs={d.pretrain_epochs} is not a zoo snapshot {list(z.snapshots)}; add it to zoo.snapshots"),
            (self.eval.runs >= 1, f"eval.runs must be >= 1 (got {self.eval.runs})"),
            (0 <= self.data.val_fraction < 1, f"val_fraction must be in [0, 1) (got {self.data.val_fraction})"),
        ]
        for ok, message in checks:
            if not ok:
                raise DsdmError(message)
        for section in ("zoo", "eval"):
            _check_training_levers(getattr(self, section), section)
        _one_of("eval.protocol", self.eval.protocol, PROTOCOL_NAMES)
        _one_of("distill.match_protocol", d.match_protocol, PROTOCOL_NAMES)
        _check_distill_levers(d)
        _check_scoring(self.eval)
        return self


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise DsdmError(f"{key} must be one of {', '.join(allowed)} (got '{value}')")


def _check_training_levers(section_cfg: Any, section: str) -> None:
    """The training loop's levers of a zoo or eval section (dsdm.train reads them)."""
    _one_of(f"{section}.train_path", section_cfg.train_path, TRAIN_PATHS)
    _one_of(f"{section}.compile", section_cfg.compile, SWITCH)
    _one_of(f"{section}.batch_nets", section_cfg.batch_nets, SWITCH)
    _one_of(f"{section}.precision", section_cfg.precision, PRECISIONS)
    if section_cfg.precision != "fp32" and section_cfg.train_path == "baseline":
        raise DsdmError(f"{section}.precision={section_cfg.precision} runs on the fast training path only; "
                        f"set {section}.train_path=fast")


def _check_scoring(e: "EvalConfig") -> None:
    """The final val/test scoring's levers (dsdm.inference reads them)."""
    _one_of("eval.scoring", e.scoring, SCORINGS)
    _one_of("eval.score_compile", e.score_compile, SWITCH)
    if e.score_batch < 0:
        raise DsdmError(f"eval.score_batch must be >= 0 (0 = auto), got {e.score_batch}")


def _check_distill_levers(d: "DistillConfig") -> None:
    """The fast distillation path's levers (dsdm.distill / dsdm.fastpath read them)."""
    _one_of("distill.compile", d.compile, SWITCH)
    _one_of("distill.precision", d.precision, PRECISIONS)
    _one_of("distill.cache_dtype", d.cache_dtype, CACHE_DTYPES)
    for key, value, meaning in (("cache_max_mb", d.cache_max_mb, "0 = no cap"), ("forward_chunk", d.forward_chunk, "0 = auto"),
                                ("aug_refresh", d.aug_refresh, "0 = never redraw")):
        if value < 0:
            raise DsdmError(f"distill.{key} must be >= 0 ({meaning}), got {value}")


SECTIONS = ("data", "zoo", "distill", "eval")


def _field_types(section: str) -> dict[str, Any]:
    cls = {"data": DataConfig, "zoo": ZooConfig, "distill": DistillConfig, "eval": EvalConfig}[section]
    return get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Parse CLI strings (and Tune's numpy scalars) into the declared field type."""
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        if typ is float and not math.isfinite(float(value)):  # inf would only fail inside a trial
            raise DsdmError(f"config key '{key}' cannot take {value!r}; pass a finite number")
        if typ in (int, float, str):
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return typ(value)
        # tuple[int, ...] or tuple[str, ...]
        item = typ.__args__[0]
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(item(v.strip() if isinstance(v, str) else v) for v in value)
    except (TypeError, ValueError):
        raise DsdmError(f"config key '{key}' cannot take {value!r}; expected {getattr(typ, '__name__', typ)}") from None


# Budgets: dotted overrides on the paper defaults. Every table states the budget it used.
BUDGETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # Minutes on 2 CPU cores for MNIST-sized data; numbers are cut, and tables say so.
    "cpu": {
        "zoo.num_models": 4, "zoo.snapshots": (1, 2), "zoo.max_per_class": 300,
        "distill.num_models": 4, "distill.pretrain_epochs": 2,
        "distill.iterations": 200, "distill.warmup": 50, "distill.batch_real": 64,
        "distill.aug_pool": 8, "distill.log_every": 20, "distill.checkpoint_every": 50,
        "eval.runs": 3, "eval.epochs": 50,
    },
    # Sweeps that resolve their effects on FashionMNIST in a working session on 2 CPU cores
    # (docs/results.md: measured pieces and wall time per sweep): one zoo for the E and M
    # sweeps, 1000 fast-path iterations, 300-epoch DSDM-protocol evaluation, 5 nets x 2 seeds.
    "resolve": {
        "zoo.num_models": 8, "zoo.snapshots": (1, 2, 5, 10), "zoo.max_per_class": 500,
        "distill.num_models": 8, "distill.pretrain_epochs": 10,
        "distill.iterations": 1000, "distill.warmup": 200, "distill.batch_real": 128,
        "distill.log_every": 50, "distill.checkpoint_every": 250,
        "eval.protocol": "dsdm", "eval.runs": 5, "eval.epochs": 300,
    },
    # Seconds: exercises every code path on tiny data; the numbers mean nothing.
    "smoke": {
        "zoo.num_models": 2, "zoo.snapshots": (1,), "zoo.max_per_class": 50,
        "distill.num_models": 2, "distill.pretrain_epochs": 1,
        "distill.iterations": 10, "distill.warmup": 5, "distill.batch_real": 32,
        "distill.aug_pool": 2, "distill.log_every": 5, "distill.checkpoint_every": 5,
        "eval.runs": 2, "eval.epochs": 5,
    },
}


# The M x E grid each budget's zoo can afford to pre-train: searches and sweeps draw M and E
# from it, and one zoo (zoo_covering) serves all of it. Spec grid (Figure 5): M in
# {1, 5, 10, 20}, E in {1, 5, ..., 30}.
PAPER_MODELS = (1, 5, 10, 20)
PAPER_EPOCHS = (1, 5, 10, 15, 20, 25, 30)
BUDGET_GRIDS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "paper": (PAPER_MODELS, PAPER_EPOCHS),
    "cpu": ((1, 2, 4), (1, 2)),
    # one zoo (8 models, snapshots 1/2/5/10) serves the E sweep, the M sweep and the λ search
    "resolve": ((1, 2, 4, 8), (1, 2, 5, 10)),
    "smoke": ((1, 2), (1,)),
}
assert set(BUDGET_GRIDS) == set(BUDGETS)


def zoo_covering(models: Iterable[int], epochs: Iterable[int]) -> dict[str, Any]:
    """Zoo overrides so one pre-training serves every M in `models` and every E in `epochs`:
    max(M) models, each kept at every snapshot epoch E."""
    models, epochs = [int(m) for m in models], sorted({int(e) for e in epochs})
    if not models or not epochs:
        raise DsdmError("a zoo must cover at least one M and one E")
    return {"zoo.num_models": max(models), "zoo.snapshots": tuple(epochs)}


def parse_set_pairs(pairs: Iterable[str], flag: str = "--set", aliases: dict[str, str] | None = None) -> dict[str, str]:
    """`KEY=VALUE` strings -> {key: value} (values stay strings; `Config.override` coerces them).

    `aliases` maps short names to dotted keys (`--fix lambda1=50`); a pair without '=' is refused.
    """
    aliases = aliases or {}
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            example = next(iter(aliases), "distill.iterations") + "=" + ("50" if aliases else "2000")
            raise DsdmError(f"{flag} expects KEY=VALUE (e.g. {example}), got '{pair}'")
        out[aliases.get(key.strip(), key.strip())] = value.strip()
    return out


# Methods that are DSDM's loop with other settings (spec section 5). Coresets need none.
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "dsdm": {},
    # DM: fresh random ConvNet per iteration, L_proto only, no factor, lr_img 1, one joint
    # step per iteration, 20K iterations.
    "dm": {"distill.pretrained": False, "distill.lambda1": 0.0, "distill.lambda2": 0.0,
           "distill.factor": 1, "distill.per_class_step": False, "distill.iterations": 20_000},
    "random": {}, "herding": {}, "kcenter": {},
}


def make_config(budget: str = "paper", overrides: dict[str, Any] | None = None) -> Config:
    """Defaults < method preset < budget < explicit overrides, resolved in this one place."""
    if budget not in BUDGETS:
        raise DsdmError(f"unknown budget '{budget}'; choose one of: {', '.join(BUDGETS)}")
    overrides = dict(overrides or {})
    method = str(overrides.get("distill.method", DistillConfig.method))
    if method not in METHOD_PRESETS:
        raise DsdmError(f"unknown method '{method}'; choose one of: {', '.join(METHOD_PRESETS)}")
    cfg = Config(budget=budget).override({"distill.method": method, **METHOD_PRESETS[method]})
    return cfg.override(BUDGETS[budget]).override(overrides).validate()
