"""sae_pipeline: tokenize → extract → stats → train (per site) → evaluate (per site) → promote → publish."""

from __future__ import annotations

from typing import Any

from prefect import flow

from saeflow.config import PipelineConfig
from saeflow.storage.activations import ActivationStoreRef
from saeflow.storage.integrity import locate_corruption
from saeflow.storage.locks import root_lock
from saeflow.storage.tokens import TokenStoreRef
from saeflow.tasks.evaluate import evaluate_site_saes
from saeflow.tasks.extract import extract_activations
from saeflow.tasks.preflight import preflight
from saeflow.tasks.promote import promote_site_saes
from saeflow.tasks.stats import compute_stats
from saeflow.tasks.tokenize import tokenize_dataset
from saeflow.tasks.tracking import (
    close_failed_run,
    finish_pipeline_run,
    log_token_manifest,
    publish_results,
    start_pipeline_run,
)
from saeflow.tasks.train import train_site_saes


def train_and_evaluate(
    config: PipelineConfig,
    run_id: str,
    tokens: TokenStoreRef,
    acts: ActivationStoreRef,
    results: dict[str, Any],
    promotions: dict[str, Any],
) -> None:
    """Stats, then per training group: train → evaluate → promotion gate, under parent run `run_id`. Fills
    `results` ({site: {label: metrics}}) and `promotions` ({site: {label: decision}}) as sites finish, so a failure
    still leaves what was done."""
    log_token_manifest(config, run_id, tokens)
    stats = compute_stats(config, acts, run_id)
    for site, specs in config.training_groups():
        trained = train_site_saes(config, acts, stats[site], site, specs, run_id)
        metrics = evaluate_site_saes(config, tokens, stats[site], site, trained)
        results.setdefault(site, {}).update(metrics)
        promotions.setdefault(site, {}).update(promote_site_saes(config, tokens, site, trained, metrics))


def run_tracked(
    config: PipelineConfig,
    flow_name: str,
    tokens: TokenStoreRef | None = None,
    acts: ActivationStoreRef | None = None,
    report=None,
) -> dict[str, Any]:
    """Open the MLflow parent run, tokenize and extract (unless given), train → evaluate → promote, then
    `report(run_id, results)` (the sweep's frontier; its dict joins the output), publish the results as Prefect
    artifacts and close the run (FAILED if a stage raised). Shared by the pipeline, sweep and retrain flows."""
    with root_lock(config.root):  # one run per root: the stores, checkpoints and MLflow store there are ours
        return _run_tracked(config, flow_name, tokens, acts, report)


def _run_tracked(
    config: PipelineConfig,
    flow_name: str,
    tokens: TokenStoreRef | None,
    acts: ActivationStoreRef | None,
    report,
) -> dict[str, Any]:
    preflight(config)
    run_id = start_pipeline_run(config, flow_name)
    results: dict[str, Any] = {}
    promotions: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        tokens = tokens or tokenize_dataset(config)
        acts = acts or extract_activations(config, tokens)
        train_and_evaluate(config, run_id, tokens, acts, results, promotions)
        if report is not None:
            extra = report(run_id, results)
        url = publish_results(config, run_id, results, promotions)
    except BaseException as e:
        close_failed_run(config, run_id, results)
        if named := locate_corruption(e, {"token store": tokens, "activation store": acts}):
            raise named from e
        raise
    finish_pipeline_run(config, run_id, results)
    return {"run_id": run_id, "mlflow_url": url, "metrics": results, "promotions": promotions, **extra}


@flow(name="sae_pipeline", log_prints=True)
def sae_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Text → token windows → activations → normalization stats → trained SAEs → evaluated, registered SAEs,
    each new version gated against its model's champion."""
    return run_tracked(config, "sae_pipeline")
