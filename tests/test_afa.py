"""Seed 2's AFA evaluation (MATH §5.1): the exact relation ‖f̃‖ = ‖z‖ for an orthonormal dictionary, the streamed
statistics against numpy, decoder geometry, and that the ZF and decoder-cosine figures really draw something."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeflow.sae import ReLUConfig, build_sae
from saeflow.sae.evaluation.afa import AFAAccumulator, decoder_cosines, decoder_geometry

D, N = 16, 6


def orthonormal_sae(scale: float = 1.0, bias: torch.Tensor | None = None):
    """ReLU SAE whose N decoder rows (in model units) are orthonormal, W_enc = W_decᵀ, b_enc = 0.

    With input scale c the normalized-unit rows are unit vectors Q and raw atoms are Q/c: x = c·z, f = relu((x −
    b_dec) W_enc) = c·a for z = Σ aᵢqᵢ + b (b ⟂ every qᵢ, b_dec = c·b), so f̃ = (a, ‖b‖) and ‖f̃‖ = ‖z‖.
    """
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    rows, rest = q.T[:N], q.T[N:]
    s = build_sae(ReLUConfig(d_sae=N), D)
    with torch.no_grad():
        s.W_dec.copy_(rows)
        s.W_enc.copy_(rows.T)
        s.b_enc.zero_()
        s.b_dec.copy_(scale * (bias if bias is not None else torch.zeros(D)))
        s.input_scale.fill_(scale)
    return s.eval(), rows, rest


def codes(n: int = 400) -> torch.Tensor:
    a = torch.rand(n, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    return a * (torch.rand(n, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64) < 0.5)


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_orthonormal_dictionary_with_nonnegative_codes_gives_eps_zero_and_norm_ratio_one(scale):
    sae, rows, _ = orthonormal_sae(scale)
    z = (codes() @ rows).float()
    acc = AFAAccumulator(sae)
    for i in range(0, len(z), 128):
        acc.update(z[i : i + 128])
    r = acc.result()
    assert r["afa_eps_lbo_q75"] < 1e-6 and r["afa_eps_lbo_median"] < 1e-6
    assert r["afa_norm_ratio_median"] == pytest.approx(1.0, abs=1e-6)
    zn, fn = acc.points()
    np.testing.assert_allclose(fn.numpy(), zn.numpy(), rtol=1e-5, atol=1e-6)


def test_decoder_bias_counts_as_one_always_on_atom():
    torch.manual_seed(5)
    _, rows, rest = orthonormal_sae()
    bias = rest[0] * 2.5  # orthogonal to every decoder row
    sae, _, _ = orthonormal_sae(0.5, bias)
    z = (codes() @ rows + bias).float()
    acc = AFAAccumulator(sae)
    acc.update(z)
    zn, fn = acc.points()
    np.testing.assert_allclose(fn.numpy(), zn.numpy(), rtol=1e-5)  # ‖z‖² = Σ aᵢ² + ‖b‖² = ‖f̃‖²
    assert acc.result()["afa_eps_lbo_median"] < 1e-6
    without_bias = (fn.double() ** 2 - 2.5**2).clamp_min(0).sqrt()
    assert not np.allclose(without_bias.numpy(), zn.numpy(), rtol=1e-3)  # leaving the bias atom out breaks it


def test_afa_statistics_match_numpy_on_a_random_sae():
    torch.manual_seed(6)
    sae = build_sae(ReLUConfig(d_sae=40), D)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1) + 0.5)
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.5)
        sae.input_scale.fill_(0.8)
    z = torch.randn(300, D) * 2
    acc = AFAAccumulator(sae, max_points=100)
    acc.update(z[:170])
    acc.update(z[170:])
    f = sae.encode_raw(z).detach().double().numpy()
    atoms = sae.W_dec.detach().double().numpy() / 0.8
    ft_sq = ((f * np.linalg.norm(atoms, axis=1)) ** 2).sum(1) + (np.linalg.norm(sae.b_dec.detach().numpy()) / 0.8) ** 2
    z_sq = (z.double().numpy() ** 2).sum(1)
    eps = np.abs(z_sq - ft_sq) / ((40 - 1) * ft_sq)
    r = acc.result()
    for name, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
        assert r[f"afa_eps_lbo_{name}"] == pytest.approx(np.quantile(eps, q), rel=1e-5)
    assert r["afa_norm_ratio_median"] == pytest.approx(np.median(np.sqrt(ft_sq / z_sq)), rel=1e-5)
    assert len(acc.points()[0]) == 100  # the plot keeps max_points, the statistics every row


def test_decoder_cosines_match_brute_force_and_orthonormal_rows_are_orthogonal():
    w = torch.randn(30, 8, generator=torch.Generator().manual_seed(7))
    wd = w.double().numpy()
    wn = wd / np.linalg.norm(wd, axis=1, keepdims=True)
    g = np.abs(wn @ wn.T)[np.triu_indices(30, 1)]
    np.testing.assert_allclose(np.sort(decoder_cosines(w).numpy()), np.sort(g), rtol=1e-12)
    geo = decoder_geometry(w)
    assert geo["decoder_cos_max"] == pytest.approx(g.max()) and geo["decoder_cos_mean"] == pytest.approx(g.mean())
    sampled = decoder_cosines(w, max_pairs=50)
    assert len(sampled) == 50 and (sampled < 1 - 1e-9).all()  # sampled pairs never pair a row with itself
    _, rows, _ = orthonormal_sae()
    assert decoder_geometry(rows)["decoder_cos_max"] < 1e-12


def test_zf_plot_and_decoder_cosine_histogram_draw_data():
    from saeflow.sae.evaluation.plots import decoder_cosine_histogram, zf_plot

    sae, rows, _ = orthonormal_sae()
    acc = AFAAccumulator(sae)
    acc.update((codes() @ rows).float())
    fig = zf_plot(*[t.numpy() for t in acc.points()], "zf")
    ax = fig.axes[0]
    assert len(ax.collections) == 1 and len(ax.collections[0].get_offsets()) == 400  # one point per token
    assert len(ax.lines) >= 4  # y = x and the AFA bands
    fig = decoder_cosine_histogram(decoder_cosines(torch.randn(50, 8)).numpy(), "cos")
    assert sum(p.get_height() for p in fig.axes[0].patches) == 50 * 49 // 2
