"""The one interface every SAE architecture implements (the registry that maps names to classes is registry.py).

Notation follows MATH §1: x is a normalized activation row, f the sparse code, x̂ = f W_dec + b_dec.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from saeflow.sae.architectures.losses import warmup


class SAEConfig(BaseModel):
    """Hyperparameters shared by every architecture. Subclasses add their own and fix `architecture`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    architecture: str
    """Registered architecture name (see `sae.ARCHITECTURES`)."""
    name: str | None = None
    """Short label for this SAE inside a sweep; defaults to a name built from the architecture and its knobs."""
    expansion_factor: int = Field(8, ge=1)
    """Latents per input dimension: d_sae = expansion_factor · d_in (ignored when d_sae is set)."""
    d_sae: int | None = Field(None, ge=1)
    """Number of latents; overrides expansion_factor."""
    lr: float | None = Field(None, gt=0)
    """Adam learning rate; None takes the default rule 4e-3 · √(1024 / d_sae) (MATH §3.2): 4e-3 at 1024 latents,
    1.9e-3 at 4608, 1e-3 at 16384."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How b_dec starts (MATH §3.1)."""

    reference_lr: ClassVar[float] = 4e-3
    """Default Adam lr at d_sae = 1024; `learning_rate` scales it as 1/√d_sae (MATH §3.2)."""
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    coefficient_field: ClassVar[str | None] = None
    """Name of the sparsity coefficient a `target_l0` adapts (relu/gated/top-AFA: l1_coefficient, jumprelu:
    l0_coefficient); None for architectures whose sparsity is set directly (TopK's k)."""
    coefficient_start: ClassVar[float] = 1.0
    """Where a target-L0 controller starts λ unless the config sets the coefficient itself (MATH §3.5)."""
    revive_every_tenth: ClassVar[bool] = True
    """Revive every tenth of training (when shorter than the dead window; MATH §3.3), or False: once per dead
    window. The TopK family says False (TopKConfig says why)."""
    warmup_field: ClassVar[str | None] = None
    """Name of the field giving the coefficient's warm-up fraction (used when no target L0 is set)."""

    @property
    def l0_target(self) -> float | None:
        """The target L0 training steers to (MATH §3.5), when this architecture has one and it is set."""
        return getattr(self, "target_l0", None) if self.coefficient_field else None

    def n_latents(self, d_in: int) -> int:
        return self.d_sae or self.expansion_factor * d_in

    def label(self) -> str:
        """Stable human-readable label: the name if given, else architecture plus its sparsity knob."""
        if self.name:
            return self.name
        knob = self.sparsity_label()
        return f"{self.architecture}-x{self.expansion_factor if self.d_sae is None else self.d_sae}" + (
            f"-{knob}" if knob else ""
        )

    def sparsity_label(self) -> str:
        return ""

    def learning_rate(self, d_sae: int) -> float:
        """The configured lr, else the default rule (MATH §3.2): Gao et al.'s lr ∝ 1/√d_sae, anchored where the
        synthetic ground truth and the real-LM benchmark both train well in budgets of 10²–10⁴ steps."""
        return self.lr if self.lr is not None else self.reference_lr * math.sqrt(1024 / d_sae)


class SAEOutput(NamedTuple):
    """What a training forward pass returns; the trainer reads fields by name, never by position."""

    x_hat: Tensor
    """Reconstruction in normalized units, [B, d_in]."""
    f: Tensor
    """Sparse code, [B, d_sae] (dense tensor with zeros)."""
    loss: Tensor
    """Scalar total loss to minimise."""
    terms: dict[str, Tensor]
    """Named loss components (detached), for logging."""


class TrainState(NamedTuple):
    """What a loss may depend on beyond the batch: schedule position and dead-latent bookkeeping."""

    progress: float
    """Fraction of training done, in [0, 1]."""
    dead_mask: Tensor | None
    """Bool [d_sae], True where the latent has not fired within the dead window (MATH §3.3)."""
    coefficient: Tensor | None = None
    """The sparsity coefficient the L0 controller set for this step (MATH §3.5); None = the configured one."""
    total_steps: int | None = None
    """Optimizer steps of the whole run, for defaults that scale with its length; None = unknown."""


class SAE(nn.Module):
    """Base class: holds W_enc, b_enc, W_dec, b_dec and the input scale; subclasses define the activation and loss."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    unit_norm_decoder: bool = False
    """Decoder rows kept at unit norm (parallel gradients removed, rows renormalised after each step). A class
    default that an architecture may override per instance from its config (relu's `l1_form`, gated, jumprelu)."""
    input_scale: Tensor  # buffer: multiplies raw activations into the SAE's training units
    saelens_architecture: ClassVar[str | None] = None
    """The SAELens inference architecture this SAE exports as (`standard`, `topk`, `gated`, `jumprelu`); None
    when SAELens cannot represent it (then `saelens_unsupported` says why). storage/saelens.py does the export."""
    saelens_unsupported: ClassVar[str] = "it declares no SAELens architecture"

    def __init__(self, cfg: SAEConfig, d_in: int):
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.d_sae = cfg.n_latents(d_in)
        self.W_enc = nn.Parameter(torch.empty(d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        # Multiplies raw activations into the units the SAE was trained in (MATH §4.1); saved with the weights.
        self.register_buffer("input_scale", torch.ones(()))
        self.reset_parameters()

    # ----- initialisation -------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Decoder rows random unit vectors, encoder its transpose (MATH §2.4 init, used by every architecture)."""
        w = torch.randn(self.d_sae, self.d_in)
        w = w / w.norm(dim=1, keepdim=True)
        with torch.no_grad():
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)

    # ----- the interface ---------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """π(x) = (x − b_dec) W_enc + b_enc (MATH §1).

        Written as x W_enc − (b_dec W_enc − b_enc) so backward gets b_dec's gradient from a [d_sae] vector instead of
        a full [B, d_sae] × [d_sae, d_in] product: a sixth of a dense training step.
        """
        return x @ self.W_enc - (self.b_dec @ self.W_enc - self.b_enc)

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, f: Tensor) -> Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: Tensor, state: TrainState) -> SAEOutput:
        raise NotImplementedError

    def sparsity_coefficient(self, state: TrainState) -> Tensor | float:
        """λ for this step: the controller's when training to a target L0, else the configured coefficient
        ramped over its warm-up."""
        if state.coefficient is not None:
            return state.coefficient
        cfg, name = self.cfg, self.cfg.coefficient_field
        assert name is not None, f"{type(self).__name__} has no sparsity coefficient"
        return getattr(cfg, name) * warmup(state.progress, getattr(cfg, cfg.warmup_field) if cfg.warmup_field else 0.0)

    # ----- raw-unit helpers: what evaluation and downstream users call -------------------------------------
    def encode_raw(self, x_raw: Tensor) -> Tensor:
        """Codes of raw activations with any leading shape ([..., d_in] → [..., d_sae])."""
        rows = x_raw.reshape(-1, x_raw.shape[-1])
        return self.encode(rows * self.input_scale).reshape(*x_raw.shape[:-1], self.d_sae)

    def decode_raw(self, f: Tensor) -> Tensor:
        """Activations in the model's own units from codes of any leading shape ([..., d_sae] → [..., d_in]): the
        inverse of `encode_raw`, so `decode_raw(encode_raw(x)) == reconstruct_raw(x)`."""
        rows = f.reshape(-1, f.shape[-1])
        return (self.decode(rows) / self.input_scale).reshape(*f.shape[:-1], self.d_in)

    def reconstruct_raw(self, x_raw: Tensor) -> Tensor:
        """x̂ in the model's own units: normalise, encode, decode, undo the scale. Any leading shape; rows are
        encoded independently (architectures such as top-AFA select per row of a 2-D batch)."""
        rows = x_raw.reshape(-1, x_raw.shape[-1])
        return (self.forward(rows * self.input_scale) / self.input_scale).reshape(x_raw.shape)

    def param_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups at base learning rate `lr` (MATH §3.2): one group; an architecture whose
        parameters need a different step (JumpReLU's thresholds) splits them off."""
        return [{"params": list(self.parameters()), "lr": lr}]

    # ----- data-dependent initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Called once before training, after b_dec is set, with a sample of training rows (MATH §3.1). The default
        does nothing; architectures trained to a target L0 place their thresholds here (`firing_quantile`)."""

    @torch.no_grad()
    def firing_quantile(self, values: Tensor, l0: float) -> Tensor:
        """Per latent, the value exceeded by a share l0 / d_sae of the sample's rows [n, d_sae] → [d_sae]: a
        threshold at which every latent fires at the same rate and the code starts at L0 ≈ l0."""
        n = values.shape[0]
        k = min(n, max(1, round(n * l0 / self.d_sae)))
        return values.float().topk(k, dim=0).values[-1]

    # ----- dead-latent revival (MATH §3.3) ---------------------------------------------------------------------
    def latent_dims(self) -> dict[str, int]:
        """Parameter name → the dimension that indexes latents, for every parameter with one entry per latent.
        Revival rewrites those slices (and their Adam moments); an architecture adds its own per-latent ones."""
        return {"W_enc": 1, "b_enc": 0, "W_dec": 0}

    def others(self, latents: Tensor) -> Tensor:
        """Bool [d_sae]: True for every latent not in `latents` (all of them when `latents` is every latent)."""
        rest = torch.ones(self.d_sae, dtype=torch.bool, device=latents.device)
        rest[latents] = False
        return rest if rest.any() else ~rest

    @torch.no_grad()
    def revive(self, latents: Tensor, directions: Tensor) -> None:
        """Point `latents` at unit `directions` [n, d_in]: each decoder row becomes its direction and each encoder
        column that direction at the alive latents' mean encoder norm, so the latent reads what it writes; every
        other per-latent parameter takes the alive latents' median (a typical bias, gate or threshold)."""
        alive = self.others(latents)
        self.W_dec[latents] = directions * self.W_dec[alive].norm(dim=1).mean()
        self.W_enc[:, latents] = directions.T * self.W_enc[:, alive].norm(dim=0).mean()
        params = dict(self.named_parameters())
        for name in self.latent_dims():
            if params[name].dim() == 1:  # biases, gates, thresholds; the 2-D weights were set above
                params[name][latents] = params[name][alive].median()

    # ----- hooks around the optimizer step ---------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component parallel to each decoder row (MATH §2.1 `unit_decoder`)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.W_dec.grad -= (self.W_dec.grad * w).sum(dim=1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
