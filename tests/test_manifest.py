"""SET.manifest.json: schema, statistics against float64 references, one-line errors for foreign or
corrupt files, the re-score comparison, and the CLI path a bare torch machine runs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsdm import manifest as mf
from dsdm.config import make_config
from dsdm.errors import DsdmError
from dsdm.io import sha256_file
from dsdm.synthetic import SyntheticSet

REPO = Path(__file__).resolve().parents[1]


def saved_set(tmp_path: Path) -> tuple[Path, dict]:
    cfg = make_config("smoke", {"distill.ipc": 2}).plain()
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = SyntheticSet(images, torch.arange(3).repeat_interleave(2), (2, 2), "digits", (0.3054,), (0.3761,), cfg)
    return s.save(tmp_path / "s.pt"), cfg


def fake_results(runs=(80.0, 82.0, 84.0), epochs=5) -> dict:
    return {"convnet3": {"protocol": "dsdm", "epochs": epochs, "train_images": 24, "seconds": 1.5,
                         "mean": sum(runs) / len(runs), "std": 2.0, "runs": list(runs),
                         "val_mean": 81.0, "val_std": 1.0, "val_runs": [80.0, 81.0, 82.0][:len(runs)]}}


def test_summary_matches_a_float64_t_interval():
    s = mf.summary([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(sum((v - 2.5) ** 2 for v in (1, 2, 3, 4)) / 3)
    half = 3.182446305284263 * sd / 2  # t(3) 97.5% quantile, from tables
    assert s["mean"] == 2.5 and s["sd"] == pytest.approx(sd, rel=1e-12) and s["n"] == 4
    assert s["ci95"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-9)
    assert mf.summary([7.0]) == {"mean": 7.0, "sd": 0.0, "ci95": None, "n": 1, "runs": [7.0]}


def test_schema_is_valid_and_a_written_manifest_matches_it(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(mf.SCHEMA)
    path, cfg = saved_set(tmp_path)
    written = mf.write_manifest(path, cfg, fake_results(), {"zoo": 1.0, "distill": 2.0}, "digits-abc",
                                {"num_models": 2}, "cpu", ["a", "b", "c"], command="python -m dsdm distill ...")
    assert written == tmp_path / "s.manifest.json"
    m = json.loads(written.read_text())
    jsonschema.validate(m, mf.SCHEMA)
    assert mf.read_manifest(written) == m
    s = m["set"]
    assert (s["dataset"], s["ipc"], s["factor"], s["method"], s["stored_images"], s["decoded_images"]) == \
        ("digits", 2, 2, "dsdm", 6, 24)
    assert s["sha256"] == sha256_file(path) and s["class_names"] == ["a", "b", "c"]
    assert m["config"] == cfg and m["distill_seed"] == 0 and m["budget"] == "smoke"
    assert m["zoo"] == {"key": "digits-abc", "settings": {"num_models": 2}}
    assert m["environment"]["torch"] == torch.__version__ and m["device"]["type"] == "cpu"
    assert m["phases"] == {"zoo": 1.0, "distill": 2.0}
    ev = m["evaluation"]
    assert ev["recipe"]["name"] == "dsdm" and ev["recipe"]["train"]["epochs"] == 5 and ev["recipe"]["train"]["lr"] == 0.01
    assert ev["recipe"]["train"]["milestones"] == [3, 4] and ev["recipe"]["runs"] == 2
    test = ev["results"]["convnet3"]["test"]
    assert test["runs"] == [80.0, 82.0, 84.0] and test["mean"] == 82.0 and test["n"] == 3
    assert m["code"]["dsdm"] == "0.1.0" and (m["code"]["git_commit"] is None or len(m["code"]["git_commit"]) == 40)


@pytest.mark.parametrize("text, words", [
    ('{"format": "dsdm-set-manifest", "vers', "is not valid JSON"),
    ('{"format": "mlflow-run", "version": 1}', "is not a dsdm set manifest"),
    ('[1, 2]', "is not a dsdm set manifest"),
    ('{"format": "dsdm-set-manifest", "version": 99}', "newer dsdm"),
    ('{"format": "dsdm-set-manifest", "version": 1}', "does not match the dsdm set manifest schema"),
])
def test_foreign_or_corrupt_manifests_are_one_line_errors(tmp_path, text, words):
    path = tmp_path / "x.manifest.json"
    path.write_text(text)
    with pytest.raises(DsdmError, match=words) as info:
        mf.read_manifest(path)
    message = str(info.value)
    assert "\n" not in message and ("delete it" in message or "upgrade dsdm" in message)


def test_a_wrong_type_deep_inside_is_named(tmp_path):
    path, cfg = saved_set(tmp_path)
    m = mf.build_manifest(path, cfg, fake_results())
    m["evaluation"]["results"]["convnet3"]["test"]["n"] = "three"
    with pytest.raises(DsdmError, match="evaluation/results/convnet3/test/n"):
        mf.validate(m, "m.json")


def test_without_jsonschema_the_top_level_is_still_checked(tmp_path, monkeypatch):
    path, cfg = saved_set(tmp_path)
    m = mf.build_manifest(path, cfg)
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema -> ImportError
    mf.validate(m)
    del m["phases"]
    with pytest.raises(DsdmError, match="'phases' is missing"):
        mf.validate(m)
    m["phases"], m["set"] = {}, "s.pt"
    with pytest.raises(DsdmError, match="'set' is not object"):
        mf.validate(m)


def test_compare_agrees_disagrees_or_says_not_comparable(tmp_path):
    path, cfg = saved_set(tmp_path)
    m = mf.build_manifest(path, cfg, fake_results())
    sha = m["set"]["sha256"]
    same = mf.compare(m, sha, cfg, fake_results())
    assert same[-1].startswith("convnet3: agree: the mean 82.00 is inside") and "3 of 3 networks identical" in same[-1]
    one = mf.compare(m, sha, cfg, fake_results(runs=(81.0,)))  # one network of the same recipe: within the CI
    assert one[-1].startswith("convnet3: agree") and "0 of 1 networks identical" in one[-1]
    far = mf.compare(m, sha, cfg, fake_results(runs=(60.0, 61.0, 62.0)))
    assert far[-1].startswith("convnet3: disagree: the mean 61.00 is outside")
    other_epochs = mf.compare(m, sha, {**cfg, "eval.epochs": 50}, fake_results(epochs=50))
    assert other_epochs[-1] == "convnet3: not comparable: eval.epochs 50 here vs 5"
    assert mf.recipe_differences(m, {**cfg, "eval.epochs": 50}) == ["eval.epochs 50 here vs 5"]
    other_seed = mf.compare(m, sha, {**cfg, "eval.seed": 3}, fake_results())
    assert "not comparable: eval.seed 3 here vs 0" in other_seed[-1]
    other_set = mf.compare(m, "0" * 64, cfg, fake_results())
    assert "sha256 differs" in other_set[0] and other_set[-1] == "convnet3: not comparable: another set"
    assert mf.compare(mf.build_manifest(path, cfg), sha, cfg, fake_results())[0].startswith("manifest: no evaluation")


def test_record_export_and_evaluation_update_the_manifest_atomically(tmp_path):
    path, cfg = saved_set(tmp_path)
    assert mf.record_export(path, "npz", tmp_path / "x.npz", "a" * 64) is None  # no manifest: nothing to update
    mf.write_manifest(path, cfg)
    mf.record_export(path, "npz", tmp_path / "out" / "x.npz", "a" * 64)
    mf.record_evaluation(path, cfg, fake_results(), 12.5)
    m = mf.read_manifest(mf.manifest_path(path))
    assert m["exports"] == {"npz": {"path": "out/x.npz", "sha256": "a" * 64}}
    assert m["phases"]["eval"] == 12.5 and m["evaluation"]["results"]["convnet3"]["test"]["mean"] == 82.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.manifest.json", "s.pt"]  # no temp files


# The modules a bare GPU box lacks (scripts/release_sets.sh runs there): blocked, imports fail.
BLOCKED = ("ray", "mlflow", "optuna", "soundfile", "jsonschema", "datasets")
BARE = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
from dsdm.cli import main
code = main(sys.argv[1:])
assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r} and sys.modules[m] is not None]
sys.exit(code)
"""


def test_distill_evaluate_export_run_without_ray_mlflow_optuna_or_jsonschema(tmp_path):
    env = {**os.environ, "DSDM_CACHE": str(tmp_path / "cache"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}

    def run(*args):
        return subprocess.run([sys.executable, "-c", BARE, *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)

    r = run("distill", "--dataset", "digits", "--budget", "smoke", "--ipc", "1", "--evaluate", "--out", "s.pt")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote s.manifest.json" in r.stdout
    m = json.loads((tmp_path / "s.manifest.json").read_text())
    assert m["command"] == "python -m dsdm distill --dataset digits --budget smoke --ipc 1 --evaluate --out s.pt"
    assert {"zoo", "distill", "cache_fill", "eval"} <= set(m["phases"]) and m["zoo"]["key"].startswith("digits-")
    r = run("evaluate", "s.pt", "--budget", "smoke")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "convnet3: agree" in r.stdout and "2 of 2 networks identical run for run" in r.stdout
    r = run("export", "s.pt", "--to", "npz", "s.npz")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("evaluate", "s.pt", "--budget", "smoke", "--runs", "1", "--epochs", "2", "--record")
    assert r.returncode == 0 and "not comparable: eval.epochs 2 here vs 5" in r.stdout, r.stderr[-2000:]
    assert "dsdm: note: this evaluation differs from the one in the manifest (eval.epochs 2 here vs 5)" in r.stderr
    m = json.loads((tmp_path / "s.manifest.json").read_text())
    assert m["evaluation"]["results"]["convnet3"]["test"]["n"] == 1 and m["evaluation"]["recipe"]["train"]["epochs"] == 2
    assert set(m["exports"]) == {"npz"} and m["command"].endswith("--evaluate --out s.pt")  # the rest is kept
    (tmp_path / "s.manifest.json").write_text('{"format": "dsdm-set-manifest", "version": 1, "set": {}}')
    r = run("evaluate", "s.pt", "--budget", "smoke")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stdout == ""  # refused before any training
    assert "does not match the dsdm set manifest schema: 'created' is missing" in r.stderr
