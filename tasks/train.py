"""The train task: one training group (a site's SAEs on one shared batch stream), resumable, logged, registered."""

from __future__ import annotations

import json
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.sae.architectures.base import SAEConfig
from saeflow.sae.evaluation.plots import training_curves
from saeflow.sae.training import (
    SAETrainer,
    build_training_group,
    estimate_training_memory,
    memory_report,
    train_saes,
)
from saeflow.storage import layout
from saeflow.storage.activations import ActivationStoreRef, iter_training_batches, sample_rows, training_buffer_bytes
from saeflow.storage.checkpoints import GroupRecord, clear_training_state, load_resumable_state, save_training_state
from saeflow.storage.registry import CHALLENGER
from saeflow.storage.stats import SiteStats
from saeflow.storage.tracking import StepLogger, open_sae_runs, publish_sae, registered_model_name
from saeflow.tasks.common import TrainedSAE, group_label, prefect_run_tags, run_logger, tracker
from saeflow.tasks.versions import model_description, sae_metadata, version_tags


def checkpoint_location(
    cfg: PipelineConfig, acts: ActivationStoreRef, site: str, specs: list[SAEConfig], scale: float, total: int
) -> tuple[str, dict[str, Any]]:
    """`<root>/checkpoints/<key>/` of this group (key: site, SAE specs, activation store) and the identity a
    training state there must carry to be resumed: the same key, training settings, token budget and scale."""
    key = layout.checkpoint_key(
        {
            "site": site,
            "saes": [s.model_dump() for s in specs],
            "activations": acts.url,
            "data_hash": acts.manifest(site)["content_hash"],
        }
    )
    train = cfg.train.model_dump(exclude={"log_every", "checkpoint_every_tokens"})  # neither changes the weights
    identity = json.loads(json.dumps({"key": key, "train": train, "total_tokens": total, "scale": scale}, default=str))
    return layout.checkpoint_url(cfg.root, key), identity


@task(name="train", cache_policy=NO_CACHE)
def train_site_saes(
    cfg: PipelineConfig,
    acts: ActivationStoreRef,
    stats: SiteStats,
    site: str,
    specs: list[SAEConfig],
    parent_run_id: str,
) -> list[TrainedSAE]:
    """Train `specs` on one shared stream of `site` batches; log each to its own nested MLflow run and register it.

    With `train.checkpoint_every_tokens` the group's training state is saved under `<root>/checkpoints/<key>/`; a
    later call with the same config resumes from the newest one (MATH §3.4). Fails before building anything when
    the group will not fit in memory.
    """
    log = run_logger()
    t, scale = cfg.train, stats.scale
    total = t.tokens or stats.n_rows_used
    group = group_label(site, specs)
    buffer_bytes = training_buffer_bytes(acts, t.batch_size)
    est = estimate_training_memory(specs, acts.d_model, t.batch_size, buffer_bytes)
    log.info(f"train {site}: memory estimate {memory_report(est)}")
    saes = build_training_group(specs, acts.d_model, t, scale, group, est)
    ckpt_dir, identity = checkpoint_location(cfg, acts, site, specs, scale, total)
    ckpt, ignored = load_resumable_state(ckpt_dir, identity)
    if ignored:
        log.warning(f"train {site}: {ignored}")
    tr = tracker(cfg)
    params = {"train": t.model_dump(), "site": site, "total_tokens": total}
    runs = open_sae_runs(tr, site, specs, parent_run_id, params, ckpt, tags=prefect_run_tags())
    steps = StepLogger(tr, runs, resumed=ckpt is not None)
    history: list[list[dict[str, float]]] = [list(h) for h in ckpt.record.history] if ckpt else [[] for _ in specs]

    def on_step(step: int, tokens: int, metrics: list[dict[str, float]]) -> None:
        for i, m in enumerate(metrics):
            steps.log(i, tokens, m)
            history[i].append({"tokens": tokens, **m})
        if step % (t.log_every * 10) == 0:
            fits = " · ".join(f"{s.label()} fvu {m['fvu']:.3f} l0 {m['l0']:.1f}" for s, m in zip(specs, metrics))
            log.info(f"train {site}: {tokens:,}/{total:,} tokens · {fits}")

    batches = iter_training_batches(acts, site, t.batch_size, scale, t.seed, cursor=ckpt.cursor if ckpt else None)

    def on_checkpoint(trainer: SAETrainer) -> None:
        record = GroupRecord(identity=identity, runs=runs, history=history)
        path = save_training_state(ckpt_dir, trainer, batches.cursor(), record)
        log.info(f"train {site}: checkpoint at {trainer.tokens_seen:,}/{total:,} tokens in {path}")

    if ckpt is not None:
        log.info(f"train {site}: resuming from {ckpt.path} at {ckpt.tokens_seen:,}/{total:,} tokens")
    else:
        log.info(f"train {site}: {len(saes)} SAEs on {total:,} tokens, scale {scale:.4g}")
    # The logged dead fraction counts latents silent over as many tokens as evaluation scores, so the two agree
    # (MATH §3.3); the AuxK window (dead_tokens) is unchanged.
    eval_rows = cfg.tokens.n_windows(cfg.tokens.eval_tokens) * (cfg.tokens.context_size - 1)
    run_cfg = t.model_copy(update={"dead_report_tokens": t.dead_report_tokens or eval_rows})
    try:
        train_saes(
            saes,
            batches,
            run_cfg,
            total,
            b_dec_sample=None if ckpt else sample_rows(acts, site, t.b_dec_sample_rows, scale, t.seed),
            on_step=on_step,
            resume_from=ckpt.state if ckpt else None,
            on_checkpoint=on_checkpoint if t.checkpoint_every_tokens else None,
            group=group,
            buffer_bytes=buffer_bytes,
        )
    except BaseException:
        for run_id in runs:
            tr.end_run(run_id, "FAILED")
        raise
    data_hash = acts.manifest(site)["content_hash"]
    meta = sae_metadata(cfg, site, stats, acts, data_hash)
    out = []
    for sae, spec, run_id, hist in zip(saes, specs, runs, history):
        name = registered_model_name(cfg.tracking.registered_model_prefix, cfg.model.name, site, spec.architecture)
        version = publish_sae(
            tr,
            run_id,
            sae.cpu(),
            meta,
            name,
            version_tags(cfg, site, spec, data_hash),
            cfg.tracking.alias,
            training_curves(hist, f"{site} · {spec.label()}") if hist else None,
            description=f"{spec.label()} SAE at {site} of {cfg.model.name}, trained on "
            f"{total:,} tokens (seed {t.seed}).",
            model_tags={"lm": cfg.model.name, "site": site, "architecture": spec.architecture},
            model_description=model_description(cfg, site, spec.architecture),
        )
        tr.set_alias(name, CHALLENGER, version)  # the promotion gate decides whether it also becomes champion
        log.info(f"train {site}: registered {name} version {version}")
        out.append(TrainedSAE(site, spec.label(), spec.architecture, run_id, name, version))
    clear_training_state(ckpt_dir)  # finished and registered: nothing left to resume
    return out
