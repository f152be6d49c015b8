"""SyntheticSet artifacts: float16 round-trip, atomic save, foreign files, decode."""
from __future__ import annotations

import pytest
import torch

import dsdm.synthetic as synthetic
from dsdm.config import make_config
from dsdm.errors import DsdmError
from dsdm.synthetic import SyntheticSet


def make_set(grid=(2, 2), n_per_class=3, classes=4, size=8, seed=0) -> SyntheticSet:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(classes * n_per_class, 1, size, size, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return SyntheticSet(images, labels, grid, "digits", (0.3054,), (0.3761,),
                        make_config("smoke", {"distill.ipc": n_per_class}).plain())


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def test_round_trip_float16_then_bit_exact(tmp_path):
    s = make_set()
    a = SyntheticSet.load(s.save(tmp_path / "a.pt"))
    assert a.images.dtype == torch.float32
    assert torch.equal(a.images, s.images.half().float())
    assert not torch.equal(a.images, s.images)  # it really is stored in half precision
    assert torch.equal(a.labels, s.labels) and a.labels.dtype == torch.int64
    assert a.grid == (2, 2) and a.dataset == "digits"
    assert a.mean == s.mean and a.std == s.std
    assert a.config == s.config
    b = SyntheticSet.load(a.save(tmp_path / "b.pt"))
    assert tensor_bytes(b.images) == tensor_bytes(a.images)
    assert tensor_bytes(b.labels) == tensor_bytes(a.labels)
    assert (b.grid, b.dataset, b.mean, b.std, b.config) == (a.grid, a.dataset, a.mean, a.std, a.config)
    assert a.ipc == 3 and a.num_classes == 4


def test_save_clamps_to_unit_range(tmp_path):
    s = make_set(grid=(1, 1))
    s.images[0, 0, 0, 0], s.images[1, 0, 0, 0] = -0.5, 1.7
    a = SyntheticSet.load(s.save(tmp_path / "c.pt"))
    assert a.images[0, 0, 0, 0] == 0 and a.images[1, 0, 0, 0] == 1
    assert 0 <= a.images.min() and a.images.max() <= 1


def test_atomic_save_leaves_no_temp_files(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    path = make_set().save(folder / "set.pt")
    assert sorted(p.name for p in folder.iterdir()) == ["set.pt"]
    before = path.read_bytes()

    def crash(obj, fh, *args, **kwargs):  # a crash half-way through writing
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        make_set(seed=1).save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == ["set.pt"]  # no torn temp file
    assert path.read_bytes() == before  # the old artifact is intact
    SyntheticSet.load(path)


def one_line_error(path) -> str:
    with pytest.raises(DsdmError) as err:
        SyntheticSet.load(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_foreign_files_give_one_line(tmp_path):
    untagged = tmp_path / "plain.pt"
    torch.save({"images": torch.rand(2, 1, 8, 8), "labels": torch.zeros(2)}, untagged)
    assert "format tag" in one_line_error(untagged)

    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    assert "not a readable distilled set" in one_line_error(text)

    real = make_set().save(tmp_path / "real.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    assert "not a readable distilled set" in one_line_error(truncated)

    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    assert "format tag" in one_line_error(tensor_only)

    assert "does not exist" in one_line_error(tmp_path / "missing.pt")


def test_newer_version_refused(tmp_path):
    path = tmp_path / "future.pt"
    torch.save({"format": synthetic.FORMAT, "version": synthetic.VERSION + 1}, path)
    assert "newer" in one_line_error(path)


def test_decoded_grid_2x2():
    s = make_set(grid=(2, 2))
    x, y = s.decoded()
    assert x.shape == (4 * len(s.images), 1, 8, 8)
    assert torch.equal(y, s.labels.repeat_interleave(4))
    # tile (0, 0) of stored image 0 upsampled: its top-left pixel region comes from the stored top-left
    assert torch.allclose(x[0, 0, 0, 0], s.images[0, 0, 0, 0])
    x1, y1 = make_set(grid=(1, 1)).decoded()
    assert x1.shape == (12, 1, 8, 8) and torch.equal(x1, make_set(grid=(1, 1)).images)
