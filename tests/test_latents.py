"""The latent report (sae/evaluation/latents.py): streamed top contexts equal a brute-force top-k over every
token, the choice of latents covers the most frequent and rarest live ones, and the HTML highlights the
activating token."""

from __future__ import annotations

import html

import pytest
import torch

from saeflow.sae import ReLUConfig, build_sae
from saeflow.sae.evaluation.latents import (
    TopContexts,
    choose_latents,
    collect_top_contexts,
    render_html,
    windows_needed,
)
from saeflow.sae.lm.models import load_model
from saeflow.sae.lm.sites import run_to_sites

SITE = "resid_post.1"


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir):
    lm = load_model(tiny_gpt2_dir, device="cpu")
    torch.manual_seed(0)
    sae = build_sae(ReLUConfig(d_sae=48), lm.model.config.n_embd)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-1.0)  # sparse codes: about a fifth of the latents fire per token
        sae.input_scale.fill_(4.0)
    windows = torch.randint(0, lm.tokenizer.vocab_size, (10, 12), generator=torch.Generator().manual_seed(1))
    return lm, sae.eval(), windows


def brute_force(lm, sae, windows, latents, top_m):
    x = run_to_sites(lm.model, windows, [SITE])[SITE][:, 1:]
    f = sae.encode_raw(x.reshape(-1, x.shape[-1])).detach().reshape(x.shape[0], x.shape[1], -1)
    out = {}
    for lat in latents:
        a = f[..., lat].flatten()
        top = a.topk(top_m)
        t = x.shape[1]
        out[lat] = [(float(v), int(i) // t, int(i) % t + 1) for v, i in zip(top.values, top.indices) if v > 0]
    return out, f


def test_streamed_top_contexts_equal_brute_force(setup):
    lm, sae, windows = setup
    latents = list(range(0, 48, 3))
    batches = [(i, windows[i : i + 3]) for i in range(0, len(windows), 3)]  # uneven last batch
    acc = collect_top_contexts(lm.model, batches, SITE, sae, latents, top_m=5)
    want, f = brute_force(lm, sae, windows, latents, 5)
    assert acc.rows == 10 * 11 and acc.values.shape == (len(latents), 5)  # memory: latents × top_m, any stream
    for row, lat in enumerate(latents):
        got = [(v, w, p) for v, (w, p) in zip(acc.values[row].tolist(), acc.where[row].tolist()) if v > 0]
        assert [(w, p) for _, w, p in got] == [(w, p) for _, w, p in want[lat]]
        assert [v for v, _, _ in got] == pytest.approx([v for v, _, _ in want[lat]], rel=1e-6)
        assert int(acc.fired[row]) == int((f[..., lat] > 0).sum())


def test_choose_latents_takes_extremes_and_a_sample_of_live_ones_only():
    freqs = torch.tensor([0.0, 0.5, 0.01, 0.2, 0.0, 0.001, 0.3, 0.05])
    picked = choose_latents(freqs, n_random=2, n_extreme=1, seed=0)
    assert picked[:2] == [1, 5]  # most frequent, rarest live
    assert len(picked) == len(set(picked)) <= 4 and all(freqs[i] > 0 for i in picked)
    assert choose_latents(torch.zeros(5)) == []


def test_html_highlights_the_activating_token(setup):
    lm, sae, windows = setup
    _, f = brute_force(lm, sae, windows, [0], 1)
    lat = int((f > 0).sum((0, 1)).argmax())  # the most frequent latent: it has all 3 top contexts
    want, _ = brute_force(lm, sae, windows, [lat], 3)
    want = {7: want[lat]}
    acc = collect_top_contexts(lm.model, [(0, windows)], SITE, sae, [lat], top_m=3)
    rows = {w: windows[w] for w in windows_needed(acc)}
    assert set(rows) == {w for _, w, _ in want[7]}
    page = render_html(acc, rows, lm.tokenizer, "report <test>")
    _, w, p = want[7][0]
    hit = html.escape(lm.tokenizer.decode(windows[w, p : p + 1].tolist()))
    assert f"<span class='hit'>{hit}</span>" in page
    assert len(want[7]) == 3 and f"latent {lat}" in page and "report &lt;test&gt;" in page
    assert page.count("class='ctx'") == len(want[7])


def test_top_contexts_with_no_latents_only_counts_rows():
    acc = TopContexts([], top_m=3)
    acc.update(torch.rand(5, 4), torch.zeros(5, dtype=torch.long), torch.arange(5))
    assert acc.rows == 5
