"""Search spaces over DSDM's hyper-parameters (no computation here).

Keys are the config's dotted names, so a sampled point is directly a config override.
The zoo is trained once to cover every M and E the space can ask for.
"""
from __future__ import annotations

from typing import Any

from ray import tune

from dsdm.config import BUDGET_GRIDS, parse_set_pairs


def search_space(budget: str, fixed: dict[str, Any] | None = None,
                 models: tuple[int, ...] | None = None, epochs: tuple[int, ...] | None = None) -> dict[str, Any]:
    """lambda1 log-uniform [0.01, 100], lambda2 uniform [0, 1], M and E from the budget's grid.

    Keys in `fixed` are removed from the space (the caller sets them in the base config).
    """
    grid_m, grid_e = BUDGET_GRIDS[budget]
    space = {
        "distill.lambda1": tune.loguniform(0.01, 100.0),
        "distill.lambda2": tune.uniform(0.0, 1.0),
        "distill.num_models": tune.choice(list(models or grid_m)),
        "distill.pretrain_epochs": tune.choice(list(epochs or grid_e)),
    }
    for key in fixed or {}:
        space.pop(key, None)
    return space


def zoo_grid(space: dict[str, Any], fixed: dict[str, Any]) -> tuple[int, tuple[int, ...]]:
    """(models to pre-train, snapshot epochs to keep) so every point of the space is served."""
    def values(key: str) -> list[int]:
        if key in fixed:
            return [int(fixed[key])]
        domain = space[key]
        return [int(v) for v in getattr(domain, "categories", [domain])]

    return max(values("distill.num_models")), tuple(sorted(set(values("distill.pretrain_epochs"))))


# --fix accepts these short names beside the dotted keys
FIX_ALIASES = {"lambda1": "distill.lambda1", "lambda2": "distill.lambda2", "M": "distill.num_models",
               "models": "distill.num_models", "E": "distill.pretrain_epochs", "epochs": "distill.pretrain_epochs"}


def parse_fixed(pairs: list[str]) -> dict[str, str]:
    """`--fix lambda1=50 distill.lambda2=0.2` -> {'distill.lambda1': '50', ...}."""
    return parse_set_pairs(pairs, "--fix", FIX_ALIASES)
