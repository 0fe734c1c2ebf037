from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from sae.evaluation import POSITIONS_NOTE, evaluate_site
from saeflow.config import PipelineConfig
from storage.checkpoints import load_sae
from storage.tokens import TokenStoreRef, iter_window_batches
from tasks.common import TrainedSAE, loaded_model, run_logger, tracker


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_site_saes(
    cfg: PipelineConfig, tokens: TokenStoreRef, stats: dict[str, Any], site: str, trained: list[TrainedSAE]
) -> dict[str, dict[str, float]]:
    """Metrics of every SAE of `site` on the held-out windows, logged to each SAE's run, which is then closed."""
    log = run_logger()
    tr = tracker(cfg)
    lm = loaded_model(cfg)
    saes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for t in trained:
            os.makedirs(f"{tmp}/{t.label}")
            saes[t.label] = load_sae(tr.download(t.run_id, "sae", f"{tmp}/{t.label}"), lm.device)
    batches = [ids for _, ids in iter_window_batches(tokens, "eval", cfg.eval.batch_size)]
    threshold = stats.get("outlier_norm_threshold")
    results = evaluate_site(
        lm.model, batches, site, saes, lm.has_lm_head and cfg.eval.ce_loss,
        mean_activation=torch.tensor(stats["mean"], dtype=torch.float32), outlier_norm=threshold,
    )
    for t in trained:
        m = results[t.label]
        tr.log_metrics(t.run_id, m, prefix="eval/")
        tr.log_dict(t.run_id, {"site": site, "metrics": m, "positions": POSITIONS_NOTE,
                               "eval_windows": tokens.n_eval, "context_size": tokens.context_size}, "eval/metrics.json")
        tr.end_run(t.run_id)
        summary = ", ".join(f"{k} {m[k]:.4g}" for k in ("fvu", "l0", "ce_loss_recovered", "kl_div") if k in m)
        log.info(f"evaluate {site}/{t.label}: {summary}")
    return results
