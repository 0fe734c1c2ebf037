"""Load any HF transformers model and its tokenizer, from a Hub name, a local directory, or a GGUF file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from saeflow.sae.device import pick_device


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to change."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    has_lm_head: bool
    device: torch.device
    name: str


def _is_causal_lm(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    # No declared architecture (e.g. a GGUF-derived config): decoder-only model types have a causal LM class
    # and no masked-LM class; BERT-likes have both.
    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_model(
    name_or_path: str,
    gguf_file: str | None = None,
    dtype: str = "float32",
    device: str = "auto",
    revision: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer; causal LMs get their LM head (for CE evaluation), encoders load as bare models."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip("/").split("/", 1)[-1]
    path = os.path.expanduser(name_or_path)
    if looks_local and not os.path.isdir(path):
        raise ModelLoadError(
            f"model path {name_or_path!r} does not exist: set model.name to an existing directory or a Hub id"
        )
    if gguf_file and os.path.isdir(path) and not os.path.exists(os.path.join(path, gguf_file)):
        raise ModelLoadError(f"model.gguf_file {gguf_file!r} is not in {path!r}: name a .gguf file in that directory")
    # Any, not str: transformers 5.25 types from_pretrained's keyword arguments one by one.
    kw: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    if revision:
        kw["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(path, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        causal = _is_causal_lm(config)
        cls = AutoModelForCausalLM if causal else AutoModel
        model = cls.from_pretrained(path, dtype=getattr(torch, dtype), **kw)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model {name_or_path!r} ({str(e).splitlines()[0]}): give a local directory with config + "
            "weights, or a Hub id on a machine that reaches the Hub"
        ) from e
    dev = pick_device(device)
    model.to(dev)  # type: ignore[arg-type]  # transformers types .to() for its own dtype/device overloads
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, causal, dev, name_or_path)
