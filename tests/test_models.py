"""Model registry: shapes, feature_dim, gradients, determinism, on every geometry we use."""
import pytest
import torch

from dsdm.errors import DsdmError
from dsdm.models import MODELS, count_parameters, get_model, list_models

GEOMETRIES = {  # name: (channels, (H, W))
    "digits8": (1, (8, 8)),
    "mnist28": (1, (28, 28)),
    "cifar32": (3, (32, 32)),
    "speech64": (1, (64, 64)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def build(name, channels, size, num_classes=10, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_model(name, channels, num_classes, size)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("name", list_models())
def test_forward_embed_backward(name, geometry):
    channels, size = GEOMETRIES[geometry]
    model = build(name, channels, size, num_classes=7)
    x = torch.randn(3, channels, *size, requires_grad=True)  # (N, C, H, W)
    feats = model.embed(x)
    assert isinstance(model.feature_dim, int)
    assert feats.shape == (3, model.feature_dim)
    logits = model(x)
    assert logits.shape == (3, 7)
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name,channels,size,expected", [
    ("convnet3", 1, (8, 8), 128),  # 8 -> 4 -> 2 -> 1
    ("convnet3", 1, (28, 28), 2048),  # padding 3 on the first conv: behaves as 32x32
    ("convnet3", 3, (32, 32), 2048),
    ("convnet4", 1, (64, 64), 2048),  # 128 * 4 * 4
    ("convnet4", 1, (8, 8), 128),  # pooling stops at 1x1
    ("resnet10", 3, (32, 32), 256),
    ("densenet121", 3, (32, 32), 384),
])
def test_feature_dim(name, channels, size, expected):
    model = build(name, channels, size)
    assert model.feature_dim == expected
    assert model.embed(torch.zeros(2, channels, *size)).shape == (2, expected)


def test_densenet_layout():
    """growth 12, (6, 12, 24, 16), transitions halve channels, CIFAR stem without pool0."""
    model = build("densenet121", 3, (32, 32))
    f = model.features
    assert f.conv0.kernel_size == (3, 3) and f.conv0.stride == (1, 1) and f.conv0.out_channels == 24
    assert not hasattr(f, "pool0")
    assert [len(getattr(f, f"denseblock{i}")) for i in range(1, 5)] == [6, 12, 24, 16]
    for i, (cin, cout) in enumerate([(96, 48), (192, 96), (384, 192)], start=1):
        conv = getattr(f, f"transition{i}").conv
        assert (conv.in_channels, conv.out_channels) == (cin, cout)


def test_resnet10_layout():
    model = build("resnet10", 3, (32, 32))
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert [b.conv1.out_channels for b in model.blocks] == [32, 64, 128, 256]
    assert [b.conv1.stride[0] for b in model.blocks] == [1, 2, 2, 2]


def test_convnet_uses_instance_norm():
    model = build("convnet3", 3, (32, 32))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 and n.affine for n in norms)


def test_deterministic_under_seed():
    a, b = build("convnet3", 3, (32, 32), seed=3), build("convnet3", 3, (32, 32), seed=3)
    c = build("convnet3", 3, (32, 32), seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.classifier.weight, c.classifier.weight)


def test_unknown_model_lists_valid_names():
    with pytest.raises(DsdmError, match="convnet3.*resnet10"):
        get_model("vgg11", 3, 10, (32, 32))
    assert set(list_models()) == set(MODELS) >= {"convnet3", "convnet4", "resnet10", "densenet121"}


def test_parameter_counts():
    counts = {name: count_parameters(build(name, 3, (32, 32))) for name in list_models()}
    for name, count in counts.items():
        print(f"{name}: {count:,} parameters at 3x32x32, 10 classes")
    assert counts["convnet3"] == 320_010  # 3 conv blocks + Linear(2048, 10), as DC/DM's ConvNet
