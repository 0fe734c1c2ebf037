"""top-AFA SAE (MATH §2.6, Lee et al. 2025): the input's norm decides how many latents fire; no k to tune."""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from saeflow.sae.architectures.base import SAE, SAEConfig, SAEOutput, TrainState
from saeflow.sae.architectures.losses import auxk_loss, reconstruction_loss
from saeflow.sae.architectures.registry import register


class TopAFAConfig(SAEConfig):
    architecture: Literal["topafa"] = "topafa"
    use_b_enc: bool = True
    """Add b_enc to the pre-activation π (MATH §2.6 keeps it; the reference code drops it)."""
    afa_select: Literal["nearest", "first_exceed"] = "nearest"
    """k*(x): the prefix whose norm C_j is nearest the target norm, or the first prefix whose norm reaches it."""
    afa_target: Literal["centred", "raw"] = "centred"
    """Target norm for the selection and the AFA loss: ‖x − b_dec‖ (paper) or ‖x‖ (reference code)."""
    afa_coefficient: float = Field(1 / 32, ge=0)
    """λ_AFA, weight of mean_B (‖f‖ − target)², both norms in normalized units (E‖x‖ = √d)."""
    k_aux: int = Field(512, ge=1)
    """Dead latents used by AuxK (capped by the number dead, MATH §2.6)."""
    aux_coefficient: float = Field(1 / 32, ge=0)
    """α, the weight of the AuxK loss."""
    l1_coefficient: float = Field(0.0, ge=0)
    """λ₁ on ‖f‖₁ (the reference code's `l1_coeff`; MATH §2.6 and the paper use 0). Without it top-AFA has no
    pressure toward few latents and on superposition data usually settles on a dense code whose decoder rows are
    mixtures (benchmarks/README.md). With it, b_enc becomes a threshold that prunes the tail, and the selection and
    the AFA term keep ‖f‖ near ‖z‖."""
    l1_warmup: float = Field(0.05, ge=0, le=1)
    """Fraction of training over which λ₁ ramps linearly from 0."""
    target_l0: float | None = Field(None, gt=0)
    """Train to this L0 (mean active latents per row): the coefficient above becomes the starting point and the
    controller of MATH §3.5 adapts it every step; None keeps the coefficient fixed."""

    # Same as TopK: MATH §2.6 asks for top-AFA to be benchmarked next to TopK, so keep the optimiser identical.
    coefficient_field: ClassVar[str | None] = "l1_coefficient"
    coefficient_start: ClassVar[float] = 0.3  # the λ₁ that gave L0 ≈ 3× the true L0 on the easy synthetic instance
    warmup_field: ClassVar[str | None] = "l1_warmup"

    def sparsity_label(self) -> str:
        l1 = (
            f"_L0_{self.target_l0:g}"
            if self.target_l0
            else f"_l1_{self.l1_coefficient:g}"
            if self.l1_coefficient
            else ""
        )
        return f"afa{self.afa_coefficient:g}{l1}"


class AFASelection(NamedTuple):
    mask: Tensor
    """Bool [B, d_sae], True on each row's top-k* scores."""
    k_star: Tensor
    """Long [B], the number of latents each row keeps."""


def afa_select(a: Tensor, d_norm: Tensor, target: Tensor, how: str = "nearest") -> AFASelection:
    """Pick each row's k* = argmin_j |C_j − target|, C_j = √(prefix sum of sorted sᵢ = (aᵢ‖dᵢ‖)²) (MATH §2.6).

    Vectorised over the batch: one sort per row, a cumulative sum, and a scatter of the rank mask back.
    """
    # float32 whatever autocast did: a bf16 cumulative sum of squares loses the precision the selection needs.
    s = (a.float() * d_norm.float()).pow(2)
    s_sorted, order = s.sort(dim=-1, descending=True)
    c = s_sorted.cumsum(-1).sqrt()
    t = target.float()[:, None]
    n = a.shape[-1]
    if how == "nearest":
        # argmin takes the first of ties, so once the positive scores run out (C plateaus) k* stops growing.
        k_star = (c - t).abs().argmin(-1) + 1
    elif how == "first_exceed":
        k_star = ((c < t).sum(-1) + 1).clamp_max(n)
    else:
        raise ValueError(f"afa_select must be 'nearest' or 'first_exceed', not {how!r}")
    keep_sorted = torch.arange(n, device=a.device) < k_star[:, None]
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return AFASelection(mask, k_star)


@register("topafa")
class TopAFASAE(SAE):
    config_class = TopAFAConfig
    unit_norm_decoder = True
    saelens_unsupported = (
        "top-AFA picks how many latents fire from ‖x − b_dec‖ per row (MATH §2.6); no SAELens architecture computes "
        "that, and a fixed k or threshold would change its codes"
    )  # MATH §2.6: the AFA bound assumes unit-norm rows
    cfg: TopAFAConfig

    # Base init already gives unit decoder rows and W_enc = W_decᵀ, the init MATH §2.6 asks for.

    def pre_acts(self, x: Tensor) -> Tensor:
        # Without b_enc the parameter stays at zero (no gradient reaches it); it is kept so every checkpoint of
        # this architecture has the same tensors.
        pre = (x - self.b_dec) @ self.W_enc
        return pre + self.b_enc if self.cfg.use_b_enc else pre

    def target_norm(self, x: Tensor) -> Tensor:
        return (x - self.b_dec if self.cfg.afa_target == "centred" else x).norm(dim=-1)

    def decoder_norms(self) -> Tensor:
        # Rows are unit norm at every forward (renormalised after each step), so this is all ones and sᵢ = aᵢ²,
        # ‖f̃‖ = ‖f‖. Kept general (and detached: a unit conversion, not something to learn) so the selection
        # stays right on a decoder someone rescaled.
        return self.W_dec.detach().norm(dim=1)

    def code(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(π, f, target norm): f = ReLU(π) masked to its top-k* entries. Same in training and inference."""
        pre = self.pre_acts(x)
        a = torch.relu(pre)
        target = self.target_norm(x)
        sel = afa_select(a.detach(), self.decoder_norms(), target.detach(), self.cfg.afa_select)
        return pre, a * sel.mask, target

    def encode(self, x: Tensor) -> Tensor:
        return self.code(x)[1]

    def loss(self, x: Tensor, state: TrainState) -> SAEOutput:
        pre, f, target = self.code(x)
        x_hat = self.decode(f)
        rec = reconstruction_loss(x, x_hat)
        # MATH §2.6 L_AFA. The target is detached: the term should pull the code's norm to the input's, not move
        # b_dec to shrink ‖z‖ toward whatever the code happens to be.
        f_norm = (f * self.decoder_norms()).norm(dim=-1)
        afa = (f_norm - target.detach()).pow(2).mean()
        aux = auxk_loss(x - x_hat, pre, self.W_dec, state.dead_mask, self.cfg.k_aux)
        loss = rec + self.cfg.afa_coefficient * afa + self.cfg.aux_coefficient * aux
        terms = {"mse": rec.detach(), "afa": afa.detach(), "auxk": aux.detach()}
        if self.cfg.l1_coefficient or state.coefficient is not None:
            # The reference code's optional λ₁·mean_B ‖f‖₁ (f ≥ 0, unit decoder rows, so no norm weighting).
            l1 = f.sum(-1).mean()
            loss = loss + self.sparsity_coefficient(state) * l1
            terms["l1"] = l1.detach()
        return SAEOutput(x_hat, f, loss, terms)
