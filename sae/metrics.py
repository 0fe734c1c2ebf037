"""Evaluation metrics (SPEC 5). Ratios are aggregated over all tokens before dividing, never averaged per token."""

from __future__ import annotations

import torch
from torch import Tensor


class ReconstructionMetrics:
    """Streaming accumulator for MSE, FVU, L0, firing frequencies and shrinkage over batches of rows."""

    def __init__(self, d_sae: int):
        self.n = 0
        self.sq_err = 0.0
        self.sum_x: Tensor | None = None
        self.sum_sq_x = 0.0
        self.l0_sum = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)
        self.xhat_sq = 0.0
        self.xhat_dot_x = 0.0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor, b_dec: Tensor | None = None) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sq_err += float((x - x_hat).pow(2).sum())
        sx = x.sum(0).cpu()
        self.sum_x = sx if self.sum_x is None else self.sum_x + sx
        self.sum_sq_x += float(x.pow(2).sum())
        active = f > 0
        self.l0_sum += float(active.sum())
        self.fire_counts += active.sum(0).double().cpu()
        # Shrinkage γ = E‖x̂‖² / E⟨x̂, x⟩ with both centred on b_dec (SPEC 5, seed 1's relative reconstruction bias).
        c = b_dec.double() if b_dec is not None else 0.0
        xc, xhc = x - c, x_hat - c
        self.xhat_sq += float(xhc.pow(2).sum())
        self.xhat_dot_x += float((xhc * xc).sum())

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        mean = self.sum_x / n
        total_var = self.sum_sq_x - n * float(mean.pow(2).sum())  # Σ‖x − x̄‖²
        fvu = self.sq_err / total_var if total_var > 0 else float("nan")
        freq = self.fire_counts / n
        return {
            "mse": self.sq_err / n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "l0": self.l0_sum / n,
            "dead_fraction": float((freq == 0).double().mean()),
            "dense_fraction": float((freq > 0.1).double().mean()),
            "shrinkage_gamma": self.xhat_sq / self.xhat_dot_x if self.xhat_dot_x else float("nan"),
            "eval_rows": float(self.n),
        }


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_abl − CE_sae) / (CE_abl − CE_clean) (SPEC 5): 1 = as good as the clean model, 0 = as bad as ablation."""
    denom = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / denom if denom != 0 else float("nan")


def next_token_ce_sum(logits: Tensor, input_ids: Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropies over positions 0..T-2 and their count."""
    lp = logits[:, :-1].float().log_softmax(-1)
    tgt = input_ids[:, 1:]
    nll = -lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    return float(nll.sum()), nll.numel()


def kl_sum(logits_clean: Tensor, logits_other: Tensor) -> float:
    """Σ over predicted positions of KL(p_clean ‖ p_other)."""
    lp = logits_clean[:, :-1].float().log_softmax(-1)
    lq = logits_other[:, :-1].float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum())
