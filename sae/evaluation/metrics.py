"""Evaluation metrics (MATH §5). Ratios are aggregated over all tokens before dividing, never averaged per token."""

from __future__ import annotations

import torch
from torch import Tensor

L0_QUANTILES = (0.1, 0.5, 0.9)
"""Quantiles of the per-token L0 distribution reported next to its mean."""


class ReconstructionMetrics:
    """Streaming accumulator over batches of rows (MATH §5): MSE, FVU, cosine(x, x̂), the L0 distribution, every
    latent's firing frequency, dead/dense fractions and shrinkage γ.

    x and x̂ arrive in the SAE's normalized units; `input_scale` (c, MATH §4.1) converts MSE back to model units.
    """

    def __init__(self, d_sae: int, input_scale: float = 1.0):
        self.input_scale = float(input_scale)
        self.n = 0
        self.sq_err = 0.0
        self.sum_x: Tensor | None = None
        self.sum_sq_x = 0.0
        self.l0_sum = 0.0
        self.l0_hist = torch.zeros(d_sae + 1, dtype=torch.float64)  # rows with exactly k active latents
        self.fire_counts = torch.zeros(d_sae, dtype=torch.float64)
        self.cos_sum = 0.0
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
        per_row = active.sum(1)
        self.l0_sum += float(per_row.sum())
        self.l0_hist += torch.bincount(per_row.cpu(), minlength=len(self.l0_hist)).double()
        self.fire_counts += active.sum(0).double().cpu()
        # cosine(x, x̂) per row, a zero row counting as 0 (MATH §5); the same in normalized and model units.
        norms = (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(1e-30)
        self.cos_sum += float(((x * x_hat).sum(-1) / norms).sum())
        # Shrinkage γ = E‖x̂‖² / E⟨x̂, x⟩ with both centred on b_dec (MATH §5, seed 1's relative reconstruction bias).
        c = b_dec.double() if b_dec is not None else 0.0
        xc, xhc = x - c, x_hat - c
        self.xhat_sq += float(xhc.pow(2).sum())
        self.xhat_dot_x += float((xhc * xc).sum())

    def firing_frequency(self) -> Tensor:
        """pᵢ = fraction of rows with fᵢ > 0, for every latent (MATH §5), float64 [d_sae]."""
        return self.fire_counts / max(self.n, 1)

    def l0_quantile(self, q: float) -> float:
        """Smallest k with P(L0 ≤ k) ≥ q (the inverted-CDF quantile of the per-row L0)."""
        cdf = self.l0_hist.cumsum(0) / max(self.n, 1)
        return float(torch.searchsorted(cdf, torch.tensor([q], dtype=cdf.dtype) - 1e-12).clamp_max(len(cdf) - 1))

    def result(self) -> dict[str, float]:
        n = max(self.n, 1)
        if self.sum_x is None:  # nothing seen: every ratio is undefined
            return {}
        mean = self.sum_x / n
        total_var = self.sum_sq_x - n * float(mean.pow(2).sum())  # Σ‖x − x̄‖²
        fvu = self.sq_err / total_var if total_var > 0 else float("nan")
        freq = self.firing_frequency()
        nonzero = torch.nonzero(self.l0_hist).flatten()
        out = {
            "mse": self.sq_err / n,
            "mse_raw": self.sq_err / n / self.input_scale**2,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "cosine_sim": self.cos_sum / n,
            "l0": self.l0_sum / n,
            **{f"l0_q{round(q * 100):02d}": self.l0_quantile(q) for q in L0_QUANTILES},
            "l0_max": float(nonzero[-1]) if len(nonzero) else 0.0,
            "dead_fraction": float((freq == 0).double().mean()),
            "dense_fraction": float((freq > 0.1).double().mean()),
            "shrinkage_gamma": self.xhat_sq / self.xhat_dot_x if self.xhat_dot_x else float("nan"),
            "eval_rows": float(self.n),
        }
        return out


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_abl − CE_sae) / (CE_abl − CE_clean) (MATH §5): 1 = as good as the clean model, 0 = as bad as ablation."""
    denom = ce_ablated - ce_clean
    return (ce_ablated - ce_spliced) / denom if denom != 0 else float("nan")


def cosine_recovered(cos_spliced: float, cos_zero: float) -> float:
    """Encoder models (MATH §5): (cos_sae − cos_zero) / (1 − cos_zero), cosines to the clean pooled embedding."""
    denom = 1.0 - cos_zero
    return (cos_spliced - cos_zero) / denom if denom != 0 else float("nan")


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


def pooled_cosine_sum(clean: Tensor, other: Tensor) -> float:
    """Σ over windows of cosine(mean-pooled clean final hidden state, mean-pooled spliced one); inputs [B, T, d]."""
    a, b = clean.double().mean(1), other.double().mean(1)
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)).sum())
