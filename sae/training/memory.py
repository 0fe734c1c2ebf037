"""Training memory: estimated from the configs alone, checked before anything is moved to the device."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from saeflow.sae.architectures.base import SAE, SAEConfig
from saeflow.sae.architectures.registry import build_sae
from saeflow.sae.device import pick_device

if TYPE_CHECKING:
    from saeflow.sae.training.trainer import TrainingConfig

ACTIVATION_COPIES = 6
"""[batch, d_sae] float tensors alive at once per SAE in a step: pre-acts, code, their gradients, masks, temporaries."""


class MemoryEstimate(NamedTuple):
    """Bytes a training group needs (fp32 throughout), from configs alone."""

    per_sae: list[tuple[str, int]]
    """(label, bytes) per SAE: parameters, gradients, Adam's two moments, one batch's activations, dead counters."""
    buffer: int
    """Host bytes the batch stream holds (chunks pooled for shuffling)."""

    @property
    def saes(self) -> int:
        return sum(b for _, b in self.per_sae)

    @property
    def total(self) -> int:
        return self.saes + self.buffer


def estimate_training_memory(
    specs: Sequence[SAEConfig], d_in: int, batch_size: int, buffer_bytes: int = 0
) -> MemoryEstimate:
    """Bytes to train `specs` side by side on batches of `batch_size` rows of width d_in."""
    per_sae = []
    for spec in specs:
        d_sae = spec.n_latents(d_in)
        params = 2 * d_in * d_sae + d_sae + d_in
        floats = 4 * params + batch_size * (ACTIVATION_COPIES * d_sae + 4 * d_in)  # params, grads, Adam m and v
        per_sae.append((spec.label(), 4 * floats + 8 * d_sae))
    return MemoryEstimate(per_sae, buffer_bytes)


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def memory_report(est: MemoryEstimate) -> str:
    parts = [f"{label} {format_bytes(b)}" for label, b in est.per_sae]
    return " · ".join([*parts, f"batch buffer {format_bytes(est.buffer)}", f"total {format_bytes(est.total)}"])


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(free bytes, what they are) where training tensors live: free CUDA memory on a GPU, else available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"
    except (AttributeError, ValueError, OSError):
        return None


class TrainingMemoryError(RuntimeError):
    """A training group will not fit in memory; str() is one line naming the group, the numbers and the fix."""


def check_training_memory(est: MemoryEstimate, device: torch.device, group: str, allocated: int = 0) -> None:
    """Fail before allocating anything when `est` exceeds the memory available on `device`.

    `allocated`: bytes of the estimate already held on `device` (e.g. SAE weights built before the check).
    """
    need = est.saes if device.type == "cuda" else est.total  # on a GPU the batch buffer stays in host RAM
    avail = available_memory(device)
    if avail is None or need - allocated <= avail[0]:
        return
    label, biggest = max(est.per_sae, key=lambda p: p[1])
    raise TrainingMemoryError(
        f"{group}: training needs about {format_bytes(need)} (largest SAE {label}: {format_bytes(biggest)}) but "
        f"only {format_bytes(avail[0])} is {avail[1]}; lower train.batch_size or the SAEs' expansion_factor/d_sae, "
        "or set train.group_by_site=false to train one SAE per task"
    )


def build_training_group(
    specs: Sequence[SAEConfig], d_in: int, cfg: TrainingConfig, scale: float, group: str, est: MemoryEstimate
) -> list[SAE]:
    """The group's SAEs, built only once `est` is known to fit (`TrainingMemoryError` otherwise, nothing built):
    seeded with `cfg.seed`, each with input scale `scale` (MATH §4.1)."""
    check_training_memory(est, pick_device(cfg.device), group)
    return build_saes(specs, d_in, cfg.seed, scale)


def build_saes(specs: Sequence[SAEConfig], d_in: int, seed: int = 0, input_scale: float = 1.0) -> list[SAE]:
    """The SAEs of `specs`, initialised from `seed` (one seed fixes the weights: build them with the seed of the
    `TrainingConfig` they will train with, as the pipeline does), each with `input_scale` (MATH §4.1; a notebook
    takes it from `fit_normalization(...).scale`)."""
    torch.manual_seed(seed)
    saes = [build_sae(spec, d_in) for spec in specs]
    for s in saes:
        s.input_scale.fill_(input_scale)
    return saes
