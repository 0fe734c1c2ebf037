"""Process-wide environment defaults, applied once when any part of saeflow is imported.

Offline-friendly settings for Prefect, MLflow and HF; an explicit environment setting always wins. This is the
only module that sets them, and it imports nothing heavy, so every layer (the `sae` library included) may import it.
"""

from __future__ import annotations

import os

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


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the demo's SQLite store under ./saeflow-data (the config's default root)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath(f"{DEFAULT_DATA_ROOT}/mlflow.db")


apply_defaults()
