"""TopK SAE with AuxK for dead latents (MATH §2.4, Gao et al. 2024)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from saeflow.sae.architectures.base import SAE, SAEConfig, SAEOutput, TrainState
from saeflow.sae.architectures.kernels import DecodeImpl, decode_topk
from saeflow.sae.architectures.losses import auxk_loss, default_k_aux, reconstruction_loss
from saeflow.sae.architectures.registry import register


class TopKConfig(SAEConfig):
    architecture: Literal["topk"] = "topk"
    # Revival once per dead window: with a window of a tenth of training (the other architectures' default), TopK's
    # held-out dead share on the real LM rose from 3.7% to 5.2% (benchmarks/README.md). A revived latent rarely wins
    # the top-k contest, so reviving often mostly re-points rare latents that were alive.
    revive_every_tenth: ClassVar[bool] = False
    k: int = Field(32, ge=1)
    """Active latents per row."""
    k_aux: int | None = Field(None, ge=1)
    """Dead latents used by AuxK; None means d_in / 2."""
    aux_coefficient: float = Field(1 / 32, ge=0)
    """α, the weight of the AuxK loss."""
    k_start_factor: float = Field(2.0, ge=1)
    """Training starts at k·k_start_factor active latents per row (capped at d_sae) and falls geometrically to `k`
    over the first `k_anneal` of training (MATH §2.4); 1 = k throughout."""
    k_anneal: float = Field(0.5, ge=0, le=1)
    """Fraction of training over which k anneals to `k`; 0 = k throughout. On the real-LM benchmark (k 32, 390
    steps) it took held-out dead latents from 9.3–10.1% to 3.8% at +0.6% FVU (benchmarks/README.md): with k from
    the first step, latents that lose the first rounds of the top-k contest never fire again, and neither AuxK nor
    revival brings them back in so short a run."""

    def sparsity_label(self) -> str:
        return f"k{self.k}"


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    saelens_architecture = "topk"
    unit_norm_decoder = True
    cfg: TopKConfig
    decode_impl: DecodeImpl = "auto"
    """Training decoder: `auto` picks the sparse kernel when k ≪ d_sae (kernels.py); benchmarks force one."""

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_acts(x))

    def activation(self, pre: Tensor) -> Tensor:
        """f = ReLU(TopK_k(π)): keep the k largest pre-activations per row (MATH §2.4)."""
        vals, idx = pre.topk(min(self.cfg.k, self.d_sae), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def k_at(self, progress: float) -> int:
        """The training k at `progress` ∈ [0, 1]: k·factor^(1 − progress/k_anneal), rounded, while annealing;
        `k` itself after. Inference always uses `k`."""
        c = self.cfg
        if c.k_anneal <= 0 or progress >= c.k_anneal or c.k_start_factor <= 1:
            return c.k
        return max(c.k, round(c.k * c.k_start_factor ** (1 - progress / c.k_anneal)))

    def loss(self, x: Tensor, state: TrainState) -> SAEOutput:
        pre = self.pre_acts(x)
        vals, idx = pre.topk(min(self.k_at(state.progress), self.d_sae), dim=-1, sorted=False)
        vals = torch.relu(vals)
        # x̂ from the k active rows only (MATH §2.4 sparse decoder); same numbers as decode(activation(pre)).
        x_hat = decode_topk(vals, idx, self.W_dec, self.b_dec, self.decode_impl)
        # The dense code is for the trainer's L0 / dead-latent bookkeeping only, so it carries no graph.
        f = torch.zeros_like(pre).scatter_(-1, idx, vals.detach())
        rec = reconstruction_loss(x, x_hat)
        k_aux = default_k_aux(self.cfg.k_aux, self.d_in)
        aux = auxk_loss(x - x_hat, pre, self.W_dec, state.dead_mask, k_aux)
        loss = rec + self.cfg.aux_coefficient * aux
        return SAEOutput(x_hat, f, loss, {"mse": rec.detach(), "auxk": aux.detach()})
