from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from sae.base import SAEConfig, build_sae
from sae.plots import training_curves
from sae.training import train_saes
from saeflow.config import PipelineConfig
from storage.activations import ActivationStoreRef, iter_training_batches, sample_rows
from storage.checkpoints import save_sae
from storage.tracking import registered_model_name
from storage.zarr_io import config_hash
from tasks.common import TrainedSAE, model_identity, run_logger, tracker


@task(name="train", cache_policy=NO_CACHE)
def train_site_saes(
    cfg: PipelineConfig,
    acts: ActivationStoreRef,
    stats: dict[str, Any],
    site: str,
    specs: list[SAEConfig],
    parent_run_id: str,
) -> list[TrainedSAE]:
    """Train `specs` on one shared stream of `site` batches; log each to its own nested MLflow run and register it."""
    log = run_logger()
    tr = tracker(cfg)
    t = cfg.train
    scale = float(stats["scale"])
    total = t.tokens or stats["n_rows_used"]
    torch.manual_seed(t.seed)
    saes = [build_sae(spec, acts.d_model) for spec in specs]
    for s in saes:
        s.input_scale.fill_(scale)
    runs = []
    for spec in specs:
        run_id = tr.start_run(f"{site}/{spec.label()}", parent_run_id, {"site": site, "architecture": spec.architecture})
        tr.log_params(run_id, {"sae": spec.model_dump(), "train": t.model_dump(), "site": site, "total_tokens": total})
        runs.append(run_id)
    history: list[list[dict[str, float]]] = [[] for _ in specs]

    def on_step(step: int, tokens: int, metrics: list[dict[str, float]]) -> None:
        for i, m in enumerate(metrics):
            tr.log_metrics(runs[i], m, step=tokens, prefix="train/")
            history[i].append({"tokens": tokens, **m})
        if step % (t.log_every * 10) == 0:
            log.info(f"train {site}: {tokens:,}/{total:,} tokens · " + " · ".join(
                f"{spec.label()} fvu {m['fvu']:.3f} l0 {m['l0']:.1f}" for spec, m in zip(specs, metrics)))

    log.info(f"train {site}: {len(saes)} SAEs on {total:,} tokens, scale {scale:.4g}")
    batches = iter_training_batches(acts, site, t.batch_size, scale, t.seed)
    sample = sample_rows(acts, site, t.b_dec_sample_rows, scale, t.seed)
    try:
        train_saes(saes, batches, t, total, b_dec_sample=sample, on_step=on_step)
    except BaseException:
        for run_id in runs:
            tr.end_run(run_id, "FAILED")
        raise
    out = []
    data_hash = acts.manifest(site)["content_hash"]
    for sae, spec, run_id, hist in zip(saes, specs, runs, history):
        meta = {"site": site, "model": model_identity(cfg), "normalize": stats["normalize"], "input_scale": scale,
                "activation_store": acts.url, "data_hash": data_hash}
        name = registered_model_name(cfg.tracking.registered_model_prefix, cfg.model.name, site, spec.architecture)
        with tempfile.TemporaryDirectory() as tmp:
            save_sae(sae.cpu(), os.path.join(tmp, "sae"), meta)
            tr.log_artifacts(run_id, os.path.join(tmp, "sae"), "sae")
        if hist:
            fig = training_curves(hist, f"{site} · {spec.label()}")
            tr.client.log_figure(run_id, fig, "plots/training_curves.png")
        tags = {"site": site, "architecture": spec.architecture, "label": spec.label(), "data_hash": data_hash,
                "config_hash": config_hash(spec.model_dump()), "model": cfg.model.name}
        version = tr.register(name, run_id, "sae", tags, description=f"{spec.label()} SAE at {site} of {cfg.model.name}")
        if cfg.tracking.alias:
            tr.set_alias(name, cfg.tracking.alias, version)
        tr.set_tags(run_id, {"registered_model": name, "registered_version": version})
        log.info(f"train {site}: registered {name} version {version}")
        out.append(TrainedSAE(site, spec.label(), spec.architecture, run_id, name, version))
    return out
