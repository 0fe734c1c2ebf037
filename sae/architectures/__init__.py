"""SAE architectures: the interface (base.py), the name registry (registry.py), one file per architecture.

Importing this package registers every built-in architecture.
"""

from saeflow.sae.architectures.base import SAE, SAEConfig, SAEOutput, TrainState
from saeflow.sae.architectures.batchtopk import BatchTopKConfig, BatchTopKSAE
from saeflow.sae.architectures.gated import GatedConfig, GatedSAE
from saeflow.sae.architectures.jumprelu import JumpReLUConfig, JumpReLUSAE
from saeflow.sae.architectures.matryoshka import MatryoshkaConfig, MatryoshkaSAE
from saeflow.sae.architectures.registry import ARCHITECTURES, build_sae, config_from_dict, register
from saeflow.sae.architectures.relu import ReLUConfig, ReLUSAE
from saeflow.sae.architectures.topafa import TopAFAConfig, TopAFASAE
from saeflow.sae.architectures.topk import TopKConfig, TopKSAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "GatedConfig",
    "GatedSAE",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "ReLUConfig",
    "ReLUSAE",
    "SAEConfig",
    "SAEOutput",
    "TopAFAConfig",
    "TopAFASAE",
    "TopKConfig",
    "TopKSAE",
    "TrainState",
    "build_sae",
    "config_from_dict",
    "register",
]
