"""What a registered SAE version records: the identity tags a retrain compares, its tags and descriptions, and the
metadata saved with its weights. Plain functions of the config, so the train task only composes them."""

from __future__ import annotations

from typing import Any

from saeflow.config import PipelineConfig
from saeflow.sae.architectures.base import SAEConfig
from saeflow.storage.activations import ActivationStoreRef
from saeflow.storage.stats import SiteStats
from saeflow.storage.tracking import code_version
from saeflow.storage.zarr_io import config_hash
from saeflow.tasks.common import model_identity

RETRAIN_KEYS = ("data_hash", "config_hash", "train_hash")
"""Version tags that say what an SAE was trained from; equal on every SAE means a retrain would change nothing
but the seed."""


def version_identity(cfg: PipelineConfig, spec: SAEConfig, data_hash: str) -> dict[str, str]:
    """The data, SAE spec and training settings (seed and reporting knobs left out) a version was trained from."""
    train = cfg.train.model_dump(mode="json", exclude={"seed", "log_every", "checkpoint_every_tokens", "device"})
    return {
        "data_hash": data_hash,
        "config_hash": config_hash(spec.model_dump(mode="json")),
        "train_hash": config_hash(train),
    }


def model_description(cfg: PipelineConfig, site: str, architecture: str) -> str:
    return (
        f"{architecture} sparse autoencoders trained by saeflow on {cfg.model.name} activations at {site} "
        f"({site.split('.')[0]} of block {site.split('.')[-1]}). Aliases: `champion` is the version that passed "
        f"the promotion gate (pull this one), `challenger` the newest candidate, `{cfg.tracking.alias}` the newest "
        "version. Versions carry their held-out metrics (l0, fvu, ce_loss_recovered, dead_fraction) and the "
        "gate's decision (promotion.*) as tags. Load with mlflow.pyfunc.load_model (codes from raw activations) "
        "or saeflow.load_sae."
    )


def version_tags(cfg: PipelineConfig, site: str, spec: SAEConfig, data_hash: str) -> dict[str, Any]:
    """Tags of a new version: where and what it is, what it was trained from, the seed and the code."""
    return {
        "site": site,
        "architecture": spec.architecture,
        "label": spec.label(),
        **version_identity(cfg, spec, data_hash),
        "model": cfg.model.name,
        "seed": cfg.train.seed,
        "code_version": code_version() or "unknown",
    }


def sae_metadata(
    cfg: PipelineConfig, site: str, stats: SiteStats, acts: ActivationStoreRef, data_hash: str
) -> dict[str, Any]:
    """Saved in the checkpoint's cfg.json: what evaluation and users need to apply the SAE to raw activations."""
    return {
        "site": site,
        "model": model_identity(cfg),
        "normalize": stats.normalize,
        "input_scale": stats.scale,
        "outlier_norm_threshold": stats.outlier_norm_threshold,
        "activation_store": acts.url,
        "data_hash": data_hash,
    }
