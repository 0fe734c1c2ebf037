"""Gated SAE (MATH §2.2, Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

Parameter names follow SAELens' gated SAE except the gate bias: the base class's `b_enc` IS the gate bias
b_gate and `W_enc` is W_gate. An exporter maps `b_enc` → `b_gate`; every other name (W_enc, r_mag, b_mag, W_dec,
b_dec) is already SAELens'.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from saeflow.sae.architectures.base import SAE, SAEConfig, SAEOutput, TrainState
from saeflow.sae.architectures.losses import reconstruction_loss
from saeflow.sae.architectures.registry import register


class GatedConfig(SAEConfig):
    architecture: Literal["gated"] = "gated"
    l1_coefficient: float = Field(3.0, ge=0)
    """λ on mean ‖ReLU(π_gate)‖₁ after warm-up, normalized units (E‖x‖ = √d); 3 gave L0 ≈ 20–60 at d = 64–576."""
    l1_warmup: float = Field(0.05, ge=0, le=1)
    """Fraction of training over which λ ramps linearly from 0."""
    target_l0: float | None = Field(None, gt=0)
    """Train to this L0 (mean active latents per row): the coefficient above becomes the starting point and the
    controller of MATH §3.5 adapts it every step; None keeps the coefficient fixed."""
    unit_norm_decoder: bool = True
    """Keep decoder rows unit norm (paper); False leaves them free and weights the L1 term by ‖W_dec,i‖."""

    # MATH §2.2 names lr 5e-5 (the reference trainer's, for ~10⁵-step runs); it barely moves in saeflow's runs of
    # 10²–10⁴ steps, so the default is the common rule of MATH §3.2. β₁ = 0 is kept from the reference.
    coefficient_field: ClassVar[str | None] = "l1_coefficient"
    warmup_field: ClassVar[str | None] = "l1_warmup"
    coefficient_start: ClassVar[float] = 3.0  # the field's default, which lands near L0 32 on the real LM
    adam_betas: ClassVar[tuple[float, float]] = (0.0, 0.999)

    def sparsity_label(self) -> str:
        return f"L0_{self.target_l0:g}" if self.target_l0 else f"l1_{self.l1_coefficient:g}"


@register("gated")
class GatedSAE(SAE):
    """f = 1[π_gate > 0] ⊙ ReLU(π_mag); W_enc = W_gate, b_enc = b_gate, W_mag = W_gate ⊙ exp(r_mag)."""

    config_class = GatedConfig
    saelens_architecture = "gated"
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig, d_in: int):
        super().__init__(cfg, d_in)
        self.unit_norm_decoder = cfg.unit_norm_decoder
        # Zero init makes the magnitude path start identical to the gate path (W_mag = W_gate, b_mag = b_gate = 0).
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """With a target L0, b_gate starts where each gate opens on a share target / d_sae of the sample, so the
        code starts sparse instead of with half the latents open (MATH §2.2, §3.5)."""
        if self.cfg.target_l0:
            self.b_enc.copy_(-self.firing_quantile(self._centred(x), self.cfg.target_l0))

    def latent_dims(self) -> dict[str, int]:
        return {**super().latent_dims(), "r_mag": 0, "b_mag": 0}

    def _centred(self, x: Tensor) -> Tensor:
        """(x − b_dec) W_gate, shared by both paths."""
        # Same rewrite as SAE.pre_acts: b_dec's gradient then costs a [d_sae] vector product, not a [B, d_sae] one.
        return x @ self.W_enc - self.b_dec @ self.W_enc

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(π_gate, π_mag) from one encoder matmul; W_mag = W_gate ⊙ exp(r_mag) is never materialised (MATH §2.2)."""
        c = self._centred(x)
        return c + self.b_enc, c * self.r_mag.exp() + self.b_mag

    def gate_pre_acts(self, x: Tensor) -> Tensor:
        """π_gate = (x − b_dec) W_gate + b_gate (MATH §2.2)."""
        return self._paths(x)[0]

    def mag_pre_acts(self, x: Tensor) -> Tensor:
        """π_mag = (x − b_dec) W_mag + b_mag, W_mag = W_gate ⊙ exp(r_mag) column-wise (MATH §2.2)."""
        return self._paths(x)[1]

    def _code(self, pi_gate: Tensor, pi_mag: Tensor) -> Tensor:
        # The Heaviside gate is a comparison, so no gradient reaches W_gate/b_gate through it (MATH §2.2).
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def encode(self, x: Tensor) -> Tensor:
        return self._code(*self._paths(x))

    def sparsity_loss(self, pi_gate: Tensor) -> Tensor:
        """mean ‖ReLU(π_gate)‖₁, or Σ ReLU(π_gate)ᵢ‖W_dec,i‖ when the decoder is free (MATH §2.2)."""
        a = torch.relu(pi_gate)
        if self.unit_norm_decoder:
            return a.sum(-1).mean()
        return (a * self.W_dec.norm(dim=1)).sum(-1).mean()

    def aux_loss(self, x: Tensor, pi_gate: Tensor) -> Tensor:
        """L_aux: reconstruct x from ReLU(π_gate) through a frozen copy of the decoder (MATH §2.2).

        Only the decoder's use is frozen: b_dec still centres x inside π_gate, as in the paper's pseudo-code, so
        L_aux reaches b_dec through the encoder input but never through W_dec or the output bias.
        """
        x_gate = torch.relu(pi_gate) @ self.W_dec.detach() + self.b_dec.detach()
        return reconstruction_loss(x, x_gate)

    def loss(self, x: Tensor, state: TrainState) -> SAEOutput:
        pi_gate, pi_mag = self._paths(x)
        f = self._code(pi_gate, pi_mag)
        x_hat = self.decode(f)
        rec = reconstruction_loss(x, x_hat)
        l1 = self.sparsity_loss(pi_gate)
        aux = self.aux_loss(x, pi_gate)
        lam = self.sparsity_coefficient(state)
        loss = rec + lam * l1 + aux
        return SAEOutput(x_hat, f, loss, {"mse": rec.detach(), "l1": l1.detach(), "aux": aux.detach()})
