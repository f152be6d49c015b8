"""dsdm's error messages name `python -m dsdm`'s flags; the search and the sweeps set those keys
with `--set KEY=VALUE` instead. `in_tune_words` rewrites a message so that every flag it names
is one of the command that prints it."""
from __future__ import annotations

import re

# python -m dsdm flag -> the config key tune.search and the sweeps set with --set
DSDM_FLAG_KEYS = {"--lr-img": "distill.lr_img", "--lambda1": "distill.lambda1", "--lambda2": "distill.lambda2",
                  "--models": "distill.num_models", "--pretrain-epochs": "distill.pretrain_epochs",
                  "--factor": "distill.factor", "--iterations": "distill.iterations", "--runs": "eval.runs",
                  "--arch": "eval.archs", "--protocol": "eval.protocol"}
_FLAG = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, sorted(DSDM_FLAG_KEYS, key=len, reverse=True))) + r")(?![\w-])")


def in_tune_words(message: str) -> str:
    """`lower --lr-img` -> `lower --set distill.lr_img=VALUE`; `--device cpu` -> `--trial-gpus 0`."""
    message = message.replace("--device cpu", "--trial-gpus 0 --zoo-gpus 0")
    return _FLAG.sub(lambda m: f"--set {DSDM_FLAG_KEYS[m.group(1)]}=VALUE", message)
