"""Every byte saeflow keeps at rest: token and activation stores (Zarr), checkpoints (safetensors), MLflow."""

if __name__ != "saeflow.storage":  # only ever imported as part of saeflow
    raise ImportError(f"import saeflow.storage, not {__name__}")
