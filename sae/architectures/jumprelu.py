"""JumpReLU SAE (MATH §2.3, Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope).

f_i = π_i · H(π_i − θ_i) with learned θ_i = exp(t_i), trained on an L0 penalty through straight-through estimators.
The threshold lives in the Parameter `log_threshold` (t), so it is in `state_dict()` and in the checkpoint;
SAELens' inference JumpReLU stores `threshold` = exp(log_threshold).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from saeflow.sae.architectures.base import SAE, SAEConfig, SAEOutput, TrainState
from saeflow.sae.architectures.losses import auxk_loss, default_k_aux, reconstruction_loss
from saeflow.sae.architectures.registry import register


def _rectangle(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """K((π − θ)/ε) for the rectangle kernel K(u) = 1[|u| < ½] (MATH §2.3)."""
    return ((pre - threshold).abs() < bandwidth / 2).to(torch.float32)


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    # θ broadcasts over the batch, so its gradient is the sum over every leading dimension.
    return grad.reshape(-1, like.shape[-1]).sum(0).to(like.dtype)


class StepSTE(torch.autograd.Function):
    """H(π − θ) forward; backward ∂/∂θ ≈ −(1/ε)K((π−θ)/ε) and nothing to π (MATH §2.3)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        # Float32 even under bf16 autocast: a bf16 sum of thousands of 0/1 entries is not exact.
        return (pre > threshold).to(threshold.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_theta = -(1.0 / eps) * _rectangle(pre, threshold, eps) * grad.float()
        return None, _sum_to(g_theta, threshold), None


class JumpReLUSTE(torch.autograd.Function):
    """π · H(π − θ) forward; backward ∂/∂π = H(π − θ), ∂/∂θ ≈ −(θ/ε)K((π−θ)/ε) (MATH §2.3)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = grad * (pre > threshold).to(grad.dtype)
        g_theta = -(threshold.float() / eps) * _rectangle(pre, threshold, eps) * grad.float()
        return g_pre, _sum_to(g_theta, threshold), None


class JumpReLUConfig(SAEConfig):
    architecture: Literal["jumprelu"] = "jumprelu"
    l0_coefficient: float = Field(1.0, ge=0)
    """λ, the cost of one active latent per row after warm-up, in L_rec units (E‖x‖ = √d); θ settles near √λ."""
    l0_warmup: float = Field(0.05, ge=0, le=1)
    """Fraction of training over which λ ramps linearly from 0."""
    target_l0: float | None = Field(None, gt=0)
    """Train to this L0 (mean active latents per row): the coefficient above becomes the starting point and the
    controller of MATH §3.5 adapts it every step; None keeps the coefficient fixed."""
    bandwidth: float = Field(0.05, gt=0)
    """ε, the width of the rectangle kernel of the straight-through estimators, in normalized units."""
    threshold_init: float = Field(0.5, gt=0)
    """θ at initialisation (every latent), in normalized units; stored as log θ."""
    # MATH §2.3's paper defaults (ε = θ_init = 0.001) are in units where E‖x‖² = 1; ours are √d larger, so the paper's
    # ε is 0.05 here at d ≈ 2500 (SAELens' default, same normalization). θ_init = 0.001 would need ~log(1000)/lr
    # Adam steps before any latent is sparse: L0 stayed ≈ 0.7·d_sae for 1500 steps at lr 1e-3 on synthetic data.
    # Pre-activations are O(1) at init, so θ = 0.5 starts at L0 ≈ 0.3·d_sae and the L0 term moves it from there.
    unit_norm_decoder: bool = True
    """Keep decoder rows unit norm (Gemma Scope); False leaves them free."""
    sparsity: Literal["l0", "tanh"] = "l0"
    """`l0`: λ·Σ H(π − θ) (paper); `tanh`: λ·Σ tanh(c·fᵢ‖W_dec,i‖) (Anthropic's option, MATH §2.3)."""
    tanh_scale: float = Field(4.0, gt=0)
    """c in the tanh sparsity penalty (per unit of fᵢ‖W_dec,i‖)."""
    threshold_tracking: float | None = Field(None, ge=0, le=1)
    """With `target_l0`: before each training step, every log θ moves this fraction of the way to the one common
    shift at which the batch's L0 equals the target, and the controller steers λ by the L0 found before that shift
    (MATH §2.3). None = min(0.05, 20 / steps) for a run of that many steps; 0 leaves L0 to λ alone. λ moves θ only
    about lr per step, slower than the pre-activations change early in a short run (the real LM's L0 fell from 64
    to 28 in 30 steps whatever λ was): 0.05 there. Long runs need less, and more costs fidelity: on the hard
    synthetic regime's fast instance (1500 steps) 0.1 and 0.2 raised FVU from 0.081 to 0.106 and 0.142, and 0.05
    over 6000 steps recovered 89.8% of the true features on one seed instead of 92%."""
    threshold_lr_scale: float = Field(10.0, gt=0)
    """log θ's learning rate as a multiple of the SAE's. Adam moves log θ by about lr per step, so at lr 5e-4 θ can
    change by at most e^0.5 in 1000 steps: too slow for a controller (or a coefficient) to steer L0. 10 tracked a
    target L0 within 10% in 1200 steps; 30 left twice the dead latents."""
    aux_coefficient: float = Field(1 / 32, ge=0)
    """α of an AuxK term (MATH §2.4) on the dead latents' pre-activations: a latent whose π stays below θ gets no
    gradient through the jump, so without it a latent that falls silent stays dead (0 turns it off)."""
    k_aux: int | None = Field(None, ge=1)
    """Dead latents used by AuxK; None means d_in / 2."""

    # Revival every tenth of training (the SAEConfig default). Before threshold tracking it left many latents firing
    # at the edge of θ and the logged dead share 0.07 below the held-out one (MATH §3.3); with tracking they agree.
    # As for gated: the reference lr 5e-5 suits ~10⁵-step runs; log θ moves at most ≈ lr per Adam step.
    coefficient_field: ClassVar[str | None] = "l0_coefficient"
    warmup_field: ClassVar[str | None] = "l0_warmup"
    adam_betas: ClassVar[tuple[float, float]] = (0.0, 0.999)

    def sparsity_label(self) -> str:
        return (
            f"{self.sparsity}_L0_{self.target_l0:g}" if self.target_l0 else f"{self.sparsity}_{self.l0_coefficient:g}"
        )


@register("jumprelu")
class JumpReLUSAE(SAE):
    config_class = JumpReLUConfig
    saelens_architecture = "jumprelu"
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig, d_in: int):
        super().__init__(cfg, d_in)
        self.unit_norm_decoder = cfg.unit_norm_decoder
        # A log-parametrised threshold stays positive and moves by relative steps under Adam.
        self.log_threshold = nn.Parameter(torch.full((self.d_sae,), math.log(cfg.threshold_init)))

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """With a target L0, θ starts where each latent fires on a share target / d_sae of the sample: L0 starts at
        the target instead of ≈ 0.3·d_sae, since log θ moves only about lr per step (MATH §2.3, §3.5)."""
        if self.cfg.target_l0:
            theta = self.firing_quantile(self.pre_acts(x), self.cfg.target_l0).clamp_min(1e-3)
            self.log_threshold.copy_(theta.log())

    def latent_dims(self) -> dict[str, int]:
        return {**super().latent_dims(), "log_threshold": 0}

    def param_groups(self, lr: float) -> list[dict]:
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": rest, "lr": lr}, {"params": [self.log_threshold], "lr": lr * self.cfg.threshold_lr_scale}]

    @property
    def threshold(self) -> Tensor:
        """θ = exp(t), one per latent, in normalized units."""
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold).to(pre.dtype)

    def tracking_rate(self, total_steps: int | None) -> float:
        """η of MATH §2.3: `threshold_tracking`, or by default min(0.05, 20 / steps) (0.05 when steps are unknown)."""
        if self.cfg.threshold_tracking is not None:
            return self.cfg.threshold_tracking
        return min(0.05, 20 / total_steps) if total_steps else 0.05

    @torch.no_grad()
    def track_target_l0(self, pre: Tensor, rate: float) -> Tensor:
        """Shift every log θ by `rate` × s, where s is the common shift that makes the batch's L0 `target_l0`
        (the k-th largest log π − log θ over the batch, k = target × rows), clipped to ±1. A shift common to all
        latents keeps what λ and the reconstruction taught each θ relative to the others. Returns the batch's L0
        before the shift: what the L0 controller steers λ by (MATH §2.3)."""
        rows = pre[:1024].float()  # a global shift is well estimated from a thousand rows
        gap = (rows.clamp_min(1e-6).log() - self.log_threshold.float()).flatten()
        target = self.cfg.target_l0
        assert target is not None, "tracking needs target_l0"  # loss() calls this only with a target
        k = min(gap.numel() - 1, max(1, round(target * rows.shape[0])))
        shift = gap.kthvalue(gap.numel() - k).values.clamp(-1.0, 1.0)
        self.log_threshold.add_((rate * shift).to(self.log_threshold.dtype))
        return (gap > 0).sum() / rows.shape[0]

    def loss(self, x: Tensor, state: TrainState) -> SAEOutput:
        pre = self.pre_acts(x)
        rate = self.tracking_rate(state.total_steps) if self.cfg.target_l0 else 0.0
        l0_untracked = self.track_target_l0(pre, rate) if rate else None
        theta = self.threshold
        f = JumpReLUSTE.apply(pre, theta, self.cfg.bandwidth)
        x_hat = self.decode(f)
        rec = reconstruction_loss(x, x_hat)
        if self.cfg.sparsity == "l0":
            sparsity = StepSTE.apply(pre, theta, self.cfg.bandwidth).sum(-1).mean()  # MATH §2.3 L0 penalty
        else:
            scaled = f * self.W_dec.norm(dim=1) * self.cfg.tanh_scale
            sparsity = torch.tanh(scaled).sum(-1).mean()  # MATH §2.3 Option (tanh)
        lam = self.sparsity_coefficient(state)
        loss = rec + lam * sparsity
        terms = {"mse": rec.detach(), "sparsity": sparsity.detach()}
        if l0_untracked is not None:
            terms["controlled_l0"] = l0_untracked
        if self.cfg.aux_coefficient:
            aux = auxk_loss(x - x_hat, pre, self.W_dec, state.dead_mask, default_k_aux(self.cfg.k_aux, self.d_in))
            loss = loss + self.cfg.aux_coefficient * aux
            terms["auxk"] = aux.detach()
        return SAEOutput(x_hat, f, loss, terms)
