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


# ----- storage/ owns every byte at rest ---------------------------------------------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE_STORAGE = ("sae", "tasks", "flows", "saeflow")
FILE_CALLS = {
    "makedirs",
    "mkdir",
    "mkdtemp",
    "mkstemp",
    "TemporaryDirectory",
    "NamedTemporaryFile",
    "rmtree",
    "copytree",
    "copyfile",
    "write_text",
    "write_bytes",
    "savefig",
    "save_file",
    "open_group",
    "open_array",
    "create_array",
    "to_zarr",
}
"""Calls that create, write or remove files or directories (and Zarr's own openers)."""
OS_FILE_CALLS = {"remove", "unlink", "rmdir", "rename", "replace", "move", "copy", "copy2"}
"""The same, when called on os or shutil (a hook handle's .remove() is no file operation)."""
STORAGE_LIBRARIES = ("zarr", "safetensors", "fsspec", "mlflow")


def _package_files():
    for part in OUTSIDE_STORAGE:
        for dirpath, _, names in os.walk(os.path.join(REPO, part)):
            for name in names:
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, name), REPO)


def _offences(path: str) -> list[str]:
    import ast

    with open(os.path.join(REPO, path)) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            receiver = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else None
            if name in FILE_CALLS or (name in OS_FILE_CALLS and receiver in ("os", "shutil")):
                found.append(f"{path}:{node.lineno} calls {name}()")
            if name == "open":
                modes = list(node.args[1:2]) + [k.value for k in node.keywords if k.arg == "mode"]
                mode = modes[0].value if modes and isinstance(modes[0], ast.Constant) else "r"
                if set(str(mode)) & set("wax+"):
                    found.append(f"{path}:{node.lineno} opens a file for writing ({mode!r})")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{path}:{node.lineno} imports {m}" for m in mods if m.split(".")[0] in STORAGE_LIBRARIES]
        elif isinstance(node, ast.Attribute) and node.attr == "client" and isinstance(node.value, ast.Name):
            found.append(f"{path}:{node.lineno} reaches into the tracker's MLflow client ({node.value.id}.client)")
    return sorted(found, key=lambda o: int(o.split(":")[1].split()[0]))  # ast.walk is breadth-first


def test_nothing_outside_storage_writes_or_removes_files_or_talks_to_storage_libraries():
    files = list(_package_files())
    assert "tasks/train.py" in files and "saeflow/cli.py" in files and "sae/architectures/base.py" in files
    offences = [o for f in files for o in _offences(f)]
    assert offences == []


def test_the_layering_check_catches_what_it_looks_for(tmp_path, monkeypatch):
    """The check above would fail on each kind of offence (so its silence means something)."""
    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "x.py").write_text(
        "import os, zarr\nos.makedirs('a')\nopen('f', 'w')\nopen('g')\nwith open('h', mode='a') as f: pass\n"
        "tr.client.log_text('r', 't', 'p')\nhandle.remove()\nos.remove('x')\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    assert _offences("tasks/x.py") == [
        "tasks/x.py:1 imports zarr",
        "tasks/x.py:2 calls makedirs()",
        "tasks/x.py:3 opens a file for writing ('w')",
        "tasks/x.py:5 opens a file for writing ('a')",
        "tasks/x.py:6 reaches into the tracker's MLflow client (tr.client)",
        "tasks/x.py:8 calls remove()",
    ]


# ----- one installed import package --------------------------------------------------------------------------------
def test_the_install_exposes_one_top_level_package_and_no_bare_room_names(tmp_path):
    import importlib.metadata
    import sysconfig

    site_packages = sysconfig.get_paths()["purelib"]
    (dist,) = [d for d in importlib.metadata.distributions(path=[site_packages]) if d.metadata["Name"] == "saeflow"]
    assert dist.read_text("top_level.txt").split() == ["saeflow"]
    probe = (
        "import importlib\n"
        "for name in ('sae', 'storage', 'tasks', 'flows'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        print(name, 'imported')\n"
        "    except ImportError as e:\n"
        "        print(name, type(e).__name__, e)\n"
        "import saeflow.sae, saeflow.storage, saeflow.tasks, saeflow.flows\n"
        "print('saeflow ok')\n"
    )
    elsewhere = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert elsewhere.stdout.splitlines() == [
        "sae ModuleNotFoundError No module named 'sae'",
        "storage ModuleNotFoundError No module named 'storage'",
        "tasks ModuleNotFoundError No module named 'tasks'",
        "flows ModuleNotFoundError No module named 'flows'",
        "saeflow ok",
    ]
    # From the repository root the folders are on sys.path ('' = cwd), and each refuses its bare name.
    here = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert here.returncode == 0, here.stderr
    assert here.stdout.splitlines() == [
        "sae ImportError import saeflow.sae, not sae: the library is installed as part of saeflow",
        "storage ImportError import saeflow.storage, not storage",
        "tasks ImportError import saeflow.tasks, not tasks",
        "flows ImportError import saeflow.flows, not flows",
        "saeflow ok",
    ]


def test_every_package_folder_is_listed_in_pyproject():
    """pyproject lists the packages by hand (package-dir maps folders; setuptools cannot find mapped ones)."""
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    mapping = {folder: package for package, folder in tool["package-dir"].items()}
    found = set()
    for folder, package in mapping.items():
        for dirpath, _, names in os.walk(os.path.join(REPO, folder)):
            if "__init__.py" in names:
                rel = os.path.relpath(dirpath, os.path.join(REPO, folder))
                found.add(package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}")
    assert found == set(tool["packages"])
