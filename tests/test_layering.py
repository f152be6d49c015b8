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
