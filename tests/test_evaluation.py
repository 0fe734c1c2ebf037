"""Evaluation (MATH §5): exact identities on the tiny GPT-2 and a tiny BERT (identity SAE ⇒ FVU 0, cosine 1, γ 1,
CE/cosine recovered 1, KL 0; zero SAE ⇒ recovered 0; eval-mean SAE ⇒ FVU 1 and mean-ablation recovered 0), and every
streamed metric against a direct numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saeflow.sae import ReLUConfig, build_sae
from saeflow.sae.evaluation.evaluate import eval_set_mean, evaluate_saes, evaluate_site
from saeflow.sae.evaluation.metrics import ReconstructionMetrics, pooled_cosine_sum
from saeflow.sae.lm.models import load_model
from saeflow.sae.lm.sites import run_to_sites


def identity_sae(d: int):
    """ReLU SAE with W_enc = [I, −I], W_dec = [I; −I]: relu(x) − relu(−x) = x exactly."""
    s = build_sae(ReLUConfig(d_sae=2 * d, l1_form="unit_decoder"), d)
    eye = torch.eye(d)
    with torch.no_grad():
        s.W_enc.copy_(torch.cat([eye, -eye], 1))
        s.W_dec.copy_(torch.cat([eye, -eye], 0))
        s.b_enc.zero_()
        s.b_dec.zero_()
    return s.eval()


def zero_sae(d: int):
    s = identity_sae(d)
    with torch.no_grad():
        s.W_dec.zero_()
    return s


@pytest.fixture(scope="module")
def lm(tiny_gpt2_dir):
    return load_model(tiny_gpt2_dir, device="cpu")


@pytest.mark.parametrize("site", ["resid_post.1", "mlp_out.0"])
def test_identity_and_zero_reconstructions_give_ce_recovered_one_and_zero(lm, site):
    torch.manual_seed(0)
    batches = [torch.randint(0, lm.tokenizer.vocab_size, (4, 24)) for _ in range(2)]
    d = lm.model.config.n_embd
    mean = torch.randn(d)
    res = evaluate_site(
        lm.model,
        batches,
        site,
        {"id": identity_sae(d), "zero": zero_sae(d)},
        True,
        mean_activation=mean,
        progress=False,
    )
    ident, zero = res["id"], res["zero"]
    assert ident["ce_loss_recovered"] == 1.0
    assert ident["ce_loss_spliced"] == ident["ce_loss_clean"]
    assert ident["kl_div"] == 0.0
    assert ident["fvu"] == 0.0 and ident["mse"] == 0.0
    assert ident["shrinkage_gamma"] == pytest.approx(1.0, abs=1e-12)
    assert ident["cosine_sim"] == pytest.approx(1.0, abs=1e-12) and ident["explained_variance"] == 1.0
    assert zero["ce_loss_recovered"] == 0.0
    assert zero["ce_loss_spliced"] == zero["ce_loss_zero_ablation"]
    assert ident["ce_loss_zero_ablation"] != ident["ce_loss_clean"]  # the ablation really changed something
    assert "ce_loss_recovered_mean" in ident and ident["ce_loss_recovered_mean"] == 1.0


def test_reconstruction_metrics_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 16)) + 2
    x_hat = x + rng.normal(scale=0.3, size=x.shape)
    f = np.maximum(rng.normal(size=(500, 40)) - rng.uniform(0, 2, size=40), 0)  # latents of varied frequency
    f[:, :3] = 0  # three dead latents
    b = rng.normal(size=16)
    acc = ReconstructionMetrics(40, input_scale=0.25)
    for i in range(0, 500, 128):  # streamed in uneven batches
        sl = slice(i, i + 128)
        acc.update(torch.tensor(x[sl]), torch.tensor(x_hat[sl]), torch.tensor(f[sl]), torch.tensor(b))
    m = acc.result()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(fvu, rel=1e-10)
    assert m["mse"] == pytest.approx(((x - x_hat) ** 2).sum(1).mean(), rel=1e-12)
    assert m["l0"] == pytest.approx((f > 0).sum(1).mean(), rel=1e-12)
    freq = (f > 0).mean(0)
    assert m["dead_fraction"] == pytest.approx((freq == 0).mean()) and m["dense_fraction"] == pytest.approx(
        (freq > 0.1).mean()
    )
    xc, xh = x - b, x_hat - b
    assert m["shrinkage_gamma"] == pytest.approx((xh**2).sum() / (xh * xc).sum(), rel=1e-10)
    cos = (x * x_hat).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(x_hat, axis=1))
    assert m["cosine_sim"] == pytest.approx(cos.mean(), rel=1e-12)
    assert m["explained_variance"] == pytest.approx(1 - fvu, rel=1e-10)
    assert m["mse_raw"] == pytest.approx(((x / 0.25 - x_hat / 0.25) ** 2).sum(1).mean(), rel=1e-12)
    np.testing.assert_allclose(acc.firing_frequency().numpy(), freq, rtol=0, atol=0)
    l0 = (f > 0).sum(1)
    for q in (0.1, 0.5, 0.9):
        assert m[f"l0_q{round(q * 100):02d}"] == np.quantile(l0, q, method="inverted_cdf")
    assert m["l0_max"] == l0.max()
    np.testing.assert_array_equal(acc.l0_hist.numpy(), np.bincount(l0, minlength=41))


def test_predicting_the_mean_gives_fvu_one():
    x = torch.randn(300, 8, dtype=torch.float64)
    acc = ReconstructionMetrics(4)
    acc.update(x, x.mean(0).expand_as(x), torch.zeros(300, 4))
    assert acc.result()["fvu"] == pytest.approx(1.0, rel=1e-12)


def constant_sae(d: int, value: torch.Tensor):
    """x̂ = value for every input (W_dec = 0, b_dec = value)."""
    s = zero_sae(d)
    with torch.no_grad():
        s.b_dec.copy_(value)
    return s


def test_mean_ablation_uses_the_eval_set_mean(lm):
    torch.manual_seed(2)
    batches = [torch.randint(0, lm.tokenizer.vocab_size, (4, 20)) for _ in range(3)]
    site, d = "resid_post.1", lm.model.config.n_embd
    acts = torch.cat([run_to_sites(lm.model, b, [site])[site][:, 1:].reshape(-1, d) for b in batches]).double()
    mean = eval_set_mean(lm.model, batches, site)
    np.testing.assert_allclose(mean.numpy(), acts.mean(0).numpy(), rtol=1e-6, atol=1e-6)
    res = evaluate_saes(lm.model, batches, site, {"mean": constant_sae(d, mean)}, True, afa=False, progress=False)
    m = res["mean"].metrics
    assert m["ce_loss_spliced"] == m["ce_loss_mean_ablation"]  # splicing x̄ is mean ablation
    assert m["ce_loss_recovered_mean"] == 0.0
    assert m["fvu"] == pytest.approx(1.0, abs=1e-5)  # predicting the eval mean explains nothing


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BertModel (no LM head) written with save_pretrained and loaded back with AutoModel."""
    from transformers import AutoModel, BertConfig, BertModel

    d = str(tmp_path_factory.mktemp("tiny-bert"))
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(d)
    return AutoModel.from_pretrained(d).eval()


@pytest.mark.parametrize("site", ["resid_post.0", "mlp_out.1"])
def test_encoder_pooled_cosine_identity_recovers_one_and_zero_recovers_zero(tiny_bert, site):
    torch.manual_seed(3)
    batches = [torch.randint(0, 100, (3, 16)) for _ in range(2)]
    res = evaluate_saes(tiny_bert, batches, site, {"id": identity_sae(32), "zero": zero_sae(32)}, False, progress=False)
    ident, zero = res["id"].metrics, res["zero"].metrics
    assert "ce_loss_clean" not in ident
    assert ident["pooled_cos_spliced"] == pytest.approx(1.0, abs=1e-12)
    assert ident["pooled_cos_recovered"] == pytest.approx(1.0, abs=1e-9)
    assert zero["pooled_cos_recovered"] == 0.0
    assert ident["pooled_cos_zero_ablation"] < 1 - 1e-6  # zero ablation really moves the embedding
    assert ident["fvu"] == 0.0 and ident["cosine_sim"] == pytest.approx(1.0, abs=1e-12)


def test_pooled_cosine_matches_numpy():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 7, 6)), rng.normal(size=(5, 7, 6))
    pa, pb = a.mean(1), b.mean(1)
    want = ((pa * pb).sum(1) / (np.linalg.norm(pa, axis=1) * np.linalg.norm(pb, axis=1))).sum()
    assert pooled_cosine_sum(torch.tensor(a), torch.tensor(b)) == pytest.approx(want, rel=1e-12)


def test_feature_density_plot_draws_a_histogram_of_log_frequencies():
    from saeflow.sae.evaluation.plots import feature_density

    freqs = np.r_[np.zeros(5), np.logspace(-4, -1, 95)]
    fig = feature_density(freqs, "t")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert len(heights) == 50 and sum(heights) == 95  # every live latent counted once, dead ones left out
    assert "5 dead of 100" in ax.get_title()
