"""Model zoo: snapshots, save/load with sha256 manifest, frozen models, the on-disk cache."""
from __future__ import annotations

import json

import pytest
import torch

import dsdm.zoo as zoo_mod
from dsdm.config import ZooConfig
from dsdm.errors import DsdmError
from dsdm.zoo import ModelZoo, load_or_train_zoo, pretrain_one

TINY = ZooConfig(num_models=1, snapshots=(1, 3), max_per_class=10, batch_size=64)


def sd_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_one_keeps_exactly_the_snapshot_epochs(digits):
    epochs = []
    result = pretrain_one(digits, TINY, 0, on_epoch=epochs.append)
    assert epochs == [1, 2, 3]  # trains to max(snapshots)
    assert sorted(result["snapshots"]) == [1, 3] and sorted(result["test_acc"]) == [1, 3]
    s1, s3 = result["snapshots"][1], result["snapshots"][3]
    assert not sd_equal(s1, s3), "epoch 1 and epoch 3 weights are different snapshots"
    assert all(0 <= a <= 1 for a in result["test_acc"].values())
    # a pure function of its inputs: same index -> same weights, other index -> other weights
    assert sd_equal(pretrain_one(digits, ZooConfig(**{**TINY.__dict__, "snapshots": (1,)}), 0)["snapshots"][1], s1)


def test_save_load_round_trip(tiny_zoo, tmp_path):
    folder = tiny_zoo.save(tmp_path / "zoo")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["files"]) == 4 and manifest["format"] == "dsdm-zoo"
    loaded = ModelZoo.load(folder)
    assert loaded.epochs == [1, 2] and loaded.num_models == 2
    assert (loaded.arch, loaded.dataset, loaded.channels, loaded.num_classes, loaded.image_size) == \
        ("convnet3", "digits", 1, 10, (8, 8))
    for e in (1, 2):
        for a, b in zip(tiny_zoo.state_dicts[e], loaded.state_dicts[e]):
            assert sd_equal(a, b)
    assert loaded.test_acc == tiny_zoo.test_acc
    assert not sd_equal(loaded.state_dicts[2][0], loaded.state_dicts[2][1]), "models keep their order"
    assert sd_equal(loaded.state_dicts[2][1], tiny_zoo.state_dicts[2][1])


def test_corrupted_snapshot_detected(tiny_zoo, tmp_path):
    folder = tiny_zoo.save(tmp_path / "zoo")
    victim = folder / "model001_epoch002.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    victim.write_bytes(bytes(data))
    with pytest.raises(DsdmError) as err:
        ModelZoo.load(folder)
    msg = str(err.value)
    assert "sha256" in msg and "corrupted" in msg and "model001_epoch002.pt" in msg and "\n" not in msg
    victim.unlink()
    with pytest.raises(DsdmError, match="missing"):
        ModelZoo.load(folder)


def test_folder_without_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DsdmError, match="manifest"):
        ModelZoo.load(tmp_path / "empty")
    with pytest.raises(DsdmError, match="manifest"):
        ModelZoo.load(tmp_path / "does-not-exist")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DsdmError, match="not a dsdm zoo"):
        ModelZoo.load(tmp_path / "other")


def test_model_is_frozen_eval_and_holds_the_snapshot(tiny_zoo, digits):
    net = tiny_zoo.model(1, 2)
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    assert sd_equal(net.state_dict(), tiny_zoo.state_dicts[2][1])
    out = net.embed(torch.rand(3, 1, 8, 8))
    assert out.shape == (3, net.feature_dim) and not out.requires_grad
    # mutating the returned net does not touch the zoo's weights
    before = {k: v.clone() for k, v in tiny_zoo.state_dicts[2][1].items()}
    with torch.no_grad():
        next(net.parameters()).add_(1.0)
    assert sd_equal(tiny_zoo.state_dicts[2][1], before)
    with pytest.raises(DsdmError, match="snapshot at epoch 5"):
        tiny_zoo.model(0, 5)
    with pytest.raises(DsdmError, match="model 2"):
        tiny_zoo.model(2, 1)


def test_load_or_train_zoo_trains_once(digits, tmp_path, monkeypatch):
    cfg = ZooConfig(num_models=1, snapshots=(1,), max_per_class=10, batch_size=64)
    calls = []
    real_train = zoo_mod.train_zoo

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise AssertionError("train_zoo called again: the cache was not used")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(zoo_mod, "train_zoo", counting)
    first, folder = load_or_train_zoo(digits, cfg, tmp_path)
    assert (folder / "manifest.json").is_file() and folder.parent == tmp_path
    second, folder2 = load_or_train_zoo(digits, cfg, tmp_path)
    assert folder2 == folder and len(calls) == 1
    assert sd_equal(first.state_dicts[1][0], second.state_dicts[1][0])
    # another recipe is another zoo (another key)
    other = zoo_mod.zoo_key(digits, ZooConfig(num_models=1, snapshots=(1,), max_per_class=10, batch_size=64, seed=1))
    assert other != folder.name
    assert zoo_mod.zoo_key(digits, cfg, val_fraction=0.2) != folder.name


def test_zoo_groups_one_model_per_call_on_cpu_and_the_zoo_split_when_stacked():
    cfg = ZooConfig(num_models=5)
    assert zoo_mod.zoo_groups(cfg, "cpu", workers=2) == [[0], [1], [2], [3], [4]]  # today's pool, unchanged
    assert zoo_mod.zoo_groups(cfg, "cuda", workers=2) == [[0, 1, 2], [3, 4]]  # batch_nets=auto stacks on CUDA
    assert zoo_mod.zoo_groups(cfg, "cuda") == [[0, 1, 2, 3, 4]]
    assert zoo_mod.zoo_groups(ZooConfig(num_models=5, batch_nets="off"), "cuda", workers=2) == [[0], [1], [2], [3], [4]]
    assert zoo_mod.zoo_groups(ZooConfig(num_models=5, group_size=2), "cpu", workers=4) == [[0, 1], [2, 3], [4]]


def test_zoo_key_ignores_how_the_zoo_is_trained_except_bf16(digits):
    key = zoo_mod.zoo_key(digits, TINY)
    assert key == "digits-6cd86a7cc9fc", "an fp32 zoo keeps the key it had before the precision/group_size keys"
    levers = {"train_path": "baseline", "compile": "on", "batch_nets": "on", "group_size": 3}
    assert zoo_mod.zoo_key(digits, ZooConfig(**{**TINY.__dict__, **levers})) == key
    assert zoo_mod.zoo_key(digits, ZooConfig(**{**TINY.__dict__, "precision": "bf16"})) != key


def test_a_group_trains_the_models_it_would_train_one_by_one(digits):
    cfg = ZooConfig(num_models=3, snapshots=(1,), max_per_class=10, batch_size=64)
    one = zoo_mod.train_zoo(digits, cfg)
    grouped = zoo_mod.train_zoo(digits, ZooConfig(**{**cfg.__dict__, "group_size": 2}))
    assert all(sd_equal(a, b) for a, b in zip(one.state_dicts[1], grouped.state_dicts[1])) and grouped.num_models == 3


def test_a_distillation_resumes_across_zoo_speed_levers_but_not_a_bf16_zoo():
    from dsdm.config import Config
    from dsdm.checkpoint import config_mismatch

    saved = Config().plain()
    levers = {"zoo.group_size": 4, "zoo.batch_nets": "on", "zoo.compile": "on", "zoo.train_path": "baseline"}
    assert config_mismatch(saved, Config().override(levers)) == []
    assert config_mismatch(saved, Config().override({"zoo.precision": "bf16"})) == ["zoo.precision: 'fp32' -> 'bf16'"]
