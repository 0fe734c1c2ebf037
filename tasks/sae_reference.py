"""Resolve what `saeflow evaluate` is given — a registered model, a saeflow checkpoint directory or a SAELens
directory — into a loaded SAE, checked against the model site it will be evaluated at."""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from saeflow.config import PipelineConfig
from saeflow.sae.architectures.base import SAE
from saeflow.sae.lm.sites import parse_site, site_module, site_width
from saeflow.storage import layout
from saeflow.storage.sae_sources import SAEReferenceError, load_sae_source, locate_sae
from saeflow.tasks.common import loaded_model, run_logger


@dataclass(frozen=True)
class SAEReference:
    """An SAE on local disk, where it came from and the site it is evaluated at."""

    source: str
    """What the user gave: `name@alias`, `name/3` or a directory."""
    kind: str
    """`registry`, `checkpoint` (saeflow's cfg.json) or `saelens`."""
    path: str
    """Local directory holding cfg.json + sae_weights.safetensors."""
    site: str
    label: str
    outlier_norm: float | None = None
    """Raw-unit row norm above which rows were left out of training (recorded by saeflow checkpoints); evaluation
    leaves them out of the reconstruction metrics too, as the pipeline's own evaluation does."""


def check_fit(sae: SAE, model: nn.Module, site: str | None, recorded: str | None) -> str:
    """The site to evaluate at; raises SAEReferenceError on an unknown or mismatched site or width."""
    from saeflow.sae.lm.sites import SiteError

    if site is None and recorded is None:
        raise SAEReferenceError("the SAE does not record its site: pass --site, e.g. --site resid_post.6")
    chosen = site or recorded
    assert chosen is not None  # one of them is set (checked above)
    try:
        parse_site(chosen)
        site_module(model, chosen)
    except SiteError as e:
        raise SAEReferenceError(str(e)) from None
    if site and recorded and parse_site(site) != parse_site(recorded):
        raise SAEReferenceError(
            f"the SAE was trained at {recorded} but --site is {site}: drop --site or pass --site {recorded}"
        )
    width = site_width(model, chosen)
    if sae.d_in != width:
        raise SAEReferenceError(
            f"SAE d_in {sae.d_in} does not match site {chosen} of width {width} (d_model): "
            "the SAE belongs to another model"
        )
    return chosen


def load_reference(ref: SAEReference, device="cpu") -> SAE:
    return load_sae_source(ref.kind, ref.path, device)


@task(name="resolve-sae", cache_policy=NO_CACHE)
def resolve_sae_reference(cfg: PipelineConfig, ref: str, site: str | None = None) -> SAEReference:
    """Find the SAE (downloading a registered one), load it once, and check it fits `site` of the config's model."""
    located = locate_sae(ref, cfg.tracking_uri, layout.registry_download_dir(cfg.root, cfg.tracking_uri, ref))
    kind, path = located.kind, located.path
    lm = loaded_model(cfg)
    sae = load_sae_source(kind, path, "cpu")
    chosen = check_fit(sae, lm.model, site, located.recorded.site)
    label = f"{os.path.basename(os.path.normpath(ref)) or ref}-{sae.cfg.architecture}"
    outlier = located.recorded.outlier_norm_threshold
    excluded = f"rows with norm > {outlier:.4g} left out as in training" if outlier else "no outlier threshold recorded"
    run_logger().info(
        f"evaluate: {ref} is a {kind} SAE ({sae.cfg.architecture}, d_sae {sae.d_sae}) at {chosen}; {excluded}"
    )
    return SAEReference(ref, kind, path, chosen, label, outlier)
