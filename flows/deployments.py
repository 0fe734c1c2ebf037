"""The Prefect deployments of saeflow's flows for one config: what `saeflow serve` and `saeflow deploy` register.

Each flow takes the typed `PipelineConfig`, so the UI renders its run form from the config's JSON schema (sections
per config block, the fields' docs as help texts) with this config's values as defaults. Paths are made absolute
here, at registration, so a run does not depend on the cwd of whatever process executes it.
"""

from __future__ import annotations

import datetime
import os
import zoneinfo
from typing import Any, cast

from prefect import Flow
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from saeflow.config import PipelineConfig, validate_config
from saeflow.flows.evaluate import evaluate_sae
from saeflow.flows.pipeline import sae_pipeline
from saeflow.flows.retrain import sae_retrain
from saeflow.flows.sweep import sae_sweep
from saeflow.storage.registry import CHAMPION
from saeflow.storage.text import looks_local
from saeflow.storage.tracking import registered_model_name

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINTS = {
    "sae_pipeline": "flows/pipeline.py:sae_pipeline",
    "sae_sweep": "flows/sweep.py:sae_sweep",
    "evaluate_sae": "flows/evaluate.py:evaluate_sae",
    "sae_retrain": "flows/retrain.py:sae_retrain",
}
NIGHTLY = "nightly"
TAGS = ["saeflow"]


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def with_absolute_paths(cfg: PipelineConfig) -> PipelineConfig:
    """The config with its working root, stores, local model directory, local dataset files and tracking URI
    resolved now, as absolute paths and URIs."""
    data = cfg.model_dump(mode="json")
    data["root"] = _abs(cfg.root)
    if cfg.store and "://" not in cfg.store:
        data["store"] = _abs(cfg.store)
    if os.path.exists(os.path.expanduser(cfg.model.name)):
        data["model"]["name"] = _abs(cfg.model.name)
    if looks_local(cfg.dataset.source):
        data["dataset"]["source"] = _abs(cfg.dataset.source)
    data["tracking"]["uri"] = cfg.tracking_uri
    if cfg.sweep is not None:
        data.pop("saes")  # the sweep's grid makes them
    return validate_config(data)


def sweep_defaults(cfg: PipelineConfig) -> dict[str, Any]:
    """The sweep form's default: the config's own sweep, or a one-point grid per configured SAE to edit."""
    data = cfg.model_dump(mode="json")
    if cfg.sweep is None:
        data["sweep"] = {
            "architectures": {
                s.architecture: s.model_dump(mode="json", exclude={"architecture", "name"}) for s in cfg.saes
            }
        }
    data.pop("saes")
    return validate_config(data).model_dump(mode="json", exclude={"saes"})


def next_nightly_run(cfg: PipelineConfig, now: datetime.datetime | None = None) -> datetime.datetime:
    from cronsim import CronSim

    tz = zoneinfo.ZoneInfo(cfg.retrain.timezone)
    return next(CronSim(cfg.retrain.cron, (now or datetime.datetime.now(tz)).astimezone(tz)))


def build_deployments(cfg: PipelineConfig, source: str | None = None) -> list[RunnerDeployment]:
    """sae_pipeline, sae_sweep and evaluate_sae named after the config, and sae_retrain as `nightly` on the
    config's cron schedule. `source` (a directory or git URL) makes them pull the code from there (work pools)."""
    cfg = with_absolute_paths(cfg)
    params = {"config": cfg.model_dump(mode="json")}
    site, arch = cfg.extract.sites[0], cfg.saes[0].architecture
    first = registered_model_name(cfg.tracking.registered_model_prefix, cfg.model.name, site, arch)
    flows: dict[str, Flow[..., Any]] = {
        "sae_pipeline": sae_pipeline,
        "sae_sweep": sae_sweep,
        "evaluate_sae": evaluate_sae,
        "sae_retrain": sae_retrain,
    }
    if source is not None:
        # Prefect's sync_compatible methods return the value itself when called from sync code, as here.
        flows = {k: cast(Flow, f.from_source(source=source, entrypoint=ENTRYPOINTS[k])) for k, f in flows.items()}
    r = cfg.retrain
    deployments = [
        flows["sae_pipeline"].to_deployment(
            cfg.name,
            parameters=params,
            tags=TAGS,
            description=f"Train, evaluate and register the config's SAEs on {cfg.model.name} (config {cfg.name}).",
        ),
        flows["sae_sweep"].to_deployment(
            cfg.name,
            parameters={"config": sweep_defaults(cfg)},
            tags=TAGS,
            description="Train a grid of SAEs (config.sweep) and log the L0–fidelity frontier report.",
        ),
        flows["evaluate_sae"].to_deployment(
            cfg.name,
            parameters={**params, "sae": f"{first}@{CHAMPION}", "site": None},
            tags=TAGS,
            description="Evaluate any SAE (NAME@ALIAS, NAME/VERSION, a checkpoint or SAELens directory) on the "
            "config's held-out tokens.",
        ),
        flows["sae_retrain"].to_deployment(
            NIGHTLY,
            parameters=params,
            tags=TAGS,
            schedules=[Cron(r.cron, timezone=r.timezone)],
            description=f"Nightly retraining ({r.cron}, {r.timezone}): new data → new stores; unchanged → "
            f"{r.when_unchanged}; each new version is promoted only if it beats the champion.",
        ),
    ]
    return [cast(RunnerDeployment, d) for d in deployments]
