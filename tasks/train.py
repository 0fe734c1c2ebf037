from __future__ import annotations

import json
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.sae.architectures.base import SAEConfig
from saeflow.sae.architectures.registry import build_sae
from saeflow.sae.device import pick_device
from saeflow.sae.evaluation.plots import training_curves
from saeflow.sae.training import (
    SAETrainer,
    check_training_memory,
    estimate_training_memory,
    memory_report,
    train_saes,
)
from saeflow.storage import layout
from saeflow.storage.activations import ActivationStoreRef, iter_training_batches, sample_rows, training_buffer_bytes
from saeflow.storage.checkpoints import clear_training_state, load_training_state, save_training_state
from saeflow.storage.registry import CHALLENGER
from saeflow.storage.stats import SiteStats
from saeflow.storage.tracking import code_version, open_sae_runs, publish_sae, registered_model_name
from saeflow.storage.zarr_io import config_hash
from saeflow.tasks.common import TrainedSAE, model_identity, prefect_run_tags, run_logger, tracker

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
    t = cfg.train
    buffer_bytes = training_buffer_bytes(acts, t.batch_size)
    est = estimate_training_memory(specs, acts.d_model, t.batch_size, buffer_bytes)
    log.info(f"train {site}: memory estimate {memory_report(est)}")
    group = f"train {site} [{', '.join(s.label() for s in specs)}]"
    check_training_memory(est, pick_device(t.device), group)
    tr = tracker(cfg)
    scale = stats.scale
    total = t.tokens or stats.n_rows_used
    ckpt_dir, identity = checkpoint_location(cfg, acts, site, specs, scale, total)
    ckpt = load_training_state(ckpt_dir)
    if ckpt is not None and ckpt.extra.get("identity") != identity:
        log.warning(f"train {site}: ignoring {ckpt.path}: it was saved with a different training config")
        ckpt = None
    torch.manual_seed(t.seed)
    saes = [build_sae(spec, acts.d_model) for spec in specs]
    for s in saes:
        s.input_scale.fill_(scale)
    runs = open_sae_runs(
        tr,
        site,
        specs,
        parent_run_id,
        {"train": t.model_dump(), "site": site, "total_tokens": total},
        ckpt,
        tags=prefect_run_tags(),
    )
    history: list[list[dict[str, float]]] = ckpt.extra["history"] if ckpt else [[] for _ in specs]
    # A resumed run replays the steps between its checkpoint and the kill; they are in MLflow already.
    logged_until = [tr.last_step(r, "train/loss") if ckpt else -1 for r in runs]

    def on_step(step: int, tokens: int, metrics: list[dict[str, float]]) -> None:
        for i, m in enumerate(metrics):
            if tokens > logged_until[i]:
                tr.log_metrics(runs[i], m, step=tokens, prefix="train/")
            history[i].append({"tokens": tokens, **m})
        if step % (t.log_every * 10) == 0:
            log.info(
                f"train {site}: {tokens:,}/{total:,} tokens · "
                + " · ".join(f"{spec.label()} fvu {m['fvu']:.3f} l0 {m['l0']:.1f}" for spec, m in zip(specs, metrics))
            )

    batches = iter_training_batches(acts, site, t.batch_size, scale, t.seed, cursor=ckpt.cursor if ckpt else None)

    def on_checkpoint(trainer: SAETrainer) -> None:
        extra = {"identity": identity, "runs": runs, "history": history}
        path = save_training_state(ckpt_dir, trainer, batches.cursor(), extra)
        log.info(f"train {site}: checkpoint at {trainer.tokens_seen:,}/{total:,} tokens in {path}")

    if ckpt is not None:
        log.info(f"train {site}: resuming from {ckpt.path} at {ckpt.tokens_seen:,}/{total:,} tokens")
        sample = None  # b_dec comes with the checkpoint's weights
    else:
        log.info(f"train {site}: {len(saes)} SAEs on {total:,} tokens, scale {scale:.4g}")
        sample = sample_rows(acts, site, t.b_dec_sample_rows, scale, t.seed)
    try:
        train_saes(
            saes,
            batches,
            t,
            total,
            b_dec_sample=sample,
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
    meta = {
        "site": site,
        "model": model_identity(cfg),
        "normalize": stats.normalize,
        "input_scale": scale,
        "outlier_norm_threshold": stats.outlier_norm_threshold,
        "activation_store": acts.url,
        "data_hash": data_hash,
    }
    out = []
    for sae, spec, run_id, hist in zip(saes, specs, runs, history):
        name = registered_model_name(cfg.tracking.registered_model_prefix, cfg.model.name, site, spec.architecture)
        tags = {
            "site": site,
            "architecture": spec.architecture,
            "label": spec.label(),
            **version_identity(cfg, spec, data_hash),
            "model": cfg.model.name,
            "seed": t.seed,
            "code_version": code_version() or "unknown",
        }
        curves = training_curves(hist, f"{site} · {spec.label()}") if hist else None
        version = publish_sae(
            tr,
            run_id,
            sae.cpu(),
            meta,
            name,
            tags,
            cfg.tracking.alias,
            curves,
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
