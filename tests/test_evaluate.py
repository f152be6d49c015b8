"""Evaluation: result structure, determinism, protocol schedules, final-epoch (no selection)."""
from __future__ import annotations

import copy

import pytest
import torch

import dsdm.evaluate as ev
from dsdm.config import EvalConfig
from dsdm.coreset import select_coreset
from dsdm.evaluate import evaluate_set, merge_results, train_and_score
from dsdm.recipes import get_protocol
from dsdm.train import accuracy

CFG = EvalConfig(archs=("convnet3", "resnet10"), runs=2, epochs=2, seed=3)


@pytest.fixture(scope="module")
def coreset(digits):
    return select_coreset("random", digits, 2, seed=0)


@pytest.fixture(scope="module")
def results(coreset, digits):
    return evaluate_set(coreset, digits, CFG, torch.device("cpu"))


def test_result_structure(results, coreset):
    assert list(results) == ["convnet3", "resnet10"]
    for arch, r in results.items():
        assert len(r["runs"]) == 2 and len(r["val_runs"]) == 2
        assert all(0 <= a <= 100 for a in r["runs"] + r["val_runs"])
        assert r["mean"] == pytest.approx(sum(r["runs"]) / 2)
        assert r["val_mean"] == pytest.approx(sum(r["val_runs"]) / 2)
        assert r["std"] == pytest.approx(abs(r["runs"][0] - r["runs"][1]) / 2 ** 0.5)
        assert r["protocol"] == "dsdm" and r["epochs"] == 2 and r["train_images"] == len(coreset.labels)
        assert r["seconds"] >= 0


def test_same_seed_identical_numbers(results, coreset, digits):
    cfg = EvalConfig(archs=("convnet3",), runs=2, epochs=2, seed=3)
    again = evaluate_set(coreset, digits, cfg, torch.device("cpu"))
    for key in ("runs", "val_runs", "mean", "std"):
        assert again["convnet3"][key] == results["convnet3"][key]


def test_runs_evaluated_apart_merge_to_the_same_result(results, coreset, digits):
    """Cross-architecture evaluation spreads networks over Ray tasks; joined, nothing changes."""
    parts = [evaluate_set(coreset, digits, CFG, torch.device("cpu"), run_ids=[i]) for i in (0, 1)]
    assert [p["resnet10"]["runs"] for p in parts] == [[a] for a in results["resnet10"]["runs"]]
    merged = merge_results(parts)
    for arch in CFG.archs:
        for key in ("runs", "val_runs", "mean", "std", "val_mean", "val_std", "epochs", "train_images"):
            assert merged[arch][key] == pytest.approx(results[arch][key]), (arch, key)


def test_reported_accuracy_is_the_final_model(coreset, digits, monkeypatch):
    """Record every network evaluate_set trains; the reported numbers are those final weights' scores."""
    finals, epochs_seen = [], []
    real_train = ev.train_classifier

    def recording(model, x, y, mean, std, recipe, generator, on_epoch=None):
        def spy(epoch, net):
            epochs_seen.append(epoch)
            if on_epoch is not None:
                on_epoch(epoch, net)
        out = real_train(model, x, y, mean, std, recipe, generator, spy)
        finals.append(copy.deepcopy(out))
        return out

    monkeypatch.setattr(ev, "train_classifier", recording)
    cfg = EvalConfig(archs=("convnet3",), runs=2, epochs=3, seed=0)
    res = evaluate_set(coreset, digits, cfg, torch.device("cpu"))["convnet3"]
    assert epochs_seen == [1, 2, 3, 1, 2, 3]  # the full schedule, no early stop
    assert len(finals) == 2
    for i, net in enumerate(finals):
        assert res["runs"][i] == pytest.approx(100 * accuracy(net, digits.test_x, digits.test_y, digits.mean, digits.std))
        assert res["val_runs"][i] == pytest.approx(100 * accuracy(net, digits.val_x, digits.val_y, digits.mean, digits.std))
    # and train_and_score (the per-network unit) gives the same numbers for the same seed
    x, y = coreset.decoded()
    one = train_and_score("convnet3", x, y, digits, get_protocol("dsdm").recipe("digits", 3), 1, torch.device("cpu"))
    assert 100 * one["test"] == pytest.approx(res["runs"][1])


def test_decoded_set_is_what_gets_trained(digits, monkeypatch):
    """A factor-2 set trains on 4x as many images as it stores."""
    s = select_coreset("random", digits, 1, seed=0)
    s.grid = (2, 2)
    seen = []
    monkeypatch.setattr(ev, "train_and_score_all", lambda arch, x, y, d, recipe, seeds, *a, **k:
                        seen.append((x.shape, y.tolist())) or [{"val": 0.5, "test": 0.25}] * len(seeds))
    res = evaluate_set(s, digits, EvalConfig(runs=1, epochs=1), torch.device("cpu"))
    assert seen[0][0] == (40, 1, 8, 8) and seen[0][1] == s.labels.repeat_interleave(4).tolist()
    assert res["convnet3"]["mean"] == 25.0 and res["convnet3"]["val_mean"] == 50.0


# --- the per-dataset recipe of protocol `dsdm` ----------------------------------------------------

def _fake_dataset(name: str, kind: str):
    from dsdm.data import Dataset

    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 16, 16, generator=g)
    y = torch.arange(4).repeat_interleave(10)
    return Dataset(name, kind, x, y, x[:4], y[:4], x[:4], y[:4], [str(c) for c in range(4)], (0.5,), (0.25,))


@pytest.mark.parametrize("name,kind,factor,cutmix,ops", [
    ("mnist", "image", 2, 0.0, "color_crop_scale_rotate"),
    ("mnist", "image", 1, 0.5, "color_crop_scale_rotate"),
    ("speechcommands", "speech", 2, 0.0, ""),
], ids=["mnist-factor2", "mnist-factor1", "speech"])
def test_cli_evaluate_resolves_the_recipe_of_the_set(name, kind, factor, cutmix, ops, tmp_path, monkeypatch):
    """`python -m dsdm evaluate SET` trains with the recipe of the set's dataset and factor:
    MNIST factor 2 without CutMix, speech with neither DSA nor CutMix."""
    from dsdm import cli
    from dsdm.synthetic import SyntheticSet, tile_grid

    ds = _fake_dataset(name, kind)
    grid = tile_grid(factor, kind)
    synset = SyntheticSet(ds.train_x[::10].clone(), torch.arange(4), grid, name, ds.mean, ds.std)
    path = synset.save(tmp_path / "set.pt")
    recipes = []
    monkeypatch.setattr(cli, "_dataset", lambda cfg: ds)
    monkeypatch.setattr(ev, "train_and_score_all", lambda arch, x, y, d, recipe, seeds, *a, **k: recipes.append(recipe)
                        or [{"val": 0.5, "test": 0.5}] * len(seeds))
    assert cli.main(["evaluate", str(path), "--budget", "smoke"]) == 0
    assert recipes and all(r.cutmix_p == cutmix and {o.value for o in r.ops} == set(ops.split("_")) - {""}
                           for r in recipes)
