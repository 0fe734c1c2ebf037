"""saeflow's pure-torch SAE library: architectures, the language-model side, training, evaluation.

Imports nothing from Prefect, MLflow, Zarr or Dask, so it works in a notebook:

    from saeflow.sae import build_sae, TopKConfig
    sae = build_sae(TopKConfig(k=32, expansion_factor=8), d_in=768)

Subpackages: `architectures` (the SAE interface, the registry, one file per architecture), `lm` (loading HF
models, sites, capture and splicing, tokenization), `training` (the training loop and its memory check),
`evaluation` (metrics, the held-out evaluation, AFA, frontiers, plots, the promotion rule, synthetic ground truth).
"""

if __name__ != "saeflow.sae":  # a copy on sys.path as a bare `sae` would register every architecture twice
    raise ImportError(f"import saeflow.sae, not {__name__}: the library is installed as part of saeflow")

from saeflow.sae import architectures as _architectures
from saeflow.sae.architectures import *  # noqa: F403  (the public names are the architectures package's)

__all__ = list(_architectures.__all__)
