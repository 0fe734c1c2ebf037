"""Resolve what `saeflow evaluate` is given — a registered model, a saeflow checkpoint directory or a SAELens
directory — into a loaded SAE, checked against the model site it will be evaluated at."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from sae.base import SAE
from sae.sites import parse_site, site_module, site_width
from saeflow.config import PipelineConfig
from tasks.common import loaded_model, run_logger

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|mlp_out|resid_pre)$")


class SAEReferenceError(ValueError):
    """The SAE reference cannot be found or does not fit the model/site; str() is one line saying what to fix."""


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


def site_from_hook(hook_name: str | None) -> str | None:
    """TransformerLens hook → saeflow site: blocks.L.hook_resid_post/mlp_out → resid_post.L/mlp_out.L, and
    blocks.L.hook_resid_pre → resid_post.(L−1) (the same tensor); None for anything else."""
    m = _HOOK.match(hook_name or "")
    if not m:
        return None
    layer, kind = int(m[1]), m[2]
    if kind == "resid_pre":
        return f"resid_post.{layer - 1}" if layer > 0 else None
    return f"{kind}.{layer}"


def sniff_format(directory: str) -> tuple[str, str | None]:
    """(`checkpoint` | `saelens`, recorded site or None) from a directory's cfg.json shape."""
    path = os.path.join(directory, "cfg.json")
    if not os.path.exists(path):
        raise SAEReferenceError(f"{directory!r} has no cfg.json: give a saeflow checkpoint or SAELens SAE directory")
    with open(path) as f:
        cfg = json.load(f)
    if isinstance(cfg.get("sae"), dict) and "d_in" in cfg:  # storage.checkpoints.save_sae
        return "checkpoint", (cfg.get("metadata") or {}).get("site")
    if "d_in" in cfg and "d_sae" in cfg:  # SAELens: flat config, hook_name under metadata (≥ 6) or top level
        return "saelens", site_from_hook((cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name"))
    raise SAEReferenceError(f"{path} is neither a saeflow nor a SAELens SAE config (no d_in/d_sae)")


def locate_sae(ref: str, tracking_uri: str) -> tuple[str, str, str | None]:
    """(kind, local directory, recorded site) of a reference; registered models are downloaded first."""
    from storage.tracking import pull

    if os.path.isdir(ref):
        kind, site = sniff_format(ref)
        return kind, ref, site
    if os.sep in ref.strip(os.sep).split(os.sep, 1)[-1] or ref.startswith((".", "~", os.sep)):
        raise SAEReferenceError(f"SAE directory {ref!r} does not exist")
    try:
        path = pull(ref, tempfile.mkdtemp(prefix="saeflow-eval-"), tracking_uri)
    except ValueError as e:
        raise SAEReferenceError(f"{ref!r} is not a directory, and {e}") from None
    _, site = sniff_format(path)
    return "registry", path, site


def load_reference(ref: SAEReference, device="cpu") -> SAE:
    from storage.checkpoints import load_sae
    from storage.saelens import import_saelens

    return import_saelens(ref.path, device) if ref.kind == "saelens" else load_sae(ref.path, device)


def check_fit(sae: SAE, model: nn.Module, site: str | None, recorded: str | None) -> str:
    """The site to evaluate at; raises SAEReferenceError on an unknown or mismatched site or width."""
    from sae.sites import SiteError

    if site is None and recorded is None:
        raise SAEReferenceError("the SAE does not record its site: pass --site, e.g. --site resid_post.6")
    chosen = site or recorded
    try:
        parse_site(chosen)
        site_module(model, chosen)
    except SiteError as e:
        raise SAEReferenceError(str(e)) from None
    if site and recorded and parse_site(site) != parse_site(recorded):
        raise SAEReferenceError(f"the SAE was trained at {recorded} but --site is {site}: drop --site or pass "
                                f"--site {recorded}")
    width = site_width(model, chosen)
    if sae.d_in != width:
        raise SAEReferenceError(f"SAE d_in {sae.d_in} does not match site {chosen} of width {width} (d_model): "
                                "the SAE belongs to another model")
    return chosen


@task(name="resolve-sae", cache_policy=NO_CACHE)
def resolve_sae_reference(cfg: PipelineConfig, ref: str, site: str | None = None) -> SAEReference:
    """Find the SAE (downloading a registered one), load it once, and check it fits `site` of the config's model."""
    kind, path, recorded = locate_sae(ref, cfg.tracking_uri)
    lm = loaded_model(cfg)
    sae = load_reference(SAEReference(ref, kind, path, "", ""), "cpu")
    chosen = check_fit(sae, lm.model, site, recorded)
    label = f"{os.path.basename(os.path.normpath(ref)) or ref}-{sae.cfg.architecture}"
    run_logger().info(f"evaluate: {ref} is a {kind} SAE ({sae.cfg.architecture}, d_sae {sae.d_sae}) at {chosen}")
    return SAEReference(ref, kind, path, chosen, label)
