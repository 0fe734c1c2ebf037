from __future__ import annotations

from typing import Any

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from storage.tokens import TokenStoreRef
from tasks.common import run_logger, tracker


@task(name="start-mlflow-run", cache_policy=NO_CACHE)
def start_pipeline_run(cfg: PipelineConfig, flow_name: str = "sae_pipeline") -> str:
    """Open the parent MLflow run and record the resolved config on it."""
    tr = tracker(cfg)
    run_id = tr.start_run(cfg.name, tags={"saeflow.flow": flow_name, "model": cfg.model.name})
    dumped = cfg.model_dump(mode="json")
    tr.log_params(run_id, {k: v for k, v in dumped.items() if k != "saes"})
    tr.log_params(run_id, {"saes": [s.label() for s in cfg.saes]})
    tr.client.log_text(run_id, yaml.safe_dump(dumped, sort_keys=False), "config/resolved.yaml")
    run_logger().info(f"MLflow run {run_id} at {tr.tracking_uri}")
    return run_id


@task(name="log-token-manifest", cache_policy=NO_CACHE)
def log_token_manifest(cfg: PipelineConfig, run_id: str, tokens: TokenStoreRef) -> None:
    tracker(cfg).log_dict(run_id, tokens.manifest(), "manifests/tokens.json")


@task(name="finish-mlflow-run", cache_policy=NO_CACHE)
def finish_pipeline_run(cfg: PipelineConfig, run_id: str, results: dict[str, Any], status: str = "FINISHED") -> None:
    tr = tracker(cfg)
    if results:
        tr.log_dict(run_id, results, "eval/summary.json")
    tr.end_run(run_id, status)
