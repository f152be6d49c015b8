"""tune/optuna_search.py: the search's spec from the command line, and its base config (no Ray)."""
from __future__ import annotations

import pytest

from dsdm.errors import DsdmError
from tune.optuna_search import SearchSpec, base_config, run_search
from tune.runner import Runner
from tune.search import build_parser
from tune.space import parse_fixed, search_space


def test_the_command_line_and_a_spec_built_in_code_are_the_same_search():
    args = build_parser().parse_args(["--budget", "smoke", "--fix", "M=1", "--set", "eval.runs=1", "--seed", "3"])
    assert SearchSpec.from_args(args) == SearchSpec(budget="smoke", fix=("M=1",), sets=("eval.runs=1",), seed=3)


def test_the_base_config_has_a_zoo_for_every_point_of_the_space():
    spec = SearchSpec(budget="cpu", fix=("E=2",), sets=("zoo.max_per_class=10",))
    fixed = parse_fixed(spec.fix)
    cfg = base_config(spec, search_space(spec.budget, fixed), fixed)
    assert (cfg.zoo.num_models, cfg.zoo.snapshots) == (4, (2,))  # M up to 4 in the cpu grid, E fixed at 2
    assert cfg.distill.pretrain_epochs == 2 and cfg.distill.method == "dsdm" and cfg.zoo.max_per_class == 10


@pytest.mark.parametrize("spec, message", [
    (SearchSpec(num_samples=0), "--num-samples must be >= 1"),
    (SearchSpec(scheduler="asha"), "--scheduler asha needs --proxy-every K"),
    (SearchSpec(budget="smoke", fix=("M=3",)), "--fix M=3 is larger than the zoo of the smoke budget"),
])
def test_bad_specs_are_refused_before_anything_starts(tmp_path, spec, message):
    with pytest.raises(DsdmError, match=message):
        run_search(spec, Runner(storage=str(tmp_path / "runs")))
    assert not (tmp_path / "runs").exists()
