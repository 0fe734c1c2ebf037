"""ReLU + L1, the "standard" SAE (MATH §2.1)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from saeflow.sae.architectures.base import SAE, SAEConfig, SAEOutput, TrainState
from saeflow.sae.architectures.losses import reconstruction_loss
from saeflow.sae.architectures.registry import register


class ReLUConfig(SAEConfig):
    architecture: Literal["relu"] = "relu"
    l1_coefficient: float = Field(5.0, ge=0)
    """λ, the weight of the L1 penalty at the end of warm-up (normalized units, E‖x‖ = √d)."""
    l1_form: Literal["decoder_weighted", "unit_decoder"] = "decoder_weighted"
    """`decoder_weighted`: penalise Σ fᵢ‖W_dec,i‖ with a free decoder; `unit_decoder`: plain L1, unit-norm rows."""
    l1_warmup: float = Field(0.05, ge=0, le=1)
    """Fraction of training over which λ ramps linearly from 0."""
    target_l0: float | None = Field(None, gt=0)
    """Train to this L0 (mean active latents per row): the coefficient above becomes the starting point and the
    controller of MATH §3.5 adapts it every step; None keeps the coefficient fixed."""

    coefficient_field: ClassVar[str | None] = "l1_coefficient"
    warmup_field: ClassVar[str | None] = "l1_warmup"
    coefficient_start: ClassVar[float] = 1.0  # target L0 without a set l1_coefficient: see SAETrainer._controller

    def sparsity_label(self) -> str:
        return f"L0_{self.target_l0:g}" if self.target_l0 else f"l1_{self.l1_coefficient:g}"


@register("relu")
class ReLUSAE(SAE):
    config_class = ReLUConfig
    saelens_architecture = "standard"
    cfg: ReLUConfig

    def __init__(self, cfg: ReLUConfig, d_in: int):
        super().__init__(cfg, d_in)
        self.unit_norm_decoder = cfg.l1_form == "unit_decoder"

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # Anthropic's April-2024 init: small decoder rows so the L1·‖d‖ penalty starts gentle.
        # With a target L0 the controller starts λ gently instead, and rows of norm 0.1 would need hundreds of
        # steps at lr 5e-4 to grow to the data's scale (FVU stayed above 0.7 for 1200 steps at L0 12).
        if getattr(self.cfg, "l1_form", "decoder_weighted") == "decoder_weighted" and not self.cfg.target_l0:
            with torch.no_grad():
                self.W_dec.mul_(0.1)
                self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """With a target L0, b_enc starts where each latent fires on a share target / d_sae of the sample, so the
        code starts sparse instead of with half the latents active (MATH §2.1, §3.5)."""
        if self.cfg.target_l0:
            self.b_enc.copy_(-self.firing_quantile(self.pre_acts(x) - self.b_enc, self.cfg.target_l0))

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_acts(x))

    def loss(self, x: Tensor, state: TrainState) -> SAEOutput:
        f = self.encode(x)
        x_hat = self.decode(f)
        rec = reconstruction_loss(x, x_hat)
        if self.cfg.l1_form == "decoder_weighted":
            l1 = (f * self.W_dec.norm(dim=1)).sum(-1).mean()  # MATH §2.1 decoder_weighted
        else:
            l1 = f.sum(-1).mean()  # MATH §2.1 unit_decoder: ‖f‖₁ (f ≥ 0)
        lam = self.sparsity_coefficient(state)
        loss = rec + lam * l1
        return SAEOutput(x_hat, f, loss, {"mse": rec.detach(), "l1": l1.detach()})
