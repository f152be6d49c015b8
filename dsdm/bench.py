"""`python -m dsdm.bench [--NAME] ARGS`: forwards to a benchmark of the repository's `benchmarks/`.

The benchmarks are development tools, not part of the installed library; they live in the
repository's top-level `benchmarks/` package. `--NAME` picks one (default: distill).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

# --NAME -> module; the first is the default
TARGETS = {
    "distill": "benchmarks.distill",  # seconds per distillation iteration, fast vs reference
    "train": "benchmarks.train",  # classifier training (evaluation, zoo), baseline vs fast vs stacked
    "eval-cell": "benchmarks.evalcell",  # one sweep cell's evaluation, today's path vs the new default
    "convrate": "benchmarks.convrate",  # ConvNet-3's convolutions alone: the rate this CPU attains, and the loops' share
}


def _find_benchmarks() -> None:
    """Put the checkout holding this dsdm on the path (an editable install maps only its packages)."""
    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a[2:] for a in argv if a[2:] in TARGETS and a.startswith("--")), next(iter(TARGETS)))
    argv = [a for a in argv if a != f"--{name}"]
    _find_benchmarks()
    try:
        module = importlib.import_module(TARGETS[name])
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("benchmarks"):
            raise
        print(f"dsdm.bench: error: the benchmarks are not installed with dsdm; run `python -m {TARGETS[name]}` "
              "from a checkout of the repository", file=sys.stderr)
        return 2
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
