"""Checks before Ray starts: bad input costs about a second, writes nothing and gets one line
naming the fix (DsdmError). The search and every sweep run the same checks."""
from __future__ import annotations

import math
import socket
import sys
from pathlib import Path

from dsdm.config import Config
from dsdm.errors import DsdmError
from tune.diskfull import RESERVE_BYTES, mb


def space_needed(cfg: Config, dataset, num_samples: int, zoo_on_disk: bool) -> int:
    """Bytes a search writes under --storage, roughly and on the high side: the zoo's snapshots,
    per trial Tune's kept checkpoints (distiller state, set, grid) and the MLflow artifacts,
    plus the MLflow sqlite file and Tune's state."""
    from dsdm.models import count_parameters, get_model
    from dsdm.zoo import zoo_arch

    zoo = 0
    if not zoo_on_disk:
        net = get_model(zoo_arch(cfg.zoo, dataset), dataset.channels, dataset.num_classes, tuple(dataset.image_size))
        zoo = 4 * count_parameters(net) * cfg.zoo.num_models * len(cfg.zoo.snapshots)
    images = cfg.distill.ipc * dataset.num_classes * dataset.channels * math.prod(dataset.image_size) * 4
    return zoo + num_samples * (12 * images + 256 * 1024) + 2 * 1024 * 1024 + RESERVE_BYTES

def check_free_space(storage: Path, needed: int) -> None:
    import shutil

    free = shutil.disk_usage(storage).free
    if free < needed:
        raise DsdmError(f"storage '{storage}' has {mb(free)} free but this search needs about {mb(needed)}; "
                        "free space there or pass --storage on a larger disk")

def check_fixed(budget: str, fixed: dict[str, str], sets: list[str]) -> None:
    """`--fix M=` / `--fix E=` must be served by the zoo the budget pre-trains (or the zoo `--set` asks for)."""
    from dsdm.config import BUDGET_GRIDS, parse_set_pairs

    grid_m, grid_e = BUDGET_GRIDS[budget]
    zoo_sets = parse_set_pairs(sets)

    def as_int(key: str, flag: str) -> int:
        try:
            return int(fixed[key])
        except ValueError:
            raise DsdmError(f"--fix {flag}={fixed[key]} is not an integer; pass a whole number") from None

    if "distill.num_models" in fixed:
        m = as_int("distill.num_models", "M")
        limit = int(zoo_sets["zoo.num_models"]) if "zoo.num_models" in zoo_sets else max(grid_m)
        if m < 1:
            raise DsdmError(f"--fix M={m}: M must be >= 1; pick M from {list(grid_m)}")
        if m > limit:
            raise DsdmError(f"--fix M={m} is larger than the zoo of the {budget} budget ({limit} models); "
                            f"pick M from {[v for v in grid_m if v <= limit]} or add --set zoo.num_models={m}")
    if "distill.pretrain_epochs" in fixed:
        e = as_int("distill.pretrain_epochs", "E")
        if "zoo.snapshots" in zoo_sets:
            grid = sorted({int(v) for v in zoo_sets["zoo.snapshots"].split(",") if v.strip()})
        else:
            grid = list(grid_e)
        if e not in grid:
            raise DsdmError(f"--fix E={e} is not a snapshot epoch of the {budget} budget's zoo {grid}; "
                            f"pick E from {grid} or add --set zoo.snapshots={','.join(map(str, sorted(set(grid) | {e})))}")


def check_data_root(dataset: str, data_root: str | None, offline: bool) -> None:
    """An explicit --data-root must be a folder; missing, it is an error unless a download may create it."""
    if not data_root:
        return
    root = Path(data_root).expanduser()
    if root.exists() and not root.is_dir():
        raise DsdmError(f"--data-root '{root}' is a file, not a folder; pass the folder that holds the dataset files")
    never_downloads = dataset.lower() in ("speechcommands",)
    if not root.exists() and (offline or never_downloads):
        fix = "drop --offline to download it there" if not never_downloads else "point it at mini_speech_commands/"
        raise DsdmError(f"--data-root '{root}' does not exist; pass the folder that holds the {dataset} files, or {fix}")


def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """HOST:PORT of a cluster must answer before Ray is asked to join it (ray.init would wait a minute)."""
    if not address or address == "auto":
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise DsdmError(f"--address '{address}' is not HOST:PORT (or 'auto'); pass the head node's GCS address, "
                        "e.g. 10.0.0.1:6379, as `ray status` prints it")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DsdmError(f"cannot reach the Ray cluster at '{address}' ({reason}); start it with `ray start --head` "
                        "or `ray up cluster.yaml`, or drop --address to run locally") from None


def paper_on_cpu_note(budget: str, gpus: float, num_samples: int, prog: str = "tune.search") -> None:
    """`--budget paper` is the GPU preset: on a machine without one, say what it costs (one line)."""
    import torch

    if budget != "paper" or gpus > 0 or torch.cuda.is_available():
        return
    # README: 4 cpu-budget trials on digits took ~3 min on 2 cores; paper has 50x the iterations at 4x the
    # real batch and 30x the evaluation epochs: at least ~50 min per trial on digits, more on larger data
    hours = max(1, round(num_samples * 50 / 60))
    print(f"{prog}: note: --budget paper is the GPU preset (at least {hours} h for {num_samples} trials on this "
          "CPU-only machine); pass --budget cpu for a run of minutes", file=sys.stderr, flush=True)
