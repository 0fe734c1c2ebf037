"""BatchTopK SAE (MATH §2.5, Bussmann et al. 2024): TopK across the whole batch, one learned threshold at inference."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from saeflow.sae.architectures.base import SAEOutput, TrainState
from saeflow.sae.architectures.losses import auxk_loss, default_k_aux, reconstruction_loss
from saeflow.sae.architectures.registry import register
from saeflow.sae.architectures.topk import TopKConfig, TopKSAE


class BatchTopKConfig(TopKConfig):
    architecture: Literal["batchtopk"] = "batchtopk"  # type: ignore[assignment]
    threshold_decay: float = Field(0.99, ge=0, le=1)
    """Per-step decay of θ's running mean: θ averages the last ~1/(1 − decay) steps; 1.0 = mean over all steps."""
    # 0.99 is SAELens' threshold lr of 0.01: θ should describe the end of training, not the random init.
    k_anneal: float = Field(0.0, ge=0, le=1)
    """k annealing (TopK's, MATH §2.4) is off: the batch-wide selection already lets latents outside a row's top k
    fire, and on the real-LM benchmark annealing from 4k left BatchTopK's dead share where it was (5.0% → 5.3%)."""
    aux_coefficient: float = Field(1 / 8, ge=0)
    """α, the weight of the AuxK loss. 1/8, not TopK's 1/32: the batch-wide selection lets a few latents take the
    slots of many rows, so more latents fall dead and need reviving; on the synthetic ground truth (d 64, 128
    features, two seeds) recovery went from 87–88% to 92–95% and held-out dead latents fell (hard regime 51% → 41%)."""


def batch_topk(pre: Tensor, k: int) -> Tensor:
    """Keep the k·B largest ReLU(π) across the flattened batch (MATH §2.5); per-row L0 varies, its mean is ≤ k."""
    acts = torch.relu(pre)
    flat = acts.flatten()
    vals, idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(acts)


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """TopK's init, unit-norm decoder and AuxK; only the activation and the inference threshold differ."""

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig
    # Inference is f = π·1[π > θ] with one shared θ, which SAELens itself saves as a JumpReLU with θ repeated per
    # latent (its BatchTopKTrainingSAE); Matryoshka inherits this.
    saelens_architecture = "jumprelu"

    threshold: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: BatchTopKConfig, d_in: int):
        super().__init__(cfg, d_in)
        # Buffers, not attributes: θ and its update count must land in state_dict and hence the checkpoint
        # (MATH §2.5), and the count makes a resumed run continue the same running mean (MATH §3.4).
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def activation(self, pre: Tensor) -> Tensor:
        """Training: BatchTopK. Eval: f = π·1[π > θ] — a batch-independent JumpReLU with one shared θ."""
        if self.training:
            return batch_topk(pre, self.cfg.k)
        return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))  # +0, not π·0 = −0 where π < 0

    def loss(self, x: Tensor, state: TrainState) -> SAEOutput:
        # Written out rather than super().loss(): the training code must come from batch_topk even if TopK's
        # loss moves to a fused per-row kernel.
        pre = self.pre_acts(x)
        f = batch_topk(pre, self.k_at(state.progress))
        x_hat = self.decode(f)
        rec = reconstruction_loss(x, x_hat)
        aux = auxk_loss(x - x_hat, pre, self.W_dec, state.dead_mask, self.k_aux())
        self.update_threshold(f)
        loss = rec + self.cfg.aux_coefficient * aux
        terms = {"mse": rec.detach(), "auxk": aux.detach(), "threshold": self.threshold.clone()}
        return SAEOutput(x_hat, f, loss, terms)

    def k_aux(self) -> int:
        return default_k_aux(self.cfg.k_aux, self.d_in)

    @torch.no_grad()
    def update_threshold(self, f: Tensor) -> None:
        """θ ← running mean of the smallest kept (positive) activation of each batch (MATH §2.5).

        Tensor ops only, so a GPU step never waits on a host sync; a batch with nothing kept leaves θ alone.
        """
        smallest = torch.where(f > 0, f, torch.full_like(f, torch.inf)).min().float()
        seen = smallest.isfinite()
        n = self.threshold_updates + seen.long()
        # Weight 1/n is the exact mean over steps so far; the floor 1 − decay lets early-training values fade.
        w = torch.clamp(1.0 / n.clamp_min(1).float(), min=1.0 - self.cfg.threshold_decay)
        new = self.threshold + w * (torch.where(seen, smallest, self.threshold) - self.threshold)
        self.threshold.copy_(new)
        self.threshold_updates.copy_(n)
