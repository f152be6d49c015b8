"""dsdm/ never imports Ray or MLflow: `import dsdm`, its modules, and a short distillation run in a
fresh interpreter leave both out of sys.modules (the library runs where neither is installed)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
import dsdm
assert not {"ray", "mlflow"} & set(sys.modules), "import dsdm"
import dsdm.cli, dsdm.distill, dsdm.evaluate, dsdm.fastpath, dsdm.losses, dsdm.zoo, dsdm.bench
from dsdm.config import ZooConfig, make_config
from dsdm.data import load_dataset
from dsdm.distill import Distiller
from dsdm.zoo import train_zoo

digits = load_dataset("digits")
zoo = train_zoo(digits, ZooConfig(num_models=1, snapshots=(1,), max_per_class=10))
cfg = make_config("smoke", {"distill.num_models": 1, "distill.ipc": 1, "distill.batch_real": 8,
                            "distill.iterations": 2, "distill.aug_refresh": 1, "zoo.num_models": 1})
Distiller(digits, cfg, zoo).run(log=lambda m, s: None)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow")))
"""


def test_dsdm_and_a_distillation_run_import_neither_ray_nor_mlflow():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# --- imports go one way: dsdm <- tune <- ablations; Ray objects are assembled in one module ----------
PACKAGES = ("dsdm", "tune", "ablations")
ORCHESTRATION = ("ray", "optuna", "mlflow")
# the calls that assemble an experiment out of Ray objects (tune/experiment.py's job)
ASSEMBLY = {"Tuner", "TuneConfig", "RunConfig", "with_resources", "with_parameters", "init", "start_ray"}
ASSEMBLERS = {"tune/experiment.py", "tune/runner.py"}  # runner: ray.init for a session


def imported_modules(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def called_names(path: Path) -> set[str]:
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            out.add(f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", ""))
    return out


def test_imports_go_one_way():
    for package, allowed in (("dsdm", {"dsdm"}), ("tune", {"dsdm", "tune"}), ("ablations", set(PACKAGES))):
        for path in sorted((REPO / package).rglob("*.py")):
            ours = {m.split(".")[0] for m in imported_modules(path)} & set(PACKAGES)
            assert ours <= allowed, f"{path.relative_to(REPO)} imports {sorted(ours - allowed)}"
            if package == "dsdm":
                used = {m.split(".")[0] for m in imported_modules(path)} & set(ORCHESTRATION)
                assert not used, f"{path.relative_to(REPO)} imports {sorted(used)}"


def test_only_the_experiment_module_assembles_ray_objects():
    for package in ("tune", "ablations"):
        for path in sorted((REPO / package).rglob("*.py")):
            where = str(path.relative_to(REPO))
            if where in ASSEMBLERS:
                continue
            assembled = called_names(path) & ASSEMBLY
            assert not assembled, f"{where} assembles Ray objects itself ({sorted(assembled)}); use tune.experiment"


def test_no_sweep_imports_the_search_cli_for_its_machinery():
    for path in sorted((REPO / "ablations").glob("*.py")):
        text = path.read_text()
        assert "from tune.search import" not in text and "import tune.search" not in text, path.name


def test_architecture_doc_names_every_module():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    for package in (*PACKAGES, "benchmarks"):
        for path in sorted((REPO / package).glob("*.py")):
            if path.name != "__init__.py" or path.stat().st_size > 200:
                assert f"`{package}/{path.name}`" in doc, f"docs/ARCHITECTURE.md does not name {package}/{path.name}"
