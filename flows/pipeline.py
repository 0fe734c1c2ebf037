"""sae_pipeline: tokenize → extract → stats → train (per site) → evaluate (per site)."""

from __future__ import annotations

from typing import Any

from prefect import flow

from saeflow.config import PipelineConfig
from tasks.evaluate import evaluate_site_saes
from tasks.extract import extract_activations
from tasks.stats import compute_stats
from tasks.tokenize import tokenize_dataset
from tasks.tracking import finish_pipeline_run, log_token_manifest, start_pipeline_run
from tasks.train import train_site_saes


def training_groups(cfg: PipelineConfig) -> list[tuple[str, list]]:
    """(site, SAE specs) per train task: all of a site's SAEs together, or one task per site × SAE."""
    if cfg.train.group_by_site:
        return [(site, list(cfg.saes)) for site in cfg.extract.sites]
    return [(site, [spec]) for site in cfg.extract.sites for spec in cfg.saes]


def run_stages(config: PipelineConfig, run_id: str, results: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's stages under parent run `run_id`; fills `results` ({site: {sae label: metrics}}) as sites
    finish, so a failure still leaves what was done. Shared by sae_pipeline and sae_sweep."""
    tokens = tokenize_dataset(config)
    log_token_manifest(config, run_id, tokens)
    acts = extract_activations(config, tokens)
    stats = compute_stats(config, acts, run_id)
    for site, specs in training_groups(config):
        trained = train_site_saes(config, acts, stats[site], site, specs, run_id)
        results.setdefault(site, {}).update(evaluate_site_saes(config, tokens, stats[site], site, trained))
    return results


@flow(name="sae_pipeline", log_prints=True)
def sae_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Text → token windows → activations → normalization stats → trained SAEs → evaluated, registered SAEs."""
    run_id = start_pipeline_run(config)
    results: dict[str, Any] = {}
    try:
        run_stages(config, run_id, results)
    except BaseException:
        finish_pipeline_run(config, run_id, results, status="FAILED")
        raise
    finish_pipeline_run(config, run_id, results)
    return {"run_id": run_id, "metrics": results}
