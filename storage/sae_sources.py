"""Where an SAE to evaluate lives on disk: a registered model (downloaded), a saeflow checkpoint directory, or a
SAELens directory, told apart by the shape of its cfg.json."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Literal

from saeflow.sae.architectures.base import SAE
from saeflow.sae.lm.sites import Site


@dataclass(frozen=True)
class Recorded:
    """What an SAE directory says about itself (cfg.json)."""

    site: str | None
    """The saeflow site it was trained at, or None when it does not say (or names a hook saeflow has no site for)."""
    outlier_norm_threshold: float | None = None
    """Raw row norm above which training left rows out (saeflow checkpoints); None when none was recorded."""


@dataclass(frozen=True)
class LocatedSAE:
    """An SAE reference resolved to a local directory."""

    kind: Literal["checkpoint", "saelens", "registry"]
    path: str
    recorded: Recorded


class SAEReferenceError(ValueError):
    """The SAE reference cannot be found or does not fit the model/site; str() is one line saying what to fix."""


def site_from_hook(hook_name: str | None) -> str | None:
    """TransformerLens hook → saeflow site: blocks.L.hook_resid_post/mlp_out → resid_post.L/mlp_out.L, and
    blocks.L.hook_resid_pre → resid_post.(L−1) (the same tensor); None for anything else."""
    site = Site.from_hook(hook_name)
    return None if site is None else str(site)


def sniff_format(directory: str) -> tuple[Literal["checkpoint", "saelens"], Recorded]:
    """(`checkpoint` | `saelens`, what the SAE records) from a directory's cfg.json shape."""
    from saeflow.storage.checkpoints import checkpoint_dir

    path = os.path.join(checkpoint_dir(directory), "cfg.json")
    if not os.path.exists(path):
        raise SAEReferenceError(f"{directory!r} has no cfg.json: give a saeflow checkpoint or SAELens SAE directory")
    with open(path) as f:
        cfg = json.load(f)
    meta = cfg.get("metadata") or {}
    if isinstance(cfg.get("sae"), dict) and "d_in" in cfg:  # storage.checkpoints.save_sae
        outlier = meta.get("outlier_norm_threshold")
        return "checkpoint", Recorded(meta.get("site"), float(outlier) if outlier else None)
    if "d_in" in cfg and "d_sae" in cfg:  # SAELens: flat config, hook_name under metadata (≥ 6) or top level
        return "saelens", Recorded(site_from_hook(meta.get("hook_name") or cfg.get("hook_name")))
    raise SAEReferenceError(f"{path} is neither a saeflow nor a SAELens SAE config (no d_in/d_sae)")


def locate_sae(ref: str, tracking_uri: str, download_dir: str) -> LocatedSAE:
    """Where reference `ref` is on disk and what it records; registered models are downloaded into
    `download_dir` first (replacing what an earlier download left there)."""
    from saeflow.storage.tracking import pull

    if os.path.isdir(ref):
        kind, recorded = sniff_format(ref)
        return LocatedSAE(kind, ref, recorded)
    if os.sep in ref.strip(os.sep).split(os.sep, 1)[-1] or ref.startswith((".", "~", os.sep)):
        raise SAEReferenceError(f"SAE directory {ref!r} does not exist")
    try:
        shutil.rmtree(download_dir, ignore_errors=True)
        path = pull(ref, download_dir, tracking_uri)
    except ValueError as e:
        raise SAEReferenceError(f"{ref!r} is not a directory, and {e}") from None
    return LocatedSAE("registry", path, sniff_format(path)[1])


def load_sae_source(kind: str, path: str, device="cpu") -> SAE:
    """Load a located SAE: SAELens directories through the importer, everything else as a saeflow checkpoint."""
    from saeflow.storage.checkpoints import load_sae
    from saeflow.storage.saelens import import_saelens

    return import_saelens(path, device) if kind == "saelens" else load_sae(path, device)


def load_sae_ref(ref: str, tracking_uri: str, device="cpu") -> SAE:
    """`saeflow.load_sae`: a checkpoint or SAELens directory as is, a registered model (`name@alias`, `name/3`)
    downloaded to a fresh temporary directory first."""
    with tempfile.TemporaryDirectory(prefix="saeflow-pull-") as tmp:  # loaded into memory, then removed
        located = locate_sae(ref, tracking_uri, os.path.join(tmp, "sae"))
        return load_sae_source(located.kind, located.path, device)
