"""Evaluate SAEs at one site of a model on held-out token windows: reconstruction, downstream CE or pooled cosine
(MATH §5), and seed 2's AFA measures (MATH §5.1).

Passes over the eval windows: (1) only when mean ablation needs it and no mean is given, the forward pass up to the
site, to take the eval-set mean; (2) the full model, clean, with the site zero-/mean-ablated and spliced with each
SAE's reconstruction.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saeflow.sae.architectures.base import SAE
from saeflow.sae.evaluation.afa import AFAAccumulator, decoder_cosines, decoder_geometry
from saeflow.sae.evaluation.metrics import (
    ReconstructionMetrics,
    ce_loss_recovered,
    cosine_recovered,
    kl_sum,
    next_token_ce_sum,
    pooled_cosine_sum,
)
from saeflow.sae.lm.sites import capture_sites, run_to_sites, splice_site

POSITIONS_NOTE = (
    "CE/KL over every next-token prediction of each eval window (encoder models: cosine of the final hidden state "
    "mean-pooled over all positions); the site is spliced at positions 1..T-1, position 0 (BOS) is never spliced; "
    "reconstruction and AFA metrics use positions 1..T-1, outlier rows excluded; mean ablation uses the eval-set mean "
    "of positions 1..T-1"
)


class SAEEvaluation(NamedTuple):
    """Everything evaluation measures for one SAE."""

    metrics: dict[str, float]
    """Scalar metrics (MATH §5, §5.1), reconstruction ones in the SAE's normalized units unless named `_raw`."""
    firing_frequency: Tensor
    """pᵢ of every latent over the eval rows, float64 [d_sae]."""
    l0_histogram: Tensor
    """Rows with exactly k active latents, k = 0..d_sae."""
    afa: AFAAccumulator | None
    """‖z‖/‖f̃‖ points and ε_LBO values, when AFA was asked for."""
    decoder_cosines: Tensor
    """|cos| of a fixed sample of decoder-row pairs (`afa.decoder_cosines`): the geometry metrics' sample."""

    def record(self, site: str, n_eval_windows: int, context_size: int) -> dict[str, Any]:
        """The evaluation as one JSON document (`eval/metrics.json`): metrics, positions used, the L0 histogram."""
        hist = self.l0_histogram.tolist()
        while len(hist) > 1 and hist[-1] == 0:
            hist.pop()
        return {
            "site": site,
            "metrics": self.metrics,
            "positions": POSITIONS_NOTE,
            "eval_windows": n_eval_windows,
            "context_size": context_size,
            "l0_histogram": [int(c) for c in hist],
        }

    def figures(self, title: str) -> dict[str, Any]:
        """Artifact path → matplotlib figure: feature density, decoder cosines, and the z–f plot with AFA."""
        from saeflow.sae.evaluation.plots import decoder_cosine_histogram, feature_density, zf_plot

        figs = {
            "plots/feature_density.png": feature_density(self.firing_frequency.numpy(), title),
            "plots/decoder_cosines.png": decoder_cosine_histogram(self.decoder_cosines.numpy(), title),
        }
        if self.afa is not None:
            z, f = self.afa.points()
            figs["plots/zf.png"] = zf_plot(z.numpy(), f.numpy(), title)
        return figs


@torch.inference_mode()
def eval_set_mean(model: nn.Module, token_batches: Iterable[Tensor], site: str) -> Tensor:
    """Mean raw activation of `site` over positions 1..T-1 of every eval window (MATH §5's mean ablation), float32."""
    device = next(model.parameters()).device
    total: Tensor | None = None
    n = 0
    for ids in token_batches:
        x = run_to_sites(model, ids.to(device), [site])[site][:, 1:]
        s = x.double().sum((0, 1))
        total = s if total is None else total + s
        n += x.shape[0] * x.shape[1]
    if total is None:
        raise ValueError(f"no eval windows to take the mean activation of {site!r} over")
    return (total / max(n, 1)).float()


def _expand(mean: Tensor, h: Tensor) -> Tensor:
    """Mean ablation: the eval-set mean activation at every position."""
    return mean.expand_as(h)


def _reconstruct(sae: SAE, h: Tensor) -> Tensor:
    """What a spliced SAE puts in place of the site's activation: its reconstruction, in raw units."""
    return sae.reconstruct_raw(h.float())


def _hidden_states(out) -> Tensor:
    """Final hidden states [B, T, d] of an encoder model's output."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


class _DownstreamSums:
    """Running sums of the spliced forward passes: CE (LMs) or pooled cosine (encoders) per variant, KL per SAE."""

    def __init__(self, labels: Iterable[str], has_lm_head: bool):
        labels = list(labels)
        self.has_lm_head, self.labels = has_lm_head, set(labels)
        self.sums = {"clean": 0.0, "zero": 0.0, "mean": 0.0, **dict.fromkeys(labels, 0.0)}
        self.kl = dict.fromkeys(self.sums, 0.0)
        self.n = 0  # predicted tokens (LMs) or pooled windows (encoders)

    def update(
        self, model: nn.Module, site: str, ids: Tensor, clean: Tensor, variants: dict[str, Callable[[Tensor], Tensor]]
    ) -> None:
        """One batch: the clean output is given; each variant's replacement of the site is spliced in turn."""
        if self.has_lm_head:
            s_, n = next_token_ce_sum(clean, ids)
            self.sums["clean"] += s_
            self.n += n
        else:
            self.n += ids.shape[0]
        for name, fn in variants.items():
            with splice_site(model, site, fn):
                out = model(input_ids=ids)
            if self.has_lm_head:
                self.sums[name] += next_token_ce_sum(out.logits, ids)[0]
                if name in self.labels:
                    self.kl[name] += kl_sum(clean, out.logits)
            else:
                self.sums[name] += pooled_cosine_sum(clean, _hidden_states(out))

    def metrics(self, label: str, with_mean: bool) -> dict[str, float]:
        """CE/KL and CE recovered (MATH §5) for LMs, pooled cosine recovered for encoders; {} with no batches."""
        if not self.n:
            return {}
        down, n = self.sums, self.n
        if not self.has_lm_head:
            cos_sae, cos_zero = down[label] / n, down["zero"] / n
            return {
                "pooled_cos_spliced": cos_sae,
                "pooled_cos_zero_ablation": cos_zero,
                "pooled_cos_recovered": cosine_recovered(cos_sae, cos_zero),
            }
        clean_ce, spliced, zero = down["clean"] / n, down[label] / n, down["zero"] / n
        m = {
            "ce_loss_clean": clean_ce,
            "ce_loss_spliced": spliced,
            "ce_loss_zero_ablation": zero,
            "ce_loss_recovered": ce_loss_recovered(clean_ce, spliced, zero),
            "delta_ce": spliced - clean_ce,
            "kl_div": self.kl[label] / n,
        }
        if with_mean:
            mean_ce = down["mean"] / n
            m.update(
                ce_loss_mean_ablation=mean_ce, ce_loss_recovered_mean=ce_loss_recovered(clean_ce, spliced, mean_ce)
            )
        return m


def _variants(saes: dict[str, SAE], mean_activation: Tensor | None) -> dict[str, Callable[[Tensor], Tensor]]:
    """What is spliced in: zero ablation, mean ablation (when a mean is given), each SAE's reconstruction."""
    fns: dict[str, Callable[[Tensor], Tensor]] = {"zero": lambda h: torch.zeros_like(h)}
    if mean_activation is not None:
        fns["mean"] = functools.partial(_expand, mean_activation)
    return {**fns, **{k: functools.partial(_reconstruct, s) for k, s in saes.items()}}


@torch.inference_mode()
def evaluate_saes(
    model: nn.Module,
    token_batches: Iterable[Tensor],
    site: str,
    saes: dict[str, SAE],
    has_lm_head: bool,
    *,
    downstream: bool = True,
    mean_activation: Tensor | None = None,
    outlier_norm: float | None = None,
    afa: bool = True,
    afa_points: int = 20_000,
    progress: bool = True,
) -> dict[str, SAEEvaluation]:
    """Return {sae label: SAEEvaluation}.

    downstream: splice the SAEs into the model: next-token CE, KL and CE recovered against zero and mean ablation
    for LMs; cosine of the mean-pooled final hidden state and its recovered ratio against zero ablation for encoder
    models. `mean_activation` (raw units) overrides the eval-set mean used for mean ablation. `outlier_norm` drops
    rows with a larger raw norm from the reconstruction and AFA metrics (MATH §4.2) while splicing covers every
    position.
    """
    device = next(model.parameters()).device
    batches = list(token_batches)
    if downstream and has_lm_head and mean_activation is None:
        mean_activation = eval_set_mean(model, batches, site)
    mean = mean_activation.to(device) if has_lm_head and mean_activation is not None else None
    rec = {k: ReconstructionMetrics(s.d_sae, float(s.input_scale)) for k, s in saes.items()}
    afas = {k: AFAAccumulator(s, afa_points) for k, s in saes.items()} if afa else {}
    down = _DownstreamSums(saes, has_lm_head)
    excluded = 0
    for ids in tqdm(batches, desc=f"evaluate {site}", unit="batch", disable=not progress):
        ids = ids.to(device)
        if downstream:
            with capture_sites(model, [site], stop_early=False) as cap:
                out = model(input_ids=ids)
            clean = out.logits if has_lm_head else _hidden_states(out)
        else:
            cap = run_to_sites(model, ids, [site])
        x_raw = cap[site][:, 1:].reshape(-1, cap[site].shape[-1]).float()
        keep = torch.ones(x_raw.shape[0], dtype=torch.bool, device=device)
        if outlier_norm is not None:
            keep = x_raw.norm(dim=-1) <= outlier_norm
            excluded += int((~keep).sum())
        for k, s in saes.items():
            x = x_raw[keep] * s.input_scale
            f = s.encode(x)
            rec[k].update(x, s.decode(f), f, s.b_dec)
            if afa:
                afas[k].update(x_raw[keep], f)
        if downstream:
            down.update(model, site, ids, clean, _variants(saes, mean))
    results: dict[str, SAEEvaluation] = {}
    for k, s in saes.items():
        m = {**rec[k].result(), "outlier_rows_excluded": float(excluded)}
        if downstream:
            m.update(down.metrics(k, with_mean=mean is not None))
        cosines = decoder_cosines(s.W_dec)
        if afa:
            m.update(afas[k].result())
            m.update(decoder_geometry(s.W_dec, cos=cosines))
        results[k] = SAEEvaluation(m, rec[k].firing_frequency(), rec[k].l0_hist.clone(), afas.get(k), cosines)
    return results


def evaluate_site(
    model: nn.Module,
    token_batches: Iterable[Tensor],
    site: str,
    saes: dict[str, SAE],
    has_lm_head: bool,
    mean_activation: Tensor | None = None,
    outlier_norm: float | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Scalar metrics only, {sae label: metrics}: `evaluate_saes` with CE (LMs only) and without AFA."""
    out = evaluate_saes(
        model,
        token_batches,
        site,
        saes,
        has_lm_head,
        downstream=has_lm_head,
        mean_activation=mean_activation,
        outlier_norm=outlier_norm,
        afa=False,
        progress=progress,
    )
    return {k: v.metrics for k, v in out.items()}
