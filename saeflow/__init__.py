"""saeflow: Prefect flows from a language model to trained, evaluated, registered sparse autoencoders.

One installed package: `saeflow.sae` (the pure-torch library), `saeflow.storage` (every byte at rest),
`saeflow.tasks` and `saeflow.flows` (Prefect), `saeflow.cli` (the `saeflow` command). Importing any of them
applies the environment defaults of `saeflow.env` first. The public API here is small and imports lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from saeflow.env import default_tracking_uri

if TYPE_CHECKING:
    from saeflow.sae import SAE

__all__ = ["default_tracking_uri", "load_sae"]


def load_sae(ref: str, tracking_uri: str | None = None, device: str = "cpu") -> SAE:
    """Load an SAE as a torch module from a checkpoint directory or a registered model (`name@alias`, `name/3`)."""
    from saeflow.storage.sae_sources import load_sae_ref

    return load_sae_ref(ref, tracking_uri or default_tracking_uri(), device)
