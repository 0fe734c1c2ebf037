"""sae_retrain: the nightly job. Fresh data gets fresh stores (they are keyed by content); unchanged data and
config retrain with a new seed or skip (`retrain.when_unchanged`); every new version meets the promotion gate."""

from __future__ import annotations

from typing import Any

from prefect import flow

from saeflow.config import PipelineConfig
from saeflow.flows.pipeline import run_tracked
from saeflow.storage.locks import root_lock
from saeflow.tasks.extract import extract_activations
from saeflow.tasks.preflight import preflight
from saeflow.tasks.retrain import plan_retraining, publish_skip
from saeflow.tasks.tokenize import tokenize_dataset


@flow(name="sae_retrain", log_prints=True)
def sae_retrain(config: PipelineConfig) -> dict[str, Any]:
    """Tokenize and extract the current data (reusing finished stores), decide whether to train, then train,
    evaluate and gate each SAE against its champion."""
    with root_lock(config.root):
        preflight(config)
        tokens = tokenize_dataset(config)
        acts = extract_activations(config, tokens)
        plan = plan_retraining(config, acts)
        if not plan.train:
            publish_skip(config, plan)
            return {"skipped": True, "reason": plan.reason}
        cfg = config.model_copy(update={"train": config.train.model_copy(update={"seed": plan.seed})})
        return {"skipped": False, "reason": plan.reason, **run_tracked(cfg, "sae_retrain", tokens, acts)}
