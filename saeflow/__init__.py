"""saeflow: Prefect flows from a language model to trained, evaluated, registered sparse autoencoders."""

import os

# Offline-friendly defaults; an explicit environment setting always wins.
for _k, _v in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_k, _v)


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the demo's SQLite store under ./saeflow-data (the config's default root)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath("saeflow-data/mlflow.db")


def load_sae(ref: str, tracking_uri: str | None = None, device: str = "cpu"):
    """Load an SAE as a torch module from a checkpoint directory or a registered model (`name@alias`, `name/3`)."""
    import tempfile

    from storage.checkpoints import load_sae as load_dir
    from storage.tracking import pull

    if os.path.isdir(ref):
        return load_dir(ref, device)
    uri = tracking_uri or default_tracking_uri()
    return load_dir(pull(ref, tempfile.mkdtemp(prefix="saeflow-pull-"), uri), device)
