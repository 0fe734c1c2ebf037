"""SAE checkpoints on disk: `sae_weights.safetensors` + `cfg.json` (never pickle)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae.base import SAE, build_sae, config_from_dict

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"


def save_sae(sae: SAE, directory: str, metadata: dict[str, Any] | None = None) -> str:
    """Write weights and config (architecture, d_in, hyperparameters, plus `metadata` such as site and model)."""
    os.makedirs(directory, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS))
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "sae": sae.cfg.model_dump(), "metadata": metadata or {}}
    with open(os.path.join(directory, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    return directory


def read_sae_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory!r} is not a saeflow SAE checkpoint: it has no {CONFIG}")
    with open(path) as f:
        return json.load(f)


def load_sae(directory: str, device: str | torch.device = "cpu") -> SAE:
    """Rebuild the SAE module saved by `save_sae` (or pulled from the registry) and load its weights."""
    cfg = read_sae_config(directory)
    sae = build_sae(config_from_dict(cfg["sae"]), cfg["d_in"])
    sae.load_state_dict(load_file(os.path.join(directory, WEIGHTS), device=str(device)))
    return sae.to(device).eval()
