"""Seed 2's evaluation of any SAE (MATH §5.1): the approximate feature activation (AFA) relation ‖f̃‖ ≈ ‖z‖,
its error statistic ε_LBO, and decoder quasi-orthogonality."""

from __future__ import annotations

import torch
from torch import Tensor

from saeflow.sae.architectures.base import SAE


class AFAAccumulator:
    """Streams eval rows; keeps every ‖z‖, ‖f̃‖ pair up to `max_points` (for the ZF plot) and ε_LBO and ‖f̃‖/‖z‖ of
    every row (16 bytes per row in all, for exact medians).

    z is the raw site activation (model units); f̃ = (f₁‖d₁‖, …, f_n‖d_n‖, ‖b_dec‖) with decoder norms in raw units,
    the decoder bias counting as one always-on atom, and h = n (MATH §5.1).
    """

    def __init__(self, sae: SAE, max_points: int = 20_000):
        self.sae = sae
        scale = float(sae.input_scale)
        # Raw-unit atoms: the SAE decodes c·x, so its decoder rows and bias in model units are W_dec/c, b_dec/c.
        self.atom_norms = (sae.W_dec.detach().norm(dim=1) / scale).double()
        self.bias_norm = float(sae.b_dec.detach().norm()) / scale
        self.h = sae.d_sae
        self.max_points = max_points
        self.z_norms: list[Tensor] = []
        self.f_norms: list[Tensor] = []
        self.eps: list[Tensor] = []
        self.ratios: list[Tensor] = []  # ‖f̃‖/‖z‖ of every row, like ε_LBO (one float each)
        self.kept = 0

    @torch.no_grad()
    def update(self, z_raw: Tensor, f: Tensor | None = None) -> None:
        """z_raw: [rows, d] raw activations; f: their codes when the caller already has them (else encoded here)."""
        f = (self.sae.encode_raw(z_raw.float()) if f is None else f).double()
        f_tilde_sq = (f * self.atom_norms.to(f.device)).pow(2).sum(-1) + self.bias_norm**2
        z_sq = z_raw.double().pow(2).sum(-1)
        self.eps.append(((z_sq - f_tilde_sq).abs() / ((self.h - 1) * f_tilde_sq.clamp_min(1e-30))).cpu())
        self.ratios.append((f_tilde_sq / z_sq.clamp_min(1e-30)).sqrt().cpu())
        room = self.max_points - self.kept
        if room > 0:
            self.z_norms.append(z_sq[:room].sqrt().cpu())
            self.f_norms.append(f_tilde_sq[:room].sqrt().cpu())
            self.kept += min(room, len(z_sq))

    def result(self) -> dict[str, float]:
        import numpy as np  # numpy's quantile has no size limit (torch.quantile stops at 2**24 elements)

        eps = torch.cat(self.eps).numpy()
        ratio = torch.cat(self.ratios).numpy()
        q = np.quantile(eps, [0.25, 0.5, 0.75])
        return {
            "afa_eps_lbo_q25": float(q[0]),
            "afa_eps_lbo_median": float(q[1]),
            "afa_eps_lbo_q75": float(q[2]),
            "afa_norm_ratio_median": float(np.median(ratio)),
        }

    def points(self) -> tuple[Tensor, Tensor]:
        """(‖z‖, ‖f̃‖) of the first `max_points` rows: the ZF plot's scatter."""
        return torch.cat(self.z_norms), torch.cat(self.f_norms)


@torch.no_grad()
def decoder_cosines(W_dec: Tensor, max_pairs: int = 200_000, seed: int = 0) -> Tensor:
    """|cos| between distinct decoder rows: every pair when there are few, else `max_pairs` random pairs."""
    w = W_dec.detach().double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    n = w.shape[0]
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
    else:
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (max_pairs,), generator=g)
        j = (i + torch.randint(1, n, (max_pairs,), generator=g)) % n  # never i == j
    # In chunks, so 200k pairs of wide rows never materialise a [pairs, d] product at once.
    return torch.cat([(w[i[a : a + 8192]] * w[j[a : a + 8192]]).sum(-1).abs().cpu() for a in range(0, len(i), 8192)])


def decoder_geometry(W_dec: Tensor, max_pairs: int = 200_000, cos: Tensor | None = None) -> dict[str, float]:
    """Max, mean and 99th percentile of the off-diagonal |cos| of decoder rows (MATH §5, §5.1)."""
    cos = decoder_cosines(W_dec, max_pairs) if cos is None else cos
    return {
        "decoder_cos_max": float(cos.max()),
        "decoder_cos_mean": float(cos.mean()),
        "decoder_cos_q99": float(torch.quantile(cos.float(), 0.99)),
    }
