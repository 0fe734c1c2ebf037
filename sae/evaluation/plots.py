"""Figures people look at: training curves, feature density, ZF plot, decoder cosines (matplotlib, Agg backend)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


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


def feature_density(freqs, title: str):
    """Histogram of log10 firing frequency per latent; dead latents counted in the title (they have no log)."""
    import numpy as np

    freqs = np.asarray(freqs, dtype=float)
    alive = freqs[freqs > 0]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    if len(alive):
        ax.hist(np.log10(alive), bins=50, color="tab:blue", alpha=0.85)
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{(freqs == 0).sum()} dead of {len(freqs)}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def zf_plot(z_norms, f_norms, title: str, eps_times_h: tuple[float, ...] = (0.25, 0.5, 1.0)):
    """Seed 2's ZF plot: ‖z‖ against ‖f̃‖ with y = x and the AFA bands y = x/√(1 ± c) (MATH §5.1)."""
    import numpy as np

    z, f = np.asarray(z_norms, float), np.asarray(f_norms, float)
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    ax.scatter(z, f, s=3, alpha=0.35, color="tab:blue", label="tokens", rasterized=True)
    lim = float(max(z.max(initial=1), f.max(initial=1))) * 1.05
    xs = np.linspace(0, lim, 50)
    ax.plot(xs, xs, color="black", lw=1, label="y = x (linear AFA)")
    for c, style in zip(eps_times_h, (":", "--", "-.")):
        ax.plot(xs, xs / np.sqrt(1 + c), color="tab:red", lw=0.8, ls=style, label=f"c = {c}")
        if c < 1:
            ax.plot(xs, xs / np.sqrt(1 - c), color="tab:red", lw=0.8, ls=style)
    ax.set_xlim(0, lim)
    ax.set_ylim(0, lim)
    ax.set_xlabel("‖z‖ (input norm)")
    ax.set_ylabel("‖f̃‖ (decoder-weighted code norm)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def decoder_cosine_histogram(cosines, title: str):
    """Histogram of |cos| between pairs of decoder rows (MATH §5 decoder geometry), log-count axis."""
    import numpy as np

    cos = np.asarray(cosines, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(cos, bins=60, range=(0.0, max(float(cos.max(initial=0)), 1e-3)), color="tab:green", alpha=0.85)
    ax.set_yscale("log")
    ax.set_xlabel("|cos| between decoder rows")
    ax.set_ylabel("pairs")
    ax.set_title(
        f"{title}\n{len(cos):,} pairs, max {cos.max(initial=0):.3f}, mean {cos.mean() if len(cos) else 0:.3f}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


_FRONTIER_LABELS = {
    "l0": "L0 (active latents per token)",
    "fvu": "FVU (fraction of variance unexplained)",
    "ce_loss_recovered": "CE loss recovered (zero ablation)",
}


def frontier(rows: list[dict], x: str, y: str, title: str):
    """Seed 1's Figure 1: one panel per site, `y` against `x` (log) per architecture. Each architecture's Pareto
    frontier (`saeflow.sae.evaluation.frontier.pareto_frontier`) is its one line; its dominated points are
    unconnected markers."""
    from saeflow.sae.evaluation.frontier import higher_is_better, pareto_frontier

    sites = sorted({r["site"] for r in rows})
    colors = {a: f"C{i}" for i, a in enumerate(sorted({r["architecture"] for r in rows}))}  # same in every panel
    fig, axes = plt.subplots(1, len(sites), figsize=(5 * len(sites), 3.8), squeeze=False)
    for ax, site in zip(axes[0], sites):
        for arch in sorted({r["architecture"] for r in rows if r["site"] == site}):
            pts = [
                (r[x], r[y])
                for r in rows
                if r["site"] == site and r["architecture"] == arch and r.get(x) is not None and r.get(y) is not None
            ]
            if not pts:
                continue
            front = pareto_frontier(pts, higher_is_better(y))
            color = colors[arch]
            ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", lw=1.4, color=color, label=arch)
            rest = [p for p in pts if p not in front]
            if rest:
                ax.scatter(
                    [p[0] for p in rest], [p[1] for p in rest], s=18, marker="o", facecolors="none", edgecolors=color
                )
        ax.set_xscale("log")
        ax.set_xlabel(_FRONTIER_LABELS.get(x, x))
        ax.set_ylabel(_FRONTIER_LABELS.get(y, y))
        ax.set_title(site)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
