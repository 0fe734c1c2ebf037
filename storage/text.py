"""Text sources for tokenization: a Hub dataset, local text/jsonl/parquet files, or the built-in Python docs.

Everything is read through HF `datasets`; Hub datasets stream, so only what is tokenized is downloaded.
"""

from __future__ import annotations

import ast
import glob
import os
import sysconfig
from collections.abc import Iterator

PYTHON_DOCS = "python-docs"
_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def python_docs_texts() -> Iterator[dict[str, str]]:
    """Every install's own English text: pydoc topic pages, then module/class/function docstrings of the stdlib.

    Docstrings are read with `ast` from the source files (nothing is imported), in sorted file order.
    """
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield {"text": str(topics[key])}
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "/test" in path or "idlelib" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    yield {"text": doc}


def _local_files(source: str) -> list[str]:
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
        return [f for f in files if os.path.splitext(f)[1] in _FORMATS]
    return sorted(glob.glob(path))


def looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or any(source.endswith(ext) for ext in _FORMATS) or "*" in source


def dataset_fingerprint(source: str, revision: str | None = None) -> str:
    """What the text of `source` is, now: local files by their names, sizes and content (sha256), a Hub dataset
    by its resolved commit (the named `revision` when the Hub cannot be reached), the Python docs by the Python
    version. Keys the token store, so grown or edited data gets new stores and unchanged data reuses them."""
    import hashlib
    import platform

    if source == PYTHON_DOCS:
        return f"python-docs:{platform.python_version()}"
    if looks_local(source) or os.path.exists(os.path.expanduser(source)):
        digest = hashlib.sha256()
        for path in _local_files(source):
            digest.update(f"{os.path.basename(path)}:{os.path.getsize(path)}:".encode())
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        return f"files:{digest.hexdigest()}"
    try:
        from huggingface_hub import HfApi

        return f"hub:{HfApi().dataset_info(source, revision=revision).sha}"
    except Exception:  # offline or unknown: the name and revision are all that is known
        return f"hub:{source}@{revision or 'main'}"


class DatasetError(ValueError):
    """A dataset that cannot give text; str() is one line naming the dataset, the row and the fix."""


def load_texts(
    source: str, text_field: str = "text", split: str = "train", subset: str | None = None, revision: str | None = None
) -> Iterator[str]:
    """Iterate the documents of `source` as strings."""
    import datasets

    if source == PYTHON_DOCS:
        for row in python_docs_texts():
            yield row["text"]
        return
    if looks_local(source) or os.path.exists(os.path.expanduser(source)):
        files = _local_files(source)
        if not files:
            raise FileNotFoundError(
                f"dataset.source {source!r} matches no .txt/.jsonl/.json/.parquet file: fix the path or glob"
            )
        if all(os.path.getsize(f) == 0 for f in files):
            raise DatasetError(
                f"dataset.source {source!r}: every file is empty ({', '.join(files[:3])}): give files with documents"
            )
        fmt = _FORMATS[os.path.splitext(files[0])[1]]
        ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=True)
    else:
        try:
            ds = datasets.load_dataset(source, subset, split=split, streaming=True, revision=revision)
        except Exception as e:
            raise DatasetError(
                f"cannot open Hub dataset {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                "use local files or 'python-docs' on a machine without Hub access"
            ) from e
    n = 0
    for n, row in enumerate(ds, 1):
        if n == 1 and text_field not in row:
            raise DatasetError(
                f"dataset {source!r} has no field {text_field!r}; set dataset.text_field to one of {sorted(row)}"
            )
        text = row.get(text_field)
        if not isinstance(text, str):
            raise DatasetError(
                f"dataset {source!r} row {n}: {text_field!r} is {type(text).__name__} {str(text)[:40]!r}, not text: "
                "fix or drop that row"
            )
        yield text
    if n == 0:
        raise DatasetError(f"dataset {source!r} has no rows: give a dataset with documents")
