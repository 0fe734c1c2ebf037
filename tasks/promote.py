"""The promotion gate: each freshly evaluated version (the `challenger`) against its model's `champion`."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.sae.evaluation.promotion import decide, promotion_metric
from saeflow.storage.registry import (
    CHAMPION,
    EVAL_HASH_TAG,
    record_decision,
    tag_metrics,
    version_by_alias,
    version_metrics,
)
from saeflow.storage.tokens import TokenStoreRef, eval_split_hash
from saeflow.tasks.common import TRACKING_RETRIES, TrainedSAE, loaded_model, run_logger, tracker


def rescore_champion(
    cfg: PipelineConfig, tokens: TokenStoreRef, site: str, name: str, version: str
) -> dict[str, float]:
    """The champion's metrics on this run's held-out tokens (its own tags were measured on other ones)."""
    from saeflow.tasks.evaluate import run_evaluation
    from saeflow.tasks.sae_reference import load_reference, resolve_sae_reference

    ref = resolve_sae_reference.fn(cfg, f"{name}/{version}", site)
    lm = loaded_model(cfg)
    ecfg = cfg.eval.model_copy(update={"afa": False, "latent_report": False})
    ev = run_evaluation(lm, tokens, site, {"champion": load_reference(ref, lm.device)}, ecfg, ref.outlier_norm)
    return ev["champion"].metrics


# Retried like the tracking steps, but with no timeout: re-scoring a champion is a full evaluation pass.
@task(
    name="promote",
    cache_policy=NO_CACHE,
    retries=TRACKING_RETRIES["retries"],
    retry_delay_seconds=TRACKING_RETRIES["retry_delay_seconds"],
)
def promote_site_saes(
    cfg: PipelineConfig,
    tokens: TokenStoreRef,
    site: str,
    trained: list[TrainedSAE],
    metrics: dict[str, dict[str, float]],
) -> dict[str, dict[str, Any]]:
    """Tag each new version with its held-out metrics, then move `champion` to it if it beats the current one on
    the same tokens (`cfg.promotion`); returns {label: decision as a dict, with name and version}."""
    log = run_logger()
    tr = tracker(cfg)
    p = cfg.promotion
    eval_hash = eval_split_hash(tokens)
    out = {}
    for t in trained:
        m = metrics[t.label]
        tag_metrics(tr, t.registered_name, t.version, m, eval_hash)
        metric = promotion_metric(p.metric, "ce_loss_recovered" in m)
        champ = version_by_alias(tr, t.registered_name, CHAMPION)
        if champ is not None and str(champ.version) == t.version:
            champ = None  # a retried task whose earlier attempt already promoted this version
        champ_metrics, rescored = None, False
        if champ is not None:
            champ_metrics = version_metrics(champ)
            if champ.tags.get(EVAL_HASH_TAG) != eval_hash or metric not in champ_metrics:
                champ_metrics = rescore_champion(cfg, tokens, site, t.registered_name, str(champ.version))
                rescored = True
        d = decide(metric, m, champ_metrics, str(champ.version) if champ else None, p.margin, p.max_l0_factor)
        record_decision(tr, t.registered_name, t.version, d, rescored)
        log.info(
            f"promote {t.registered_name} v{t.version}: {'champion' if d.promoted else 'stays challenger'} ({d.reason})"
        )
        out[t.label] = {"name": t.registered_name, "version": t.version, "rescored": rescored, **asdict(d)}
    return out
