"""Dead-latent revival (MATH §3.3): re-point latents that stopped firing at what the SAE fails to reconstruct.

AuxK only helps a dead latent whose pre-activation is already among the largest dead ones on some row; a latent
whose encoder points nowhere useful never gets there. On ground truth with rare features (p ≈ 0.1%) and co-firing
groups, half the dictionary sat dead while a third of the true features had no latent (issue 11). Revival is
Anthropic's resampling (Bricken et al. 2023, "Towards Monosemanticity") done on the batch at hand: rows are
drawn with probability ∝ ‖x − x̂‖², and each dead latent takes one drawn row's residual direction as its decoder
row and (scaled) encoder column, with fresh Adam moments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from saeflow.sae.architectures.base import SAE


@torch.no_grad()
def revive_dead(sae: SAE, optimizer: torch.optim.Optimizer, x: Tensor, x_hat: Tensor, dead: Tensor) -> Tensor:
    """Revive up to a quarter of a batch's worth of the `dead` latents from batch x and its reconstruction x̂;
    return the indices revived. Uses the global torch RNG (part of the resumable training state, §3.4)."""
    residual = x - x_hat.float()
    weight = residual.pow(2).sum(-1)
    dead_idx = dead.nonzero().flatten()
    n = min(len(dead_idx), max(1, x.shape[0] // 4), int((weight > 0).sum()))
    if n == 0:
        return dead_idx[:0]
    latents = dead_idx[torch.randperm(len(dead_idx), device=dead_idx.device)[:n]]
    drawn = residual[torch.multinomial(weight, n, replacement=False)]
    directions = drawn / drawn.norm(dim=-1, keepdim=True)
    sae.revive(latents, directions)
    _reset_moments(sae, optimizer, latents)
    return latents


def _reset_moments(sae: SAE, optimizer: torch.optim.Optimizer, latents: Tensor) -> None:
    """Adam's first moment of the revived slices to zero, the second to the alive latents' mean along the latent
    dimension: zero would make the next step lr/√(1 − β₂) ≈ 30·lr, throwing the new direction away at once."""
    params = dict(sae.named_parameters())
    alive = sae.others(latents).nonzero().flatten()
    for name, dim in sae.latent_dims().items():
        state = optimizer.state.get(params[name])
        if not state:
            continue
        state["exp_avg"].index_fill_(dim, latents, 0.0)
        sq = state["exp_avg_sq"]
        typical = sq.index_select(dim, alive).mean(dim, keepdim=True)
        sq.index_copy_(dim, latents, typical.expand_as(sq.index_select(dim, latents)).contiguous())
