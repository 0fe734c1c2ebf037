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


class DeviceError(ValueError):
    """A configured device this machine does not have; str() is one line naming the setting and the fix."""


def require_device(device: str, setting: str) -> None:
    """Fail with one line when `device` (a torch device string, or "auto") does not exist on this machine."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise DeviceError(
            f"{setting} {device!r} is not a torch device ({e}): use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            have = f"{n} CUDA device(s)" if n else "no CUDA device (or a CPU-only torch)"
            raise DeviceError(f"{setting} is {device!r} but this machine has {have}: set {setting}=auto or cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"{setting} is 'mps' but MPS is not available here: set {setting}=auto or cpu")
