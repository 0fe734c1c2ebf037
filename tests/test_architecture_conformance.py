"""Every registered architecture, through the same checks: builds from its config, trains a few steps (loss falls),
saves and loads bit-exactly, exports to SAELens and back where supported (refused with a reason where not), and
splices into a model. A new architecture is covered by registering it; a duplicate name is refused."""

from __future__ import annotations

import re

import pytest
import torch

from saeflow.sae.architectures.base import SAE
from saeflow.sae.architectures.registry import ARCHITECTURES, build_sae, register
from saeflow.sae.lm.sites import splice_site
from saeflow.sae.training import TrainingConfig, train_saes
from saeflow.storage.checkpoints import load_sae, save_sae
from saeflow.storage.saelens import EXPORT_ARCHITECTURE, SAELensFormatError, export_saelens, import_saelens

D_IN = 32


def trained(arch: str) -> tuple[SAE, list[float]]:
    torch.manual_seed(0)
    sae = build_sae({"architecture": arch, "expansion_factor": 4}, D_IN)
    basis = torch.randn(64, D_IN)
    gen = torch.Generator().manual_seed(1)

    def batches():
        while True:  # sparse combinations of 64 directions: something an SAE can learn in a few steps
            codes = torch.relu(torch.randn(256, 64, generator=gen) - 1.5)
            yield codes @ basis

    losses: list[float] = []
    train_saes(
        [sae],
        batches(),
        TrainingConfig(batch_size=256, log_every=1, lr_warmup=0.0),
        256 * 60,
        on_step=lambda step, tokens, m: losses.append(m[0]["loss"]),
        progress=False,
    )
    return sae.eval(), losses


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_conforms(arch, tmp_path, tiny_gpt2_dir):
    sae, losses = trained(arch)
    assert sae.cfg.architecture == arch and sae.d_in == D_IN and sae.d_sae == 4 * D_IN
    assert len(losses) > 10 and sum(losses[-5:]) < sum(losses[:5]), losses
    x = torch.randn(50, D_IN) * 2
    with torch.no_grad():
        codes, recon = sae.encode_raw(x), sae.reconstruct_raw(x)
    assert codes.shape == (50, 4 * D_IN) and recon.shape == x.shape and (codes >= 0).all()

    back = load_sae(save_sae(sae, str(tmp_path / "ckpt"), {"site": "resid_post.1"}))
    assert type(back) is type(sae) and back.cfg == sae.cfg
    for (k, a), (k2, b) in zip(sae.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k

    if arch in EXPORT_ARCHITECTURE:
        again = import_saelens(export_saelens(sae, str(tmp_path / "saelens"), hook_name="blocks.1.hook_resid_post"))
        with torch.no_grad():
            torch.testing.assert_close(again.reconstruct_raw(x), recon, atol=1e-4, rtol=1e-4)
    else:
        with pytest.raises(SAELensFormatError, match=f"cannot export a '{arch}' SAE to SAELens: .+"):
            export_saelens(sae, str(tmp_path / "saelens"), hook_name="blocks.1.hook_resid_post")

    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    wide = build_sae({"architecture": arch, "expansion_factor": 2}, lm.config.n_embd).eval()
    ids = torch.randint(0, lm.config.vocab_size, (2, 16))
    seen = []

    def replace(h):
        seen.append(h.shape)
        return wide.reconstruct_raw(h)

    with torch.no_grad():
        clean = lm(ids).logits
        with splice_site(lm, "resid_post.1", replace):
            spliced = lm(ids).logits
    assert seen and seen[0][-1] == lm.config.n_embd
    assert spliced.shape == clean.shape and not torch.equal(spliced, clean)
    torch.testing.assert_close(spliced[:, 0], clean[:, 0])  # position 0 (BOS) is never spliced


def test_registering_a_taken_architecture_name_raises():
    with pytest.raises(
        ValueError,
        match=re.escape("SAE architecture 'topk' is already registered by saeflow.sae.architectures.topk.TopKSAE"),
    ):

        @register("topk")
        class Impostor(SAE):
            pass

    assert ARCHITECTURES["topk"].__name__ == "TopKSAE"
