"""Evaluation tasks: the pipeline's per-site evaluation of freshly trained SAEs, and `saeflow evaluate`'s evaluation
of any SAE; both log the same metrics, artifacts, plots and latent report (MATH §5, §5.1)."""

from __future__ import annotations

from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import EvalConfig, PipelineConfig
from saeflow.sae.architectures.base import SAE
from saeflow.sae.evaluation.evaluate import SAEEvaluation, evaluate_saes
from saeflow.sae.evaluation.latents import (
    TopContexts,
    choose_latents,
    collect_top_contexts_many,
    render_html,
    windows_needed,
)
from saeflow.sae.lm.models import LoadedModel
from saeflow.storage.stats import SiteStats
from saeflow.storage.tokens import TokenStoreRef, iter_window_batches, read_windows
from saeflow.storage.tracking import Tracker, log_evaluation
from saeflow.tasks.common import TrainedSAE, loaded_model, prefect_run_tags, run_logger, tracker
from saeflow.tasks.sae_reference import SAEReference, load_reference

SUMMARY_KEYS = ("fvu", "l0", "cosine_sim", "ce_loss_recovered", "kl_div", "pooled_cos_recovered", "afa_eps_lbo_median")


def run_evaluation(
    lm: LoadedModel,
    tokens: TokenStoreRef,
    site: str,
    saes: dict[str, SAE],
    ecfg: EvalConfig,
    outlier_norm: float | None = None,
) -> dict[str, SAEEvaluation]:
    batches = [ids for _, ids in iter_window_batches(tokens, "eval", ecfg.batch_size)]
    return evaluate_saes(
        lm.model,
        batches,
        site,
        saes,
        lm.has_lm_head,
        downstream=ecfg.ce_loss,
        outlier_norm=outlier_norm,
        afa=ecfg.afa,
        afa_points=ecfg.zf_points,
        progress=True,  # one bar per site: evaluation is the stage a user waits on longest after training
    )


def latent_reports(
    lm: LoadedModel,
    tokens: TokenStoreRef,
    site: str,
    saes: dict[str, SAE],
    evals: dict[str, SAEEvaluation],
    ecfg: EvalConfig,
) -> dict[str, str]:
    """{label: HTML}: one streaming pass up to the site for all SAEs; memory O(latents × top contexts)."""
    picks = {
        k: (s, choose_latents(evals[k].firing_frequency, ecfg.n_latents, ecfg.n_extreme_latents))
        for k, s in saes.items()
    }
    accs = collect_top_contexts_many(
        lm.model, iter_window_batches(tokens, "eval", ecfg.batch_size), site, picks, ecfg.top_contexts
    )
    out = {}
    for k, acc in accs.items():
        out[k] = render_html(acc, _windows(tokens, acc), lm.tokenizer, f"{site} · {k}: top-activating contexts")
    return out


def _windows(tokens: TokenStoreRef, acc: TopContexts) -> dict[int, np.ndarray]:
    return {w: read_windows(tokens, "eval", w, w + 1)[0] for w in windows_needed(acc)}


def _summary(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {m[k]:.4g}" for k in SUMMARY_KEYS if k in m)


def _log(
    tr: Tracker,
    run_id: str,
    site: str,
    label: str,
    ev: SAEEvaluation,
    tokens: TokenStoreRef,
    report: str | None,
    extra: dict[str, str] | None = None,
) -> None:
    record = {**ev.record(site, tokens.n_eval, tokens.context_size), **(extra or {})}
    figures = ev.figures(f"{site} · {label}")
    log_evaluation(tr, run_id, ev.metrics, record, ev.firing_frequency.numpy(), figures, report)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_site_saes(
    cfg: PipelineConfig, tokens: TokenStoreRef, stats: SiteStats, site: str, trained: list[TrainedSAE]
) -> dict[str, dict[str, float]]:
    """Metrics of every SAE of `site` on the held-out windows, logged to each SAE's run, which is then closed."""
    log = run_logger()
    tr = tracker(cfg)
    lm = loaded_model(cfg)
    saes = {t.label: tr.load_logged_sae(t.run_id, lm.device) for t in trained}
    evals = run_evaluation(lm, tokens, site, saes, cfg.eval, stats.outlier_norm_threshold)
    reports = latent_reports(lm, tokens, site, saes, evals, cfg.eval) if cfg.eval.latent_report else {}
    for t in trained:
        ev = evals[t.label]
        _log(tr, t.run_id, site, t.label, ev, tokens, reports.get(t.label))
        tr.end_run(t.run_id)
        log.info(f"evaluate {site}/{t.label}: {_summary(ev.metrics)}")
    return {k: v.metrics for k, v in evals.items()}


@task(name="evaluate-sae", cache_policy=NO_CACHE)
def evaluate_sae_reference(cfg: PipelineConfig, tokens: TokenStoreRef, ref: SAEReference) -> dict[str, Any]:
    """Evaluate one resolved SAE on the eval split in a new MLflow run; returns {run_id, site, label, metrics}.

    Reconstruction metrics leave out the rows above the outlier threshold the SAE's training recorded (saeflow
    checkpoints and registered models), so they match the pipeline's own evaluation; SAELens SAEs record none."""
    log = run_logger()
    tr = tracker(cfg)
    lm = loaded_model(cfg)
    sae = load_reference(ref, lm.device)
    saes = {ref.label: sae}
    run_id = tr.start_run(
        f"evaluate {ref.label}",
        tags={
            "saeflow.flow": "evaluate_sae",
            "site": ref.site,
            "sae_reference": ref.source,
            "model": cfg.model.name,
            **prefect_run_tags(),
        },
    )
    try:
        tr.log_params(
            run_id,
            {
                "sae_reference": ref.source,
                "sae_format": ref.kind,
                "site": ref.site,
                "architecture": sae.cfg.architecture,
                "d_in": sae.d_in,
                "d_sae": sae.d_sae,
                "input_scale": float(sae.input_scale),
                "outlier_norm_threshold": ref.outlier_norm,
                "model": cfg.model.model_dump(mode="json"),
                "token_store": tokens.url,
                "eval": cfg.eval.model_dump(mode="json"),
            },
        )
        evals = run_evaluation(lm, tokens, ref.site, saes, cfg.eval, ref.outlier_norm)
        reports = latent_reports(lm, tokens, ref.site, saes, evals, cfg.eval) if cfg.eval.latent_report else {}
        ev = evals[ref.label]
        extra = {"sae_reference": ref.source, "sae_format": ref.kind}
        _log(tr, run_id, ref.site, ref.label, ev, tokens, reports.get(ref.label), extra)
    except BaseException:
        tr.end_run(run_id, "FAILED")
        raise
    tr.end_run(run_id)
    log.info(f"evaluate {ref.site}/{ref.label}: {_summary(ev.metrics)}")
    return {"run_id": run_id, "site": ref.site, "label": ref.label, "metrics": ev.metrics}
