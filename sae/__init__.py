"""saeflow's pure-torch SAE library: architectures, training, metrics, and the model side.

Imports nothing from Prefect, MLflow, Zarr or Dask, so it works in a notebook:

    from sae import build_sae, TopKConfig
    sae = build_sae(TopKConfig(k=32, expansion_factor=8), d_in=768)
"""

from sae.base import ARCHITECTURES, SAE, SAEConfig, SAEOutput, TrainState, build_sae, config_from_dict, register
from sae.gated import GatedConfig, GatedSAE
from sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from sae.relu import ReLUConfig, ReLUSAE
from sae.topafa import TopAFAConfig, TopAFASAE
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
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "ReLUConfig",
    "ReLUSAE",
    "TopKConfig",
    "TopKSAE",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "TopAFAConfig",
    "TopAFASAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
]
