"""Figures people look at: training curves (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history: list[dict[str, float]], title: str):
    """Loss, FVU, L0 and dead fraction against training tokens; `history` rows carry a `tokens` key."""
    keys = [k for k in ("loss", "fvu", "l0", "dead_fraction") if history and k in history[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    tokens = [h["tokens"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(tokens, [h[k] for h in history], lw=1.2)
        ax.set_xlabel("training tokens")
        ax.set_title(k)
        if k in ("loss", "fvu") and all(h[k] > 0 for h in history):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
