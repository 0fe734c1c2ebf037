"""The promotion rule between a registered SAE's champion and a new challenger, as plain data and arithmetic.

Both sides must be scored on the same held-out tokens; the caller guarantees that (re-scoring the champion when the
eval set changed). The rule: the challenger is better on `metric` by at least `margin` (CE loss recovered higher,
FVU lower) at an L0 no more than `max_l0_factor` × the champion's.
"""

from __future__ import annotations

from dataclasses import dataclass

from saeflow.sae.evaluation.frontier import higher_is_better


def promotion_metric(configured: str, has_lm_head: bool) -> str:
    """`auto` → CE loss recovered for models with an LM head, FVU for the others."""
    if configured != "auto":
        return configured
    return "ce_loss_recovered" if has_lm_head else "fvu"


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    reason: str
    metric: str
    challenger_value: float
    challenger_l0: float
    champion_version: str | None = None
    champion_value: float | None = None
    champion_l0: float | None = None

    def tags(self) -> dict[str, str]:
        """The decision as model-version tags (`promotion.*`)."""
        out = {
            "promotion.decision": "promoted" if self.promoted else "rejected",
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.challenger_value": f"{self.challenger_value:.6g}",
            "promotion.challenger_l0": f"{self.challenger_l0:.6g}",
        }
        if self.champion_version is not None:
            out.update(
                {
                    "promotion.champion_version": self.champion_version,
                    "promotion.champion_value": f"{self.champion_value:.6g}",
                    "promotion.champion_l0": f"{self.champion_l0:.6g}",
                }
            )
        return out


def decide(
    metric: str,
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: str | None,
    margin: float,
    max_l0_factor: float,
) -> PromotionDecision:
    """Apply the rule to two metric dicts (each with `metric` and `l0`); no champion means the challenger wins."""
    value, l0 = float(challenger[metric]), float(challenger["l0"])
    if champion is None:
        return PromotionDecision(True, "first version of this model", metric, value, l0)
    best, best_l0 = float(champion[metric]), float(champion["l0"])
    gain = value - best if higher_is_better(metric) else best - value

    def decide(promote: bool, reason: str) -> PromotionDecision:
        return PromotionDecision(promote, reason, metric, value, l0, champion_version, best, best_l0)

    if l0 > max_l0_factor * best_l0:
        return decide(False, f"L0 {l0:.4g} exceeds {max_l0_factor:g} x the champion's {best_l0:.4g}")
    if gain < margin:
        return decide(
            False, f"{metric} {value:.4g} vs champion {best:.4g}: gain {gain:+.4g} is below the margin {margin:g}"
        )
    return decide(
        True,
        f"{metric} {value:.4g} vs champion {best:.4g} (gain {gain:+.4g} >= {margin:g}) at "
        f"L0 {l0:.4g} <= {max_l0_factor:g} x {best_l0:.4g}",
    )
