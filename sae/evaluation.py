"""Evaluate SAEs at one site of a model on held-out token windows: reconstruction and downstream CE (SPEC 5)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae.base import SAE
from sae.metrics import ReconstructionMetrics, ce_loss_recovered, kl_sum, next_token_ce_sum
from sae.sites import capture_sites, run_to_sites, splice_site

POSITIONS_NOTE = (
    "CE/KL over every next-token prediction of each eval window; the site is spliced at positions 1..T-1, "
    "position 0 (BOS) is never spliced; reconstruction metrics use positions 1..T-1, outlier rows excluded"
)


@torch.inference_mode()
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
    """Return {sae label: metrics}. Reconstruction metrics are in each SAE's normalized units.

    `mean_activation` (raw units) enables mean ablation; `outlier_norm` drops rows with a larger raw norm from the
    reconstruction metrics (SPEC 4.2) while CE still splices every position.
    """
    device = next(model.parameters()).device
    rec = {k: ReconstructionMetrics(s.d_sae) for k, s in saes.items()}
    ce = {"clean": 0.0, "zero": 0.0, "mean": 0.0, **{k: 0.0 for k in saes}}
    kl = {k: 0.0 for k in saes}
    n_pred = 0
    excluded = 0
    for ids in tqdm(list(token_batches), desc=f"eval {site}", disable=not progress):
        ids = ids.to(device)
        if has_lm_head:
            with capture_sites(model, [site], stop_early=False) as cap:
                logits = model(input_ids=ids).logits
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
        if not has_lm_head:
            continue
        s_, n = next_token_ce_sum(logits, ids)
        ce["clean"] += s_
        n_pred += n
        ablations = {"zero": lambda h: torch.zeros_like(h)}
        if mean_activation is not None:
            mean = mean_activation.to(device)
            ablations["mean"] = lambda h: mean.expand_as(h)
        for name, fn in ablations.items():
            with splice_site(model, site, fn):
                ce[name] += next_token_ce_sum(model(input_ids=ids).logits, ids)[0]
        for k, s in saes.items():
            with splice_site(model, site, lambda h, s=s: s.reconstruct_raw(h.float())):
                spliced = model(input_ids=ids).logits
            ce[k] += next_token_ce_sum(spliced, ids)[0]
            kl[k] += kl_sum(logits, spliced)
    results: dict[str, dict[str, float]] = {}
    for k in saes:
        m = rec[k].result()
        m["outlier_rows_excluded"] = float(excluded)
        if has_lm_head and n_pred:
            clean, spliced, zero = ce["clean"] / n_pred, ce[k] / n_pred, ce["zero"] / n_pred
            m.update(
                ce_loss_clean=clean,
                ce_loss_spliced=spliced,
                ce_loss_zero_ablation=zero,
                ce_loss_recovered=ce_loss_recovered(clean, spliced, zero),
                delta_ce=spliced - clean,
                kl_div=kl[k] / n_pred,
            )
            if mean_activation is not None:
                mean_ce = ce["mean"] / n_pred
                m.update(ce_loss_mean_ablation=mean_ce, ce_loss_recovered_mean=ce_loss_recovered(clean, spliced, mean_ce))
        results[k] = m
    return results
