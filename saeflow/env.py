"""Process-wide environment defaults, applied once when any part of saeflow is imported.

Offline-friendly settings for Prefect, MLflow and HF; an explicit environment setting always wins. This is the
only module that sets them, and it imports nothing heavy, so every layer (the `sae` library included) may import it.
"""

from __future__ import annotations

import os
import re
import urllib.parse

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
"""Environment variables set unless already set: no telemetry, a patient ephemeral Prefect server."""

DEFAULT_DATA_ROOT = "saeflow-data"
"""The config's default root (relative to the working directory); the demo's MLflow store lives under it."""


def apply_defaults() -> None:
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)


def take_credentials(uri: str) -> str:
    """`uri` without its `user:password@` part, which moves to MLflow's credential variables.

    A password in the tracking URI would be logged and passed wherever the URI goes (run params, the resolved
    config artifact, Prefect's flow-run parameters and logs, CLI output). MLflow reads the same credentials from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, so the URI saeflow keeps and shows carries none."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact(text: str) -> str:
    """`text` with the password of any `scheme://user:password@host` URL in it replaced by `***`."""
    return re.sub(r"(\w+://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the demo's SQLite store under ./saeflow-data (the config's default root)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return take_credentials(env) if env else "sqlite:///" + os.path.abspath(f"{DEFAULT_DATA_ROOT}/mlflow.db")


apply_defaults()
