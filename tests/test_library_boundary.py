"""`sae/` is the pure-torch library a researcher imports in a notebook: importing all of it loads none of the
pipeline's infrastructure (Prefect, MLflow, Zarr, Dask)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import saeflow.sae as sae

FORBIDDEN = ("prefect", "mlflow", "zarr", "dask", "distributed")


def test_importing_every_sae_module_loads_no_pipeline_infrastructure():
    modules = sorted(m.name for m in pkgutil.walk_packages(sae.__path__, "saeflow.sae."))
    assert {
        "saeflow.sae.architectures.base",
        "saeflow.sae.evaluation.promotion",
        "saeflow.sae.training.trainer",
        "saeflow.sae.evaluation.evaluate",
    } <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({FORBIDDEN!r})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
