"""Site resolution, capture and splicing across model families (tiny random models, no weights needed)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from saeflow.sae.lm.sites import SiteError, capture_sites, parse_site, run_to_sites, site_module, splice_site

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 100,
}


def families():
    yield "gpt2", GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=32)), "mlp"
    yield "neox", GPTNeoXForCausalLM(GPTNeoXConfig(**SMALL, max_position_embeddings=32)), "mlp"
    yield "llama", LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, max_position_embeddings=32)), "mlp"
    yield (
        "gemma",
        GemmaForCausalLM(GemmaConfig(**SMALL, num_key_value_heads=2, head_dim=8, max_position_embeddings=32)),
        "mlp",
    )
    yield "bert", BertModel(BertConfig(**SMALL, max_position_embeddings=32)), "output.dense"


@pytest.mark.parametrize("family, model, mlp_path", list(families()), ids=lambda v: v if isinstance(v, str) else "")
def test_sites_resolve_and_capture_block_outputs(family, model, mlp_path):
    torch.manual_seed(0)
    model.eval()
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        acts = run_to_sites(model, ids, ["resid_post.0", "resid_post.1", "mlp_out.1"])
    # hidden_states[L + 1] is block L's output for every block but the last (which some models post-normalize).
    torch.testing.assert_close(acts["resid_post.0"], hs[1])
    torch.testing.assert_close(acts["resid_post.1"], hs[2])
    block = site_module(model, "resid_post.1")
    assert site_module(model, "mlp_out.1") is functools.reduce(getattr, mlp_path.split("."), block)
    assert acts["mlp_out.1"].shape == acts["resid_post.1"].shape


def test_run_to_sites_stops_after_the_deepest_site():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=32)).eval()
    ran = []
    model.transformer.h[2].register_forward_hook(lambda *a: ran.append(2))
    run_to_sites(model, torch.randint(0, 100, (1, 8)), ["resid_post.1"])
    assert ran == []
    with capture_sites(model, ["resid_post.1"], stop_early=False) as cap:
        model(input_ids=torch.randint(0, 100, (1, 8)))
    assert ran == [2] and "resid_post.1" in cap


def test_splice_replaces_every_position_but_bos():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=32)).eval()
    ids = torch.randint(0, 100, (2, 10))
    # The capture hook is registered after the splice hook (entered second), so it sees the spliced activation.
    with (
        torch.no_grad(),
        splice_site(model, "resid_post.0", lambda h: torch.zeros_like(h)),
        capture_sites(model, ["resid_post.0"], stop_early=False) as cap,
    ):
        model(input_ids=ids)
    assert cap["resid_post.0"][:, 1:].abs().max() == 0
    assert cap["resid_post.0"][:, 0].abs().max() > 0


@pytest.mark.parametrize("bad, msg", [("resid.3", "bad site"), ("resid_post.x", "bad site"), ("mlp_out", "bad site")])
def test_malformed_site_names(bad, msg):
    with pytest.raises(SiteError, match=msg):
        parse_site(bad)


def test_out_of_range_layer_names_the_valid_range():
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100, n_positions=32))
    with pytest.raises(SiteError, match=r"has 3 blocks, layers 0\.\.2"):
        site_module(model, "mlp_out.3")
