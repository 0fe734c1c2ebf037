"""Open Zarr v3 groups at a local path or any fsspec URL, and hash what we write."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import zarr
from zarr.core.array_spec import ArrayConfigParams


def local_path(url: str) -> str | None:
    """The filesystem path behind `url` if it is local (plain path or file://), else None."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def open_group(url: str, mode: Literal["r", "r+", "a", "w", "w-"] = "a") -> zarr.Group:
    """Zarr group at a local path (LocalStore) or an fsspec URL such as s3://bucket/store (FsspecStore)."""
    path = local_path(url)
    if path is not None:
        if mode != "r":
            os.makedirs(path, exist_ok=True)
        return zarr.open_group(path, mode=mode)
    return zarr.open_group(url, mode=mode)


WRITE_EVERY_CHUNK: ArrayConfigParams = {"write_empty_chunks": True}
"""Array config of every saeflow array: a chunk equal to the fill value is written too (zarr skips it by default),
so a missing chunk file always means a lost chunk (storage/integrity.py)."""


def array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of `group` (a typed lookup: a group member may also be a sub-group), opened to write every
    chunk (`WRITE_EVERY_CHUNK`; zarr binds that when the array is opened)."""
    with zarr.config.set({"array.write_empty_chunks": WRITE_EVERY_CHUNK["write_empty_chunks"]}):
        member = group[name]
    if not isinstance(member, zarr.Array):
        raise TypeError(f"{name!r} in the Zarr store is a group, not an array")
    return member


def config_hash(obj: Any, n: int = 16) -> str:
    """Short stable hash of a JSON-able object: identifies the config that produced a store."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
