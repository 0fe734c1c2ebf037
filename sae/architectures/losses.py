"""Loss pieces shared by several architectures (MATH §1, §2.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from saeflow.sae.architectures.kernels import sparse_decode


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """L_rec = mean over rows of ‖x − x̂‖², summed over d (MATH §1)."""
    return (x - x_hat).pow(2).sum(-1).mean()


def warmup(progress: float, fraction: float) -> float:
    """Linear ramp 0 → 1 over the first `fraction` of training (sparsity-coefficient warm-up)."""
    return 1.0 if fraction <= 0 else min(1.0, progress / fraction)


def default_k_aux(k_aux: int | None, d_in: int) -> int:
    """AuxK's k: the configured one, else d_in / 2 (MATH §2.4)."""
    return k_aux or max(1, d_in // 2)


def auxk_loss(residual: Tensor, pre_acts: Tensor, W_dec: Tensor, dead_mask: Tensor | None, k_aux: int) -> Tensor:
    """AuxK (MATH §2.4): reconstruct the stop-gradient residual e from the top-k_aux dead latents.

    L_aux = ‖e − ê‖² / ‖e − mean(e)‖², scaled by min(#dead / k_aux, 1); zero when nothing is dead.
    """
    if dead_mask is None:
        return pre_acts.new_zeros(())
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return pre_acts.new_zeros(())
    e = residual.detach()
    k = min(k_aux, n_dead)
    masked = torch.where(dead_mask, pre_acts, torch.full_like(pre_acts, -torch.inf))
    vals, idx = masked.topk(k, dim=-1, sorted=False)
    vals = torch.relu(vals)
    # ê = f_dead W_dec, no bias; sparse, so memory is B·k_aux indices rather than a [B, k_aux, d] gather.
    e_hat = sparse_decode(vals, idx, W_dec, W_dec.new_zeros(W_dec.shape[1]))
    num = (e - e_hat).pow(2).sum()
    den = (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    return (num / den) * min(n_dead / k_aux, 1.0)
