"""What a scheduled retraining should do: train (data or config changed, or a new seed is wanted) or skip."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.storage.activations import ActivationStoreRef
from saeflow.storage.registry import CHAMPION, version_by_alias
from saeflow.storage.tracking import registered_model_name
from saeflow.tasks.common import TRACKING_RETRIES, run_logger, tracker
from saeflow.tasks.versions import RETRAIN_KEYS, version_identity


@dataclass(frozen=True)
class RetrainPlan:
    train: bool
    """False: skip, nothing changed and `retrain.when_unchanged` is skip."""
    seed: int
    """Seed the retraining uses."""
    reason: str


@task(name="plan-retraining", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def plan_retraining(cfg: PipelineConfig, acts: ActivationStoreRef) -> RetrainPlan:
    """Compare every configured SAE's champion with what a retrain would train from (activation data hash, SAE spec
    hash, training-settings hash). Any difference, or a missing champion, means train with the configured seed."""
    tr = tracker(cfg)
    changed, versions = [], 0
    for site in cfg.extract.sites:
        data_hash = acts.manifest(site)["content_hash"]
        for spec in cfg.saes:
            name = registered_model_name(cfg.tracking.registered_model_prefix, cfg.model.name, site, spec.architecture)
            champ = version_by_alias(tr, name, CHAMPION)
            want = version_identity(cfg, spec, data_hash)
            if champ is None:
                changed.append(f"{name} has no champion")
                continue
            versions = max(versions, int(champ.version))
            diff = [k for k in RETRAIN_KEYS if champ.tags.get(k) != want[k]]
            if diff:
                changed.append(f"{name}: {', '.join(k.removesuffix('_hash') for k in diff)} changed")
    if changed:
        plan = RetrainPlan(True, cfg.train.seed, "; ".join(changed))
    elif cfg.retrain.when_unchanged == "skip":
        plan = RetrainPlan(False, cfg.train.seed, "data and config unchanged since every champion was trained")
    else:
        plan = RetrainPlan(
            True, cfg.train.seed + versions, f"data and config unchanged: new seed {cfg.train.seed + versions}"
        )
    run_logger().info(f"retrain: {'train' if plan.train else 'skip'} ({plan.reason})")
    return plan


@task(name="publish-skip", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def publish_skip(cfg: PipelineConfig, plan: RetrainPlan) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        f"## {cfg.name}: retraining skipped\n\n{plan.reason}; `retrain.when_unchanged` is "
        "`skip` (set it to `new_seed` to retrain anyway).\n",
        key="sae-results",
        description="Retraining skipped",
    )
