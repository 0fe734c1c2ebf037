"""Tokenize + extract on the tiny GPT-2: stored rows equal the model's own hidden states; resume is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from saeflow.storage.activations import open_activation_store
from saeflow.storage.tokens import read_windows
from saeflow.storage.zarr_io import open_group
from saeflow.tasks.common import activation_store_url
from saeflow.tasks.extract import extract_activations
from saeflow.tasks.tokenize import tokenize_dataset


def test_token_windows_start_with_bos_and_split_train_eval(make_config):
    cfg = make_config()
    ref = tokenize_dataset.fn(cfg)
    train, held_out = read_windows(ref, "train"), read_windows(ref, "eval")
    assert train.shape == (6144 // 32, 32) and held_out.shape == (512 // 32, 32)
    bos = open_group(ref.url, "r").attrs["config"]
    assert bos["context_size"] == 32
    assert (train[:, 0] == train[0, 0]).all() and (held_out[:, 0] == train[0, 0]).all()
    # Windows are consecutive text: no document token is repeated at a window boundary.
    assert not np.array_equal(train[0, 1:], train[1, 1:])


def test_stored_rows_equal_hidden_states_of_the_model(make_config, tiny_gpt2_dir):
    cfg = make_config(extract={"sites": ["resid_post.0", "resid_post.1", "mlp_out.1"], "batch_size": 16})
    tokens = tokenize_dataset.fn(cfg)
    acts = extract_activations.fn(cfg, tokens)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = torch.from_numpy(read_windows(tokens, "train").astype(np.int64))
    mlp = []
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: mlp.append(o))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    handle.remove()
    expected = {"resid_post.0": hs[1], "resid_post.1": hs[2], "mlp_out.1": mlp[0]}
    for site, h in expected.items():
        want = h[:, 1:].reshape(-1, h.shape[-1]).numpy()  # position 0 (BOS) is never stored
        got = acts.array(site)[:]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=site)
    arr = acts.array("resid_post.1")
    assert arr.attrs["site"] == "resid_post.1"
    assert arr.attrs["token_store"]["content_hash"] == tokens.content_hash
    assert arr.attrs["model"]["name"] == tiny_gpt2_dir
    assert len(arr.compressors) >= 1 and arr.chunks[1] == arr.shape[1]


class Interrupt(Exception):
    pass


def test_interrupted_extraction_resumes_to_identical_store(make_config, tmp_path):
    cfg = make_config(extract={"sites": ["resid_post.1", "mlp_out.2"], "chunk_rows": 256})
    tokens = tokenize_dataset.fn(cfg)
    seen = []

    def kill_after_third_commit(rows_done: int) -> None:
        seen.append(rows_done)
        if len(seen) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract_activations.fn(cfg, tokens, on_chunk=kill_after_third_commit)
    url, _ = activation_store_url(cfg, tokens)
    unfinished = dict(open_group(url, "r").attrs)
    assert unfinished["complete"] is False and unfinished["rows_done"] == seen[2]
    assert open_activation_store(url) is None  # an unfinished store is never mistaken for a finished one
    resumed_chunks = []
    acts = extract_activations.fn(cfg, tokens, on_chunk=resumed_chunks.append)
    # Resumed right after the last committed row: the first resumed batch (16 windows × 31 rows) lands next.
    assert resumed_chunks[0] == seen[2] + 16 * 31
    clean_cfg = cfg.model_copy(update={"store": str(tmp_path / "clean-store")})
    clean = extract_activations.fn(clean_cfg, tokenize_dataset.fn(clean_cfg))
    assert open_activation_store(acts.url) is not None
    for site in cfg.extract.sites:
        a, b = acts.array(site)[:], clean.array(site)[:]
        assert a.shape == b.shape == (acts.n_rows, acts.d_model)
        np.testing.assert_array_equal(a, b)
