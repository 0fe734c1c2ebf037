"""Checks that take seconds and would otherwise fail minutes in: run before tokenization starts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.sae.device import pick_device, require_device
from saeflow.sae.lm.sites import site_module, site_width
from saeflow.sae.training import check_training_memory, estimate_training_memory
from saeflow.storage.tracking import check_tracking_server
from saeflow.tasks.common import loaded_model, run_logger


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(cfg: PipelineConfig, train: bool = True) -> None:
    """Devices exist, the tracking server answers, the model loads and has every site, and each training group's
    SAEs fit in memory (a lower bound: without the batch buffer, which depends on the store). Raises the first
    problem as one line."""
    require_device(cfg.model.device, "model.device")
    if train:
        require_device(cfg.train.device, "train.device")
    check_tracking_server(cfg.tracking_uri)
    lm = loaded_model(cfg)  # loaded once per process: extraction and evaluation reuse it
    for site in cfg.extract.sites:
        site_module(lm.model, site)
    if train:
        groups = [list(cfg.saes)] if cfg.train.group_by_site else [[spec] for spec in cfg.saes]
        for site in cfg.extract.sites:
            for specs in groups:
                group = f"train {site} [{', '.join(s.label() for s in specs)}]"
                est = estimate_training_memory(specs, site_width(lm.model, site), cfg.train.batch_size)
                check_training_memory(est, pick_device(cfg.train.device), group)
    run_logger().info(f"preflight: devices, tracking server {cfg.tracking_uri}, model and sites {cfg.extract.sites} ok")
