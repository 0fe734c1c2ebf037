"""Target L0: a controller that adapts an SAE's sparsity coefficient during training (MATH §3.5).

Users of every SAE library spend most of their compute bracketing coefficients: L0 responds to λ with a lag,
non-linearly (Gated's L0 falls off a cliff between two coefficients) and differently at every lr and length. Here
the coefficient is a state of training instead: each step measures the batch's L0 and moves log λ by

    e = log(L0 + 1) − log(L0*(t) + 1)            (log space: an L0 of 500 vs 50 is as far off as 50 vs 5)
    log λ ← log λ + gain · clip(e + horizon · slope, −1, 1)

(integral action on where L0 is heading: `slope` is the EMA of log L0's change per step, which stops the wind-up
that overshoots into a collapse; the clip bounds a step while L0 is far off),

where the target L0*(t) glides geometrically from the first batch's L0 to the target over the first
`ramp` fraction of training, so λ rises smoothly while the code sparsifies instead of jumping to where a dense
code would drive it (the overshoot is what collapses Gated SAEs). The +1 keeps the error finite when a collapse
takes L0 to 0, and then λ falls until latents fire again. Tensor arithmetic only: no host sync per step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class L0Controller:
    """Holds log λ for one SAE and updates it from each batch's measured L0."""

    def __init__(self, target_l0: float, start: float, gain: float, ramp: float, horizon: float, device: torch.device):
        self.target, self.gain, self.ramp, self.horizon = target_l0, gain, ramp, horizon
        # [log λ, log(L0₀ + 1) of the first batch, log(L0 + 1) of the last batch, its slope per step (EMA)];
        # nan until measured.
        self.state = torch.tensor([math.log(start), math.nan, math.nan, 0.0], dtype=torch.float64, device=device)

    def coefficient(self) -> Tensor:
        """λ for the next step (a 0-d float32 tensor on the training device)."""
        return self.state[0].exp().float()

    def target_at(self, progress: float) -> Tensor:
        """log(L0*(t) + 1): geometric glide from the first batch's L0 to the target over `ramp`."""
        end = math.log(self.target + 1)
        if self.ramp <= 0 or progress >= self.ramp:
            return torch.tensor(end, dtype=torch.float64, device=self.state.device)
        w = progress / self.ramp
        return (1 - w) * self.state[1] + w * end

    @torch.no_grad()
    def update(self, l0: Tensor, progress: float) -> None:
        """After a step: `l0` is that batch's mean active latents per row (0-d tensor)."""
        measured = (l0.double() + 1).log()
        first = self.state[1].isnan()
        self.state[1] = torch.where(first, measured, self.state[1])
        step = torch.where(first, torch.zeros_like(measured), measured - self.state[2])
        self.state[3] = 0.98 * self.state[3] + 0.02 * step
        self.state[2] = measured
        # Act on where L0 is heading, not where it is: L0 lags λ, and integrating today's error alone keeps
        # raising λ while L0 is already falling fast — the wind-up that overshoots into a collapse.
        heading = measured + self.horizon * self.state[3]
        self.state[0] += self.gain * (heading - self.target_at(progress)).clamp(-1.0, 1.0)

    def state_dict(self) -> Tensor:
        return self.state.clone()

    def load_state_dict(self, state: Tensor) -> None:
        self.state.copy_(state)
