"""Shared fixtures: a tiny GPT-2-style model + tokenizer saved to disk and loaded through `from_pretrained`,
a real Prefect server (test harness), and pipeline configs pointing at temporary stores."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

import saeflow  # noqa: F401


def _train_tokenizer(texts: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> str:
    """A 3-block GPT-2 (d_model 64) and a 512-token BPE tokenizer, written with save_pretrained."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from saeflow.storage.text import python_docs_texts

    d = str(tmp_path_factory.mktemp("tiny-gpt2"))
    texts = [row["text"] for _, row in zip(range(300), python_docs_texts())]
    tok = _train_tokenizer(texts)
    tok.save_pretrained(d)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=64,
        n_layer=3,
        n_head=4,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def prefect_server():
    """A real (temporary, SQLite-backed) Prefect server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def tiny_config(root: str, model_dir: str, **overrides):
    """Pipeline config on the tiny model: 2 sites, 2 SAEs, a few thousand tokens."""
    from saeflow.config import validate_config

    data = {
        "name": "test",
        "root": root,
        "model": {"name": model_dir},
        "dataset": {"source": "python-docs"},
        "tokens": {"context_size": 32, "train_tokens": 6144, "eval_tokens": 512},
        "extract": {"sites": ["resid_post.1", "mlp_out.2"], "batch_size": 16},
        "stats": {"n_workers": 2},
        "saes": [
            {"architecture": "topk", "k": 8, "expansion_factor": 4},
            {"architecture": "relu", "l1_coefficient": 1.0, "expansion_factor": 4},
        ],
        "train": {"batch_size": 256, "log_every": 2},
        "eval": {"batch_size": 8},
    }
    for k, v in overrides.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return validate_config(data)


@pytest.fixture
def make_config(tmp_path, tiny_gpt2_dir):
    def make(**overrides):
        return tiny_config(str(tmp_path / "work"), tiny_gpt2_dir, **overrides)

    return make
