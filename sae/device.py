"""Where tensors go: one rule for the whole library (training, evaluation, the LM side)."""

from __future__ import annotations

import torch


def pick_device(device: str = "auto") -> torch.device:
    """`device` as given, or for "auto" the best available: cuda > mps > cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
