"""Shared fixtures: a private zoo cache, the shared data folder, digits and a tiny digits zoo."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers with a 2-thread torch each (and their subprocesses) oversubscribe 2 cores: one each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import dsdm  # noqa: E402,F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch starts OpenMP)
import pytest  # noqa: E402

# The shared read-only data (MNIST, FashionMNIST, spoken_commands) next to the checkout.
SHARED = Path(os.environ.get("DSDM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")

# The tiny zoo every distillation/coreset test shares (seconds to train on digits).
TINY_ZOO = {"num_models": 2, "snapshots": (1, 2), "max_per_class": 30}


@pytest.fixture(scope="module")
def one_thread():
    """Intra-op threads spin-wait against each other on a shared 2-core box (~20 ms per op); the
    tensors of the unit tests are tiny, so one thread is both faster and stable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dsdm_cache")


@pytest.fixture(autouse=True)
def _private_zoo_cache(cache_root, monkeypatch):
    """No test writes to ~/.cache/dsdm: DSDM_CACHE points at a session tmp folder."""
    monkeypatch.setenv("DSDM_CACHE", str(cache_root))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED} (set DSDM_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def digits():
    from dsdm.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_zoo(digits):
    """2 convnet3 models on 30 images per class, snapshots at epochs 1 and 2."""
    from dsdm.config import ZooConfig
    from dsdm.zoo import train_zoo

    return train_zoo(digits, ZooConfig(**TINY_ZOO))


@pytest.fixture(scope="session")
def smoke_zoo(tmp_path_factory, digits) -> Path:
    """The zoo of the tests' tiny smoke search (helpers.TINY), trained once in this process: copied
    into a search's storage by helpers.seed_zoo where the test is not about the zoo, so that search
    starts no zoo actor (~5 CPU-s a search). Returns the zoo's folder, `<tmp>/zoos/<zoo key>`."""
    from helpers import TINY

    from dsdm.zoo import load_or_train_zoo
    from tune.optuna_search import SearchSpec, base_config
    from tune.space import parse_fixed, search_space

    spec = SearchSpec(dataset="digits", budget="smoke", sets=tuple(TINY[1::2]))
    fixed = parse_fixed(spec.fix)
    cfg = base_config(spec, search_space(spec.budget, fixed), fixed)
    _, folder = load_or_train_zoo(digits, cfg.zoo, tmp_path_factory.mktemp("smoke_zoo") / "zoos", cfg.data.seed,
                                  cfg.data.val_fraction)
    return folder


@pytest.fixture(scope="session")
def mnist(shared_data):
    """Real MNIST from the shared folder (loading only: 28x28 is ~15x slower than digits)."""
    if not (shared_data / "MNIST").is_dir():
        pytest.skip(f"shared MNIST not found under {shared_data} (set DSDM_SHARED_DATA)")
    from dsdm.data import load_dataset

    return load_dataset("mnist", shared_data, offline=True)
