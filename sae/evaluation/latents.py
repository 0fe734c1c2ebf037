"""Look at latents: top-activating token contexts collected in one streaming pass, rendered as self-contained HTML."""

from __future__ import annotations

import html
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from saeflow.sae.architectures.base import SAE
from saeflow.sae.lm.sites import run_to_sites

HIST_EDGES = torch.logspace(-3, 3, 31)  # activation histogram bins (normalized units), fixed so memory is bounded


def choose_latents(freqs: Tensor, n_random: int = 16, n_extreme: int = 4, seed: int = 0) -> list[int]:
    """The most frequent and the rarest live latents, plus a seeded random sample of live ones."""
    alive = torch.nonzero(freqs > 0).flatten()
    if len(alive) == 0:
        return []
    order = alive[torch.argsort(freqs[alive], descending=True)]
    picked = order[:n_extreme].tolist() + order[-n_extreme:].tolist()
    g = torch.Generator().manual_seed(seed)
    picked += alive[torch.randperm(len(alive), generator=g)[:n_random]].tolist()
    return list(dict.fromkeys(int(i) for i in picked))


class TopContexts:
    """Per chosen latent: the `top_m` largest activations with (window, position), and an activation histogram.

    Memory is O(latents × top_m) whatever the number of tokens streamed.
    """

    def __init__(self, latent_ids: list[int], top_m: int = 12):
        self.ids = torch.tensor(latent_ids, dtype=torch.long)
        self.top_m = top_m
        n = len(latent_ids)
        self.values = torch.full((n, top_m), -1.0)
        self.where = torch.full((n, top_m, 2), -1, dtype=torch.long)
        self.hist = torch.zeros(n, len(HIST_EDGES) + 1, dtype=torch.long)
        self.fired = torch.zeros(n, dtype=torch.long)
        self.rows = 0

    @torch.no_grad()
    def update(self, f: Tensor, window_ids: Tensor, positions: Tensor) -> None:
        """f: [rows, d_sae] codes; window_ids/positions: [rows] where each row came from."""
        self.rows += f.shape[0]
        if len(self.ids) == 0:
            return
        a = f[:, self.ids.to(f.device)].float().cpu().T  # [latents, rows]
        self.fired += (a > 0).sum(1)
        self.hist += torch.stack(
            [torch.bincount(torch.bucketize(r[r > 0], HIST_EDGES), minlength=len(HIST_EDGES) + 1) for r in a]
        )
        loc = torch.stack([window_ids, positions], -1).cpu()  # [rows, 2]
        vals = torch.cat([self.values, a], 1)
        locs = torch.cat([self.where, loc.expand(len(a), -1, -1)], 1)
        top = vals.topk(self.top_m, dim=1)
        self.values = top.values
        self.where = torch.gather(locs, 1, top.indices[..., None].expand(-1, -1, 2))


@torch.inference_mode()
def collect_top_contexts_many(
    model: nn.Module,
    windows: Iterable[tuple[int, Tensor]],
    site: str,
    picks: dict[str, tuple[SAE, list[int]]],
    top_m: int = 12,
) -> dict[str, TopContexts]:
    """One streaming pass for several SAEs of a site: {label: (sae, latent ids)} → {label: TopContexts}.

    `windows` yields (first window index, ids [B, T]); the model runs only as deep as the site.
    """
    device = next(model.parameters()).device
    accs = {k: TopContexts(ids, top_m) for k, (_, ids) in picks.items()}
    for start, ids in windows:
        x = run_to_sites(model, ids.to(device), [site])[site][:, 1:]  # position 0 (BOS) never counted
        b, t, d = x.shape
        win = (torch.arange(b) + start).repeat_interleave(t)
        pos = torch.arange(1, t + 1).repeat(b)
        for k, (sae, _) in picks.items():
            accs[k].update(sae.encode_raw(x.reshape(-1, d).float()), win, pos)
    return accs


def collect_top_contexts(
    model: nn.Module, windows: Iterable[tuple[int, Tensor]], site: str, sae: SAE, latent_ids: list[int], top_m: int = 12
) -> TopContexts:
    """Stream (first window index, ids [B, T]) batches through the model (stopping at the site) and the SAE."""
    return collect_top_contexts_many(model, windows, site, {"sae": (sae, latent_ids)}, top_m)["sae"]


def windows_needed(acc: TopContexts) -> list[int]:
    """Window indices the report will show: read just these, not the whole eval split."""
    return sorted(
        {
            int(w)
            for w, v in zip(acc.where[..., 0].flatten().tolist(), acc.values.flatten().tolist())
            if w >= 0 and v > 0
        }
    )


def _svg_hist(counts: Tensor) -> str:
    top = max(int(counts.max()), 1)
    bars = "".join(
        f'<rect x="{i * 6}" y="{40 - 40 * int(c) / top:.1f}" width="5" height="{40 * int(c) / top:.1f}" '
        'fill="#4a7bd0"/>'
        for i, c in enumerate(counts)
    )
    return f'<svg width="{6 * len(counts)}" height="40" role="img" aria-label="activation histogram">{bars}</svg>'


def render_html(acc: TopContexts, token_windows, tokenizer, title: str, left: int = 12, right: int = 4) -> str:
    """Self-contained page: per latent its id, firing frequency, activation histogram (log bins 1e-3..1e3) and top
    contexts with the activating token highlighted.

    token_windows: indexable by window index (a [N, T] tensor, or a dict of the `windows_needed` rows).
    """
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;margin:24px;max-width:1100px}"
        ".lat{border-top:1px solid #ccc;padding:10px 0}.ctx{font-family:monospace;white-space:pre-wrap;margin:2px 0}"
        ".hit{background:#f5b041;font-weight:bold}.v{color:#666;display:inline-block;width:70px}"
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p>{acc.rows:,} tokens scanned; activations in the SAE's normalized units.</p>",
    ]
    for i, lat in enumerate(acc.ids.tolist()):
        freq = int(acc.fired[i]) / max(acc.rows, 1)
        parts.append(
            f"<div class='lat' id='latent-{lat}'><h3>latent {lat}</h3>"
            f"<p>firing frequency {freq:.3g} ({int(acc.fired[i])} tokens) {_svg_hist(acc.hist[i])}</p>"
        )
        for v, (w, p) in zip(acc.values[i].tolist(), acc.where[i].tolist()):
            if v <= 0 or w < 0:
                continue
            toks = token_windows[w].tolist()
            lo, hi = max(1, p - left), min(len(toks), p + right + 1)
            before = html.escape(tokenizer.decode(toks[lo:p]))
            hit = html.escape(tokenizer.decode(toks[p : p + 1]))
            after = html.escape(tokenizer.decode(toks[p + 1 : hi]))
            parts.append(
                f"<div class='ctx'><span class='v'>{v:.3f}</span>{before}<span class='hit'>{hit}</span>{after}</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)
