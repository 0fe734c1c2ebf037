"""saeflow's pure-torch SAE library: architectures, training, metrics, and the model side.

Imports nothing from Prefect, MLflow, Zarr or Dask, so it works in a notebook:

    from sae import build_sae, TopKConfig
    sae = build_sae(TopKConfig(k=32, expansion_factor=8), d_in=768)
"""

from sae.base import ARCHITECTURES, SAE, SAEConfig, SAEOutput, TrainState, build_sae, config_from_dict, register
from sae.relu import ReLUConfig, ReLUSAE
from sae.topk import TopKConfig, TopKSAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAEConfig",
    "SAEOutput",
    "TrainState",
    "build_sae",
    "config_from_dict",
    "register",
    "ReLUConfig",
    "ReLUSAE",
    "TopKConfig",
    "TopKSAE",
]
