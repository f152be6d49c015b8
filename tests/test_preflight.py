"""tune/preflight.py and the experiment's checks: the search and every sweep refuse bad input before
Ray starts, with the same one line (run in process: no subprocess, no Ray)."""
from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from dsdm.errors import DsdmError


def test_too_little_free_space_is_refused_up_front(tmp_path, digits):
    from dsdm.config import make_config
    from tune.preflight import check_free_space, space_needed

    cfg = make_config("smoke", {"data.dataset": "digits"})
    needed = space_needed(cfg, digits, num_samples=2, zoo_on_disk=False)
    assert 4 * 2**20 < needed < 16 * 2**20  # a smoke search: a few MB (MLflow's sqlite file is most of it)
    check_free_space(tmp_path, needed)
    with pytest.raises(DsdmError, match=r"has .* MB free but this search needs about .* MB; free space there"):
        check_free_space(tmp_path, 2**62)


def test_paper_budget_on_cpu_prints_one_line_suggesting_cpu(capsys):
    import torch

    from tune.preflight import paper_on_cpu_note

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the paper budget is the right one")
    paper_on_cpu_note("cpu", 0, 20)
    assert capsys.readouterr().err == ""
    paper_on_cpu_note("paper", 0, 20)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--budget paper is the GPU preset (at least 17 h" in err and "--budget cpu" in err


def run_cli(main, argv, capsys) -> tuple[int, str]:
    """A command's exit code and its one stderr line (asserted to be one)."""
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return code, lines[0]


def commands(tmp_path):
    """The search and a sweep, each as (main, argv with a fresh storage, its prog)."""
    from ablations import pretrain_epochs
    from tune import search

    return [(search.main, ["--budget", "smoke", "--num-samples", "1", "--cross-arch", "none",
                           "--storage", str(tmp_path / "search")], "tune.search"),
            (pretrain_epochs.main, ["--budget", "smoke", "--storage", str(tmp_path / "sweep"),
                                    "--results", str(tmp_path / "results")], "python -m ablations.pretrain_epochs")]


@pytest.mark.parametrize("which", [0, 1], ids=["search", "sweep"])
def test_a_full_disk_is_refused_with_the_same_line(tmp_path, capsys, monkeypatch, which):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 2**20, 2**20))
    main, argv, prog = commands(tmp_path)[which]
    code, line = run_cli(main, argv, capsys)
    assert code == 2 and line.startswith(f"{prog}: error: storage '") and "has 1.0 MB free but this search needs" in line


@pytest.mark.parametrize("which", [0, 1], ids=["search", "sweep"])
def test_a_missing_data_root_is_refused_with_the_same_line(tmp_path, capsys, which):
    main, argv, prog = commands(tmp_path)[which]
    code, line = run_cli(main, [*argv, "--dataset", "mnist", "--data-root", str(tmp_path / "nowhere"), "--offline"],
                         capsys)
    assert code == 2 and line == (f"{prog}: error: --data-root '{tmp_path / 'nowhere'}' does not exist; pass the folder "
                                  "that holds the mnist files, or drop --offline to download it there")


@pytest.mark.parametrize("which", [0, 1], ids=["search", "sweep"])
def test_an_unreachable_ray_address_is_refused_with_the_same_line(tmp_path, capsys, which):
    main, argv, prog = commands(tmp_path)[which]
    code, line = run_cli(main, [*argv, "--address", "127.0.0.1:9"], capsys)
    assert code == 2 and line.startswith(f"{prog}: error: cannot reach the Ray cluster at '127.0.0.1:9' (")


@pytest.mark.parametrize("which", [0, 1], ids=["search", "sweep"])
def test_an_unreachable_storage_uri_is_refused_with_the_same_line(tmp_path, capsys, monkeypatch, which):
    """A URI --storage is probed through pyarrow's filesystem before anything is written (the sweeps
    once wrote into a local folder named 's3:')."""
    monkeypatch.chdir(tmp_path)
    main, argv, prog = commands(tmp_path)[which]
    uri = "s3://nobucket/x?endpoint_override=127.0.0.1:9&scheme=http"
    code, line = run_cli(main, [*argv, "--storage", uri, "--local-dir", str(tmp_path / "local")], capsys)
    assert code == 2 and line.startswith(f"{prog}: error: storage '{uri}' is not reachable or not writable (")
    assert not (tmp_path / "s3:").exists()


def test_fix_outside_the_zoo_names_the_grid():
    from tune.preflight import check_fixed

    check_fixed("smoke", {"distill.num_models": "2", "distill.pretrain_epochs": "1"}, [])
    with pytest.raises(DsdmError, match=r"--fix M=3 is larger than the zoo of the smoke budget \(2 models\)"):
        check_fixed("smoke", {"distill.num_models": "3"}, [])
    check_fixed("smoke", {"distill.num_models": "3"}, ["zoo.num_models=3"])  # a wider zoo asked for
    with pytest.raises(DsdmError, match=r"--fix E=2 is not a snapshot epoch .* or add --set zoo.snapshots=1,2"):
        check_fixed("smoke", {"distill.pretrain_epochs": "2"}, [])
