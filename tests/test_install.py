"""The install cannot drift: the compiled trio is pinned exactly, every other dependency has a
ceiling, constraints.txt agrees with pyproject.toml, and every module imports in a fresh
interpreter (a broken binary such as a mismatched torchaudio shows up here, not at collection)."""
from __future__ import annotations

import importlib.metadata
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dsdm", "tune", "ablations")
TRIO = ("torch", "torchvision", "torchaudio")


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_compiled_trio_is_pinned_exactly_and_everything_else_has_a_ceiling():
    for req in requirements():
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        if name in TRIO:
            assert re.fullmatch(rf"{name}==\d+\.\d+\.\d+", req), f"{req}: pin the compiled trio exactly"
        else:
            assert "<" in req, f"{req}: give it an upper bound at its next major version"


def test_constraints_agree_with_pyproject_and_the_installed_trio():
    pins = constraints()
    for req in requirements():
        name = re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower()
        assert name in pins, f"constraints.txt lacks {name}; regenerate it (see its header)"
        if name in TRIO:
            assert req == f"{name}=={pins[name]}", (req, pins[name])
    from dsdm.speech import TORCHAUDIO_PIN  # the error message names the same set

    assert TORCHAUDIO_PIN.split() == [f"{name}=={pins[name]}" for name in TRIO]
    for name in TRIO:  # the venv running the tests holds the pinned set (a local tag like +cu130 aside)
        assert importlib.metadata.version(name).split("+")[0] == pins[name]


def project_modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not info.name.endswith("__main__"):  # running, not importing
                names.append(info.name)
    return names


def test_every_module_imports_in_a_fresh_interpreter():
    names = project_modules()
    assert {"dsdm.speech", "tune.search", "tune.experiment", "ablations.sweep"} <= set(names)
    script = ("import importlib, sys, traceback\nfailed = []\n"
              f"for name in {names!r}:\n"
              "    try:\n        importlib.import_module(name)\n"
              "    except BaseException as exc:\n        failed.append(f'{name}: {type(exc).__name__}: {exc}')\n"
              "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_torchaudio_that_does_not_load_is_a_one_line_error_naming_the_pin(monkeypatch):
    from dsdm import speech
    from dsdm.errors import DsdmError

    def broken(name):
        raise OSError(f"/venv/lib/{name}/lib/libtorchaudio.so: undefined symbol: "
                      "torch_exception_get_what_without_backtrace")

    monkeypatch.setattr(speech.importlib, "import_module", broken)
    with pytest.raises(DsdmError) as err:
        speech.spectrograms(speech.torch.zeros(1, 16000))
    message = str(err.value)
    assert "\n" not in message and "undefined symbol" in message
    assert "torchaudio==2.11.0" in message and "torch==2.11.0" in message
