"""Every byte saeflow keeps at rest: token and activation stores (Zarr), checkpoints (safetensors), MLflow."""
