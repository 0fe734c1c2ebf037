"""Where saeflow keeps things: plain identities in, locations out. The only place that names store paths.

    <store>/tokens/<hash of the token store's identity>        Zarr token store (storage/tokens.py)
    <store>/activations/<hash of the activation identity>      Zarr activation store (storage/activations.py)
    <root>/checkpoints/<hash of the training group>/           safetensors checkpoints (storage/checkpoints.py)
    <root>/mlartifacts/                                        MLflow artifacts of the default SQLite store
    <root>/downloads/<ref>-<hash of tracking URI>/             registered SAEs downloaded for evaluation
    <root>/mlflow.db                                           the default MLflow tracking store
    <root>/.saeflow.lock                                       held by the one run using the root (storage/locks.py)
    <root>/.saeflow.reserve                                    space set aside for closing runs on a full disk
    <root>/logs/<command>-<time>-<pid>.log                     what the CLI logged, tracebacks included

`<store>` defaults to `<root>/store` and may be an fsspec URL (s3://…); `<root>` is the config's local root.
Identities are JSON-able dicts: equal identities give the same location, so a finished store is found again.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from typing import Any

from saeflow.storage.zarr_io import config_hash, join


def token_store_url(store_url: str, identity: dict[str, Any]) -> str:
    return join(store_url, "tokens", config_hash(identity))


def activation_store_url(store_url: str, identity: dict[str, Any]) -> str:
    return join(store_url, "activations", config_hash(identity))


def checkpoint_key(identity: dict[str, Any]) -> str:
    return config_hash(identity)


def checkpoint_url(root: str, key: str) -> str:
    return os.path.join(root, "checkpoints", key)


def registry_download_dir(root: str, tracking_uri: str, ref: str) -> str:
    """Where a registered SAE reference is downloaded for evaluation: one directory per reference and server, so
    repeated evaluations replace it instead of leaving temporary copies behind."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in ref)
    return os.path.join(root, "downloads", f"{safe}-{config_hash({'tracking_uri': tracking_uri})[:8]}")


def lock_path(root: str) -> str:
    return os.path.join(root, ".saeflow.lock")


def reserve_path(root: str) -> str:
    return os.path.join(root, ".saeflow.reserve")


def new_log_path(command: str, root: str | None) -> str:
    """`<root>/logs/<command>-<UTC time>-<pid>.log`, created empty; under the temp dir when there is no root or it
    cannot be written (a read-only root still gets its one-line error, and a log somewhere)."""
    name = f"{command}-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-{os.getpid()}.log"
    dirs = [os.path.join(root, "logs")] if root else []
    for directory in [*dirs, os.path.join(tempfile.gettempdir(), "saeflow-logs")]:
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, name)
            with open(path, "a"):
                return path
        except OSError:
            continue
    raise OSError(f"no writable directory for the log file (tried {dirs} and the temp dir)")


def local_artifact_location(root: str) -> str:
    """MLflow artifact root beside the default SQLite store; creates `root` so the store can be opened."""
    os.makedirs(root, exist_ok=True)
    return "file://" + os.path.abspath(os.path.join(root, "mlartifacts"))
