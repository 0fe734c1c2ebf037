"""Checks that take seconds and would otherwise fail minutes in: run before tokenization starts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from saeflow.config import PipelineConfig
from saeflow.sae.device import pick_device, require_device
from saeflow.sae.lm.sites import site_module, site_width
from saeflow.sae.training import check_training_memory, estimate_training_memory
from saeflow.storage.tracking import check_tracking_server
from saeflow.tasks.common import group_label, loaded_model, run_logger


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
        for site, specs in cfg.training_groups():
            est = estimate_training_memory(specs, site_width(lm.model, site), cfg.train.batch_size)
            check_training_memory(est, pick_device(cfg.train.device), group_label(site, specs))
    run_logger().info(f"preflight: devices, tracking server {cfg.tracking_uri}, model and sites {cfg.extract.sites} ok")
