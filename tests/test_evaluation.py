"""Downstream evaluation identities on the tiny GPT-2: identity SAE ⇒ CE recovered 1, zero SAE ⇒ 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae import ReLUConfig, build_sae
from sae.evaluation import evaluate_site
from sae.metrics import ReconstructionMetrics
from sae.models import load_model


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
    res = evaluate_site(lm.model, batches, site, {"id": identity_sae(d), "zero": zero_sae(d)}, True,
                        mean_activation=mean, progress=False)
    ident, zero = res["id"], res["zero"]
    assert ident["ce_loss_recovered"] == 1.0
    assert ident["ce_loss_spliced"] == ident["ce_loss_clean"]
    assert ident["kl_div"] == 0.0
    assert ident["fvu"] == 0.0 and ident["mse"] == 0.0
    assert ident["shrinkage_gamma"] == pytest.approx(1.0, abs=1e-12)
    assert zero["ce_loss_recovered"] == 0.0
    assert zero["ce_loss_spliced"] == zero["ce_loss_zero_ablation"]
    assert ident["ce_loss_zero_ablation"] != ident["ce_loss_clean"]  # the ablation really changed something
    assert "ce_loss_recovered_mean" in ident and ident["ce_loss_recovered_mean"] == 1.0


def test_reconstruction_metrics_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 16)) + 2
    x_hat = x + rng.normal(scale=0.3, size=x.shape)
    f = np.maximum(rng.normal(size=(500, 40)), 0)
    b = rng.normal(size=16)
    acc = ReconstructionMetrics(40)
    for i in range(0, 500, 128):  # streamed in uneven batches
        sl = slice(i, i + 128)
        acc.update(torch.tensor(x[sl]), torch.tensor(x_hat[sl]), torch.tensor(f[sl]), torch.tensor(b))
    m = acc.result()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert m["fvu"] == pytest.approx(fvu, rel=1e-10)
    assert m["mse"] == pytest.approx(((x - x_hat) ** 2).sum(1).mean(), rel=1e-12)
    assert m["l0"] == pytest.approx((f > 0).sum(1).mean(), rel=1e-12)
    freq = (f > 0).mean(0)
    assert m["dead_fraction"] == pytest.approx((freq == 0).mean()) and m["dense_fraction"] == pytest.approx((freq > 0.1).mean())
    xc, xh = x - b, x_hat - b
    assert m["shrinkage_gamma"] == pytest.approx((xh**2).sum() / (xh * xc).sum(), rel=1e-10)


def test_predicting_the_mean_gives_fvu_one():
    x = torch.randn(300, 8, dtype=torch.float64)
    acc = ReconstructionMetrics(4)
    acc.update(x, x.mean(0).expand_as(x), torch.zeros(300, 4))
    assert acc.result()["fvu"] == pytest.approx(1.0, rel=1e-12)
