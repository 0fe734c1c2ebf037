"""Training loop for a group of SAEs fed by one stream of activation batches (MATH §3).

Several SAEs share each batch, so a sweep reads the activations once. Every SAE has its own Adam optimizer,
learning-rate schedule and dead-latent counters. `SAETrainer.state_dict()` is everything a resumed run needs
(MATH §3.4); writing it to disk is the storage layer's job.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from saeflow.sae.architectures.base import SAE, TrainState
from saeflow.sae.device import pick_device
from saeflow.sae.training.memory import check_training_memory, estimate_training_memory
from saeflow.sae.training.revival import revive_dead
from saeflow.sae.training.sparsity_control import L0Controller


class TrainingConfig(BaseModel):
    """Optimisation settings shared by every SAE trained on one batch stream."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    batch_size: int = Field(4096, ge=1)
    """Activation rows per optimizer step."""
    lr_warmup: float = Field(0.02, ge=0, le=1)
    """Fraction of steps over which the learning rate ramps linearly from 0 (MATH §3.2)."""
    lr_decay: float = Field(0.2, ge=0, le=1)
    """Fraction of steps at the end over which the learning rate decays linearly to 0."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip each SAE's gradient norm to this value; None disables clipping."""
    seed: int = 0
    """Seeds SAE initialisation and batch shuffling."""
    dead_tokens: int | None = Field(None, ge=1)
    """A latent is dead after this many tokens without firing; None = min(10M, total tokens / 4) (MATH §2.4)."""
    dead_report_tokens: int | None = Field(None, ge=1)
    """Window of the logged `dead_fraction`: latents that fired on none of the last this many training tokens
    (MATH §3.3). None = the dead window. The pipeline sets it to the evaluation's row count, so the number logged
    in training and `eval/dead_fraction` (never firing on that many held-out rows) measure the same thing."""
    revive_dead_until: float = Field(0.8, ge=0, le=1)
    """Until this fraction of training, each time another revival window of tokens has passed, latents silent for a
    whole window are re-pointed at the residual of poorly reconstructed rows (MATH §3.3, up to a quarter of a batch
    per SAE at a time); 0 turns revival off."""
    revive_window_tokens: int | None = Field(None, ge=1)
    """Revival window; None = the dead window (`dead_tokens`), but at most a tenth of the training tokens for
    relu, gated, JumpReLU and top-AFA (not the TopK family), so a latent that dies gets revived several times
    before revival stops (MATH §3.3). On the real-LM benchmark the tenth (40k tokens instead of 100k) took gated
    from 6.5% to 1.8% dead at the same CE recovered (benchmarks/README.md)."""
    log_every: int = Field(10, ge=1)
    """Report step metrics every this many steps."""
    device: str = "auto"
    """torch device for training: auto picks cuda > mps > cpu."""
    autocast: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Mixed precision on GPU; auto = bf16 on CUDA, off on CPU."""
    checkpoint_every_tokens: int | None = Field(None, ge=1)
    """Save a resumable training state every this many tokens (MATH §3.4); None saves none."""
    l0_control_gain: float | None = Field(None, gt=0, le=1)
    """Integral gain of the target-L0 controller: log λ moves by at most this much per step (MATH §3.5). None =
    max(0.01, 10 / steps): a run shorter than 1000 steps gets a faster controller, since L0 has to settle before the
    learning rate decays."""
    l0_control_horizon: float | None = Field(None, ge=0)
    """Steps ahead the target-L0 controller extrapolates the measured L0's trend before comparing (MATH §3.5). None
    = min(100, 8% of the steps)."""
    l0_control_ramp: float = Field(0.5, ge=0, le=1)
    """Fraction of training over which the controller's target glides from the first batch's L0 to target_l0."""


@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm (MATH §3.1): the point minimising the sum of Euclidean distances."""
    median = points.mean(0)
    for _ in range(iters):
        w = 1.0 / (points - median).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * points).sum(0) / w.sum()
        if (new - median).norm() < eps * median.norm().clamp_min(1.0):
            return new
        median = new
    return median


def lr_lambda(total_steps: int, warmup: float, decay: float) -> Callable[[int], float]:
    warm = max(1, int(warmup * total_steps)) if warmup > 0 else 0
    decay_start = int((1 - decay) * total_steps)

    def scale(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if step >= decay_start and decay > 0:
            return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
        return 1.0

    return scale


class NonFiniteLossError(ArithmeticError):
    """A loss became NaN/inf during training; str() is one line naming the group, the SAE, the step and a fix."""


class SAETrainer:
    """Steps a group of SAEs on shared batches; owns optimizers, schedulers and dead-latent counters."""

    def __init__(
        self, saes: list[SAE], cfg: TrainingConfig, total_tokens: int, group: str = "SAE group", buffer_bytes: int = 0
    ):
        self.saes = saes
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        est = estimate_training_memory([s.cfg for s in saes], saes[0].d_in, cfg.batch_size, buffer_bytes)
        built = sum(t.numel() * t.element_size() for s in saes for t in s.parameters() if t.device == self.device)
        self.group = group
        check_training_memory(est, self.device, group, allocated=built)
        self.total_steps = max(1, math.ceil(total_tokens / cfg.batch_size))
        self.dead_tokens = cfg.dead_tokens or max(cfg.batch_size, min(10_000_000, total_tokens // 4))
        self.step_count = 0
        self.tokens_seen = 0
        self.optimizers = []
        self.schedulers = []
        for sae in saes:
            sae.to(self.device)
            opt = torch.optim.Adam(sae.param_groups(sae.cfg.learning_rate(sae.d_sae)), betas=sae.cfg.adam_betas)
            self.optimizers.append(opt)
            self.schedulers.append(
                torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.total_steps, cfg.lr_warmup, cfg.lr_decay))
            )
        # Tokens since each latent last fired (MATH §3.3), counted in tokens, never steps.
        self.tokens_since_fired = [torch.zeros(s.d_sae, dtype=torch.long, device=self.device) for s in saes]
        # One L0 controller per SAE trained to a target L0 (MATH §3.5), None for the others.
        self.controllers = [self._controller(s) for s in saes]
        self.revived = [0 for _ in saes]  # latents revived so far, per SAE (logged as `revived_latents`)
        # Its own setting, not the report window: the pipeline sets that from the eval budget, and training must not
        # depend on how much is evaluated (a notebook run of the same TrainingConfig gives the same SAEs).
        tenth = min(self.dead_tokens, max(cfg.batch_size, total_tokens // 10))
        self.revive_windows = [
            cfg.revive_window_tokens or (tenth if s.cfg.revive_every_tenth else self.dead_tokens) for s in saes
        ]

    def _controller(self, sae: SAE) -> L0Controller | None:
        target, knob = sae.cfg.l0_target, sae.cfg.coefficient_field
        if target is None or knob is None:
            return None
        # A coefficient the user set is their guess of where λ ends; otherwise the architecture's own start (its
        # field default is tuned for fixed-coefficient training, and relu's 5 sank the real LM's L0 from 32 to 20
        # within 30 steps, which the controller then needed most of a 390-step run to undo).
        configured = float(getattr(sae.cfg, knob)) if knob in sae.cfg.model_fields_set else 0.0
        start = configured or sae.cfg.coefficient_start
        c, steps = self.cfg, self.total_steps
        # Short runs (the real-LM benchmark: 390 steps) need L0 to settle within a fraction of the run, not within a
        # fixed number of steps: gain 0.01 and horizon 100 left top-AFA at L0 45 for a target of 32 (MATH §3.5).
        gain = c.l0_control_gain or max(0.01, 10 / steps)
        horizon = c.l0_control_horizon if c.l0_control_horizon is not None else min(100.0, 0.08 * steps)
        return L0Controller(target, start, gain, c.l0_control_ramp, horizon, self.device)

    def autocast_dtype(self) -> torch.dtype | None:
        mode = self.cfg.autocast
        if self.device.type != "cuda" or mode == "off":
            return None
        return torch.float16 if mode == "fp16" else torch.bfloat16

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor) -> None:
        """b_dec from `sample` as each SAE's `b_dec_init` says, then each SAE's data-dependent init (MATH §3.1)."""
        sample = sample.to(self.device, torch.float32)
        median = None
        for sae in self.saes:
            how = sae.cfg.b_dec_init
            if how == "geometric_median":
                median = geometric_median(sample) if median is None else median
                sae.b_dec.copy_(median)
            elif how == "mean":
                sae.b_dec.copy_(sample.mean(0))
            sae.init_from_sample(sample)

    def step(self, x: Tensor) -> list[dict[str, float]]:
        """One optimizer step of every SAE on batch x; returns per-SAE metrics for this step."""
        x = x.to(self.device, torch.float32, non_blocking=True)
        progress = self.step_count / self.total_steps
        amp = self.autocast_dtype()
        # Revive once per revival window (MATH §3.3): a revived latent then has a whole window to fire before it can
        # count as silent again.
        reviving = progress < self.cfg.revive_dead_until
        revive = [
            reviving and (self.tokens_seen + x.shape[0]) // window > self.tokens_seen // window
            for window in self.revive_windows
        ]
        stats = []
        for i, sae in enumerate(self.saes):
            dead = self.tokens_since_fired[i] >= self.dead_tokens
            control = self.controllers[i]
            coefficient = control.coefficient() if control else None
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                out = sae.loss(x, TrainState(progress, dead, coefficient, self.total_steps))
            opt = self.optimizers[i]
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            sae.remove_parallel_grads()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), self.cfg.grad_clip)
            opt.step()
            self.schedulers[i].step()
            sae.normalize_decoder()
            with torch.no_grad():
                active = out.f > 0
                fired = active.any(0)
                self.tokens_since_fired[i] += x.shape[0]
                self.tokens_since_fired[i][fired] = 0
                if revive[i]:
                    silent = self.tokens_since_fired[i] >= self.revive_windows[i]
                    # τ is not reset: a revived latent counts as silent until it fires, so the logged dead fractions
                    # stay what held-out rows show, and one still silent a window later is revived again.
                    self.revived[i] += len(revive_dead(sae, opt, x, out.x_hat, silent))
                if control:
                    # An architecture that steers L0 itself within the step (JumpReLU's threshold tracking) reports
                    # the L0 it found before doing so: λ then absorbs what the tracking keeps correcting.
                    l0 = out.terms.get("controlled_l0")
                    control.update(active.sum(-1).float().mean() if l0 is None else l0, progress)
                # The last step reports too, so the last logged numbers (dead fraction above all) are the final ones.
                if self.step_count % self.cfg.log_every == 0 or self.step_count == self.total_steps - 1:
                    stats.append(self._metrics(x, out, i))
                    if coefficient is not None:
                        stats[-1]["sparsity_coefficient"] = float(coefficient)
                    if not math.isfinite(stats[-1]["loss"]):  # checked where the loss is read anyway: no extra sync
                        raise NonFiniteLossError(
                            f"{self.group}: {sae.cfg.label()}'s loss is {stats[-1]['loss']} at step {self.step_count} "
                            f"({self.tokens_seen:,} tokens); training stopped (lower the lr, or check the "
                            "activations for NaN/inf)"
                        )
                else:
                    stats.append({})
        self.step_count += 1
        self.tokens_seen += x.shape[0]
        return stats

    # ----- resume (MATH §3.4) ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit-for-bit: weights, optimizer and scheduler states,
        dead counters, step and token counts, torch RNG. Tensors are returned as they are (any device)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step_count": self.step_count,
            "tokens_seen": self.tokens_seen,
            "total_steps": self.total_steps,
            "dead_tokens": self.dead_tokens,
            "rng": rng,
            "saes": [
                {
                    "label": sae.cfg.label(),
                    "weights": sae.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "tokens_since_fired": since,
                    "revived": revived,
                    **({"l0_control": control.state_dict()} if control else {}),
                }
                for sae, opt, sched, since, control, revived in zip(
                    self.saes, self.optimizers, self.schedulers, self.tokens_since_fired, self.controllers, self.revived
                )
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of a trainer built with the same SAEs, config and token budget."""
        labels = [s["label"] for s in state["saes"]]
        mine = (self.total_steps, self.dead_tokens, [sae.cfg.label() for sae in self.saes])
        if (state["total_steps"], state["dead_tokens"], labels) != mine:
            raise ValueError(
                f"training state (steps {state['total_steps']}, dead window {state['dead_tokens']}, SAEs {labels}) "
                f"does not match this trainer (steps {mine[0]}, dead window {mine[1]}, SAEs {mine[2]})"
            )
        for i, (sae, s) in enumerate(zip(self.saes, state["saes"])):
            sae.load_state_dict(s["weights"])
            self.optimizers[i].load_state_dict(s["optimizer"])
            self.schedulers[i].load_state_dict(s["scheduler"])
            self.tokens_since_fired[i].copy_(s["tokens_since_fired"])
            self.revived[i] = int(s.get("revived", 0))  # states saved before revival existed have none
            if (control := self.controllers[i]) is not None:
                control.load_state_dict(s["l0_control"])
        self.step_count, self.tokens_seen = int(state["step_count"]), int(state["tokens_seen"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def _metrics(self, x: Tensor, out, i: int) -> dict[str, float]:
        err = (x - out.x_hat.float()).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        m: dict[str, float] = {
            "loss": float(out.loss),
            "fvu": float(err / var),
            "l0": float((out.f > 0).sum(-1).float().mean()),
            "dead_fraction": self.dead_fraction(i, self.cfg.dead_report_tokens or self.dead_tokens),
            "lr": float(self.schedulers[i].get_last_lr()[0]),
            "revived_latents": float(self.revived[i]),
        }
        if self.cfg.dead_report_tokens and self.cfg.dead_report_tokens != self.dead_tokens:
            m["auxk_dead_fraction"] = self.dead_fraction(i, self.dead_tokens)  # what AuxK treats as dead
        m.update({k: float(v) for k, v in out.terms.items()})
        return m

    def dead_fraction(self, i: int, window_tokens: int) -> float:
        """Share of SAE i's latents that fired on none of the last `window_tokens` training tokens; 0 until that
        many tokens were seen (a counter cannot tell "dead" from "not yet seen" earlier)."""
        if self.tokens_seen + self.cfg.batch_size < window_tokens:
            return 0.0
        return float((self.tokens_since_fired[i] >= window_tokens).float().mean())


StepCallback = Callable[[int, int, list[dict[str, float]]], None]
CheckpointCallback = Callable[[SAETrainer], None]


def train_saes(
    saes: list[SAE],
    batches: Iterable[Tensor],
    cfg: TrainingConfig,
    total_tokens: int,
    b_dec_sample: Tensor | None = None,
    on_step: StepCallback | None = None,
    progress: bool = True,
    resume_from: dict[str, Any] | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    group: str = "SAE group",
    buffer_bytes: int = 0,
) -> SAETrainer:
    """Train every SAE in `saes` on the same `batches` until `total_tokens` rows have been consumed.

    `on_step(step, tokens_seen, metrics)` is called after steps that report metrics (every `log_every`).
    `on_checkpoint(trainer)` is called each time `cfg.checkpoint_every_tokens` more tokens have been consumed;
    it saves `trainer.state_dict()` with the position of `batches`. `resume_from` is such a state: training continues
    from it (b_dec_sample is then ignored) and `batches` must continue from the matching position. Without
    `b_dec_sample`, each SAE's `b_dec_init` is applied to the first batch.
    Fails before training, naming `group`, when the estimated memory exceeds what is available.
    """
    torch.manual_seed(cfg.seed)
    trainer = SAETrainer(saes, cfg, total_tokens, group, buffer_bytes)
    stream = iter(batches)
    if resume_from is not None:
        trainer.load_state_dict(resume_from)
    elif b_dec_sample is not None:
        trainer.init_b_dec(b_dec_sample)
    else:
        # No sample given (a notebook): b_dec_init and the data-dependent inits are still honoured, from the first
        # batch, which is then trained on as usual. The pipeline passes `b_dec_sample_rows` rows of its own.
        first = next(stream, None)
        if first is not None:
            trainer.init_b_dec(first)
            stream = itertools.chain([first], stream)
    every = cfg.checkpoint_every_tokens
    bar = tqdm(
        total=total_tokens, initial=trainer.tokens_seen, unit="tok", unit_scale=True, desc="train", disable=not progress
    )
    while trainer.tokens_seen < total_tokens:
        x = next(stream, None)
        if x is None:  # a finite stream ran out
            break
        before = trainer.tokens_seen
        metrics = trainer.step(x)
        bar.update(x.shape[0])
        if on_step and metrics and metrics[0]:
            on_step(trainer.step_count, trainer.tokens_seen, metrics)
        crossed = every is not None and trainer.tokens_seen // every > before // every
        if on_checkpoint and crossed and trainer.tokens_seen < total_tokens:
            on_checkpoint(trainer)
    bar.close()
    for sae in saes:
        sae.eval()
    return trainer
