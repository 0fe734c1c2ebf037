"""Dead-latent revival (MATH §3.3): dead latents are re-pointed at residual directions of the batch, with fresh
Adam moments, and nothing else moves."""

from __future__ import annotations

import pytest
import torch

from saeflow.sae.architectures.registry import build_sae
from saeflow.sae.training import TrainingConfig
from saeflow.sae.training.revival import revive_dead
from saeflow.sae.training.trainer import SAETrainer

D, D_SAE, B = 16, 64, 32


def _stepped(arch: str, **knobs):
    """An SAE and its Adam optimizer after one real step, so every parameter has moments."""
    torch.manual_seed(0)
    sae = build_sae({"architecture": arch, "d_sae": D_SAE, **knobs}, D)
    trainer = SAETrainer([sae], TrainingConfig(batch_size=B, device="cpu", revive_dead_until=0), B * 10)
    trainer.step(torch.randn(B, D))
    return sae, trainer.optimizers[0]


@pytest.mark.parametrize(
    ("arch", "knobs", "extra"),
    [("topk", {"k": 4}, []), ("gated", {}, ["r_mag", "b_mag"]), ("jumprelu", {}, ["log_threshold"])],
)
def test_dead_latents_take_residual_directions_and_fresh_moments_and_nothing_else_moves(arch, knobs, extra):
    sae, opt = _stepped(arch, **knobs)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in sae.named_parameters()}
    x = torch.randn(B, D)
    x_hat = torch.zeros(B, D)  # residual = x: every revived direction must be some row of x, normalised
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[3, 10, 40]] = True
    torch.manual_seed(1)
    back = revive_dead(sae, opt, x, x_hat, dead)
    sae.requires_grad_(False)

    assert sorted(back.tolist()) == [3, 10, 40]  # 3 dead ≤ B/4: all of them
    alive = ~dead
    rows = x / x.norm(dim=1, keepdim=True)
    for i in back.tolist():
        d = sae.W_dec[i] / sae.W_dec[i].norm()
        assert (rows @ d).max() == pytest.approx(1.0, abs=1e-6)  # the direction of one drawn row
        assert torch.allclose(sae.W_enc[:, i] / sae.W_enc[:, i].norm(), d, atol=1e-6)  # reads what it writes
        assert sae.W_enc[:, i].norm() == pytest.approx(float(before["W_enc"][:, alive].norm(dim=0).mean()), rel=1e-5)
        for name in ["b_enc", *extra]:
            assert float(getattr(sae, name)[i]) == pytest.approx(float(before[name][alive].median()))
    used = {int((rows @ (sae.W_dec[i] / sae.W_dec[i].norm())).argmax()) for i in back.tolist()}
    assert len(used) == 3  # rows drawn without replacement
    for name, dim in sae.latent_dims().items():
        p, state = dict(sae.named_parameters())[name], opt.state[dict(sae.named_parameters())[name]]
        keep = alive.nonzero().flatten()
        # Alive latents: weights and moments exactly as they were.
        assert torch.equal(p.detach().index_select(dim, keep), before[name].index_select(dim, keep))
        assert torch.equal(state["exp_avg"].index_select(dim, keep), moments[name]["exp_avg"].index_select(dim, keep))
        revived = state["exp_avg_sq"].index_select(dim, back)
        assert torch.equal(state["exp_avg"].index_select(dim, back), torch.zeros_like(revived))
        typical = moments[name]["exp_avg_sq"].index_select(dim, keep).mean(dim, keepdim=True)
        assert torch.allclose(revived, typical.expand_as(revived))


def test_at_most_a_quarter_batch_is_revived_at_once():
    sae, opt = _stepped("topk", k=4)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    back = revive_dead(sae, opt, torch.randn(B, D), torch.zeros(B, D), dead)
    assert len(back) == B // 4 and len(set(back.tolist())) == B // 4


def test_the_trainer_revives_once_per_dead_window_until_revive_dead_until_and_counts_it():
    torch.manual_seed(0)
    sae = build_sae({"architecture": "topk", "d_sae": D_SAE, "k": 2}, D)
    # Inputs on 2 directions only: most latents never fire, so every window has dead latents to revive.
    basis = torch.randn(2, D)
    batches = [torch.rand(B, 2) @ basis for _ in range(40)]
    cfg = TrainingConfig(batch_size=B, device="cpu", dead_tokens=4 * B, log_every=1, revive_dead_until=0.5)
    trainer = SAETrainer([sae], cfg, 40 * B)
    revived_after = []
    for x in batches:
        trainer.step(x)
        revived_after.append(trainer.revived[0])
    events = [s for s in range(1, 40) if revived_after[s] > revived_after[s - 1]] + ([0] if revived_after[0] else [])
    # Windows end after steps 3, 7, 11, 15, 19 (tokens 128·n); revival stops at half of training (step 20).
    assert sorted(events) == [3, 7, 11, 15, 19]
    assert all(revived_after[s] - revived_after[s - 1] <= B // 4 for s in events if s)
    assert trainer.state_dict()["saes"][0]["revived"] == revived_after[-1] > 0


def test_the_revival_window_is_a_tenth_of_training_except_for_the_topk_family():
    # MATH §3.3: dead window = a quarter of training (250 batches here); revival every tenth (100 batches) for
    # relu/gated/JumpReLU/top-AFA, every dead window for TopK, BatchTopK and Matryoshka.
    archs = ("relu", "gated", "jumprelu", "topafa", "topk", "batchtopk", "matryoshka")
    saes = [build_sae({"architecture": a, "d_sae": D_SAE}, D) for a in archs]
    trainer = SAETrainer(saes, TrainingConfig(batch_size=B, device="cpu"), 1000 * B)
    assert trainer.dead_tokens == 250 * B
    assert trainer.revive_windows == [100 * B] * 4 + [250 * B] * 3
    pinned = SAETrainer(saes, TrainingConfig(batch_size=B, device="cpu", revive_window_tokens=7 * B), 1000 * B)
    assert pinned.revive_windows == [7 * B] * 7
