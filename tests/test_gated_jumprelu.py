"""Gated (MATH §2.2) and JumpReLU (MATH §2.3) SAEs: the math of their gradients, training, checkpoints, config."""

from __future__ import annotations

import math

import pytest
import torch

from saeflow.sae import GatedConfig, GatedSAE, JumpReLUConfig, JumpReLUSAE, TrainState, build_sae
from saeflow.sae.architectures.jumprelu import JumpReLUSTE, StepSTE
from saeflow.sae.architectures.losses import reconstruction_loss
from saeflow.sae.training import TrainingConfig, train_saes

D = 16


def _x(n: int = 64, d: int = D, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.5 + 0.3


def _gated(seed: int = 0, **cfg) -> GatedSAE:
    """A Gated SAE in float64 with every parameter moved off its init, so no term is trivially zero."""
    torch.manual_seed(seed)
    sae = build_sae(GatedConfig(expansion_factor=4, **cfg), D).double()
    with torch.no_grad():
        for p in (sae.b_enc, sae.r_mag, sae.b_mag, sae.b_dec):
            p.normal_(0, 0.5)
    return sae


def _jumprelu(seed: int = 0, **cfg) -> JumpReLUSAE:
    torch.manual_seed(seed)
    sae = build_sae(JumpReLUConfig(expansion_factor=4, **cfg), D).double()
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.log_threshold.copy_(torch.empty(sae.d_sae).uniform_(-1, 0.5))
    return sae


# ----- Gated SAE (MATH §2.2) -----------------------------------------------------------------------------------


def test_gated_inference_equals_jumprelu_of_magnitude_path():
    sae = _gated()
    x = _x(256)
    with torch.no_grad():
        pi_mag = sae.mag_pre_acts(x)
        # π_gate > 0 ⇔ π_mag > b_mag − exp(r_mag)·b_gate; the ReLU on π_mag clips that threshold at 0.
        theta = (sae.b_mag - sae.r_mag.exp() * sae.b_enc).clamp_min(0)
        expected = pi_mag * (pi_mag > theta)
        f = sae.encode(x)
    assert (f > 0).any() and (f == 0).any()
    torch.testing.assert_close(f, expected, rtol=0, atol=1e-12)


def test_gated_mask_passes_no_gradient_to_the_gate():
    sae = _gated()
    x = _x()
    sae.encode(x).sum().backward()
    assert sae.b_enc.grad is None or torch.all(sae.b_enc.grad == 0)  # b_gate only enters through the step
    with torch.no_grad():
        active = ((sae.gate_pre_acts(x) > 0) & (sae.mag_pre_acts(x) > 0)).double()
        # d/dW_gate of Σ active·((x − b_dec) W_gate)·exp(r_mag): the magnitude path alone.
        expected = (x - sae.b_dec).T @ active * sae.r_mag.exp()
    torch.testing.assert_close(sae.W_enc.grad, expected)


def test_gated_aux_loss_leaves_the_decoder_frozen():
    sae = _gated()
    x = _x()
    sae.aux_loss(x, sae.gate_pre_acts(x)).backward()
    assert sae.W_dec.grad is None or torch.all(sae.W_dec.grad == 0)
    assert sae.b_enc.grad is not None and sae.b_enc.grad.abs().sum() > 0  # it does train the gate
    # b_dec still centres x in π_gate (paper); since ∂π_gate/∂b_dec = −W_gate, that is the only route left.
    torch.testing.assert_close(sae.b_dec.grad, -sae.W_enc.detach() @ sae.b_enc.grad)


@pytest.mark.parametrize("unit_norm_decoder", [True, False])
def test_gated_loss_is_reconstruction_plus_sparsity_plus_aux(unit_norm_decoder):
    sae = _gated(unit_norm_decoder=unit_norm_decoder, l1_coefficient=2.0)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(sae.d_sae, 1, dtype=torch.float64) + 0.5)  # norms ≠ 1 tell the two forms apart
    x = _x()
    out = sae.loss(x, TrainState(progress=1.0, dead_mask=None))
    gate = torch.relu(sae.gate_pre_acts(x))
    weight = 1.0 if unit_norm_decoder else sae.W_dec.norm(dim=1)
    l1 = (gate * weight).sum(-1).mean()
    aux = reconstruction_loss(x, gate @ sae.W_dec + sae.b_dec)
    torch.testing.assert_close(out.loss, reconstruction_loss(x, out.x_hat) + 2.0 * l1 + aux)
    assert sae.unit_norm_decoder is unit_norm_decoder


# ----- JumpReLU SAE (MATH §2.3) --------------------------------------------------------------------------------


def test_jumprelu_straight_through_gradients_match_spec_on_a_hand_example():
    theta = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    eps = 0.1  # window |π − θ| < 0.05; 0.93 sits just outside it, 2.5 far outside
    pre = torch.tensor([[1.02, 2.5], [0.97, 1.96], [0.93, 2.04]], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.float64)

    f = JumpReLUSTE.apply(pre, theta, eps)
    torch.testing.assert_close(f.detach(), torch.tensor([[1.02, 2.5], [0.0, 0.0], [0.0, 2.04]], dtype=torch.float64))
    gp, gt = torch.autograd.grad(f, (pre, theta), g)
    torch.testing.assert_close(gp, torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 6.0]], dtype=torch.float64))
    # −(θ/ε)·Σ g over rows in the window: θ₀: rows 0,1 → −(1/0.1)(1+3); θ₁: rows 1,2 → −(2/0.1)(4+6).
    torch.testing.assert_close(gt, torch.tensor([-40.0, -200.0], dtype=torch.float64))

    h = StepSTE.apply(pre, theta, eps)
    gp, gt = torch.autograd.grad(h, (pre, theta), g, allow_unused=True)
    assert gp is None  # H passes nothing to π
    torch.testing.assert_close(gt, torch.tensor([-40.0, -100.0], dtype=torch.float64))  # −(1/ε)·Σ g


def test_jumprelu_loss_gradient_on_log_threshold_follows_spec():
    lam, eps = 0.7, 0.5  # a wide window so many rows land in it
    sae = _jumprelu(l0_coefficient=lam, bandwidth=eps)
    x = _x(128)
    sae.loss(x, TrainState(progress=1.0, dead_mask=None)).loss.backward()

    with torch.no_grad():
        pre, theta = sae.pre_acts(x), sae.threshold
    f = (pre * (pre > theta)).requires_grad_()
    (g,) = torch.autograd.grad(reconstruction_loss(x, sae.decode(f)), f)
    k = ((pre - theta).abs() < eps / 2).double()
    assert k.sum() > 10
    d_theta = (-(theta / eps) * k * g).sum(0) + lam * (-(1 / eps) * k).sum(0) / x.shape[0]
    torch.testing.assert_close(sae.log_threshold.grad, theta * d_theta)  # chain rule through θ = exp(t)


def test_jumprelu_threshold_tracking_shifts_every_threshold_by_one_common_step_toward_the_target_l0():
    x = _x(200)
    shifts, l0_after = {}, {}
    for rate in (1.0, 0.3):
        sae = _jumprelu(target_l0=12.0, threshold_tracking=rate)
        before = sae.log_threshold.detach().clone()
        with torch.no_grad():
            pre = sae.pre_acts(x)
            l0_before = float((pre > sae.threshold).sum(-1).double().mean())
        out = sae.loss(x, TrainState(progress=0.5, dead_mask=None))
        shifts[rate] = sae.log_threshold.detach() - before
        with torch.no_grad():
            l0_after[rate] = float((pre > sae.threshold).sum(-1).double().mean())
        assert float(out.terms["controlled_l0"]) == pytest.approx(l0_before)  # what the controller steers λ by
        assert float(out.f.ne(0).sum(-1).double().mean()) == pytest.approx(l0_after[rate])  # the step used new θ
    assert l0_before > 13  # the step is not trivially zero
    full = shifts[1.0]
    assert torch.allclose(full, full[0].expand_as(full), atol=1e-12)  # one shift common to every latent
    assert 0 < float(full[0]) < 1  # θ rises (L0 was above the target), unclipped
    assert l0_after[1.0] == 12.0  # the full step lands on the target: 12 × 200 entries stay above θ
    torch.testing.assert_close(shifts[0.3], 0.3 * full)
    assert 12.0 < l0_after[0.3] < l0_before


def test_jumprelu_tracking_rate_scales_with_the_run_and_a_set_rate_or_no_target_wins():
    sae = _jumprelu(target_l0=12.0)
    assert [sae.tracking_rate(n) for n in (None, 390, 400, 1500, 6000)] == [0.05, 0.05, 0.05, 20 / 1500, 20 / 6000]
    assert _jumprelu(target_l0=12.0, threshold_tracking=0.2).tracking_rate(6000) == 0.2
    plain = _jumprelu()  # no target: λ alone, no tracking, no controlled_l0 term
    before = plain.log_threshold.detach().clone()
    out = plain.loss(_x(200), TrainState(progress=0.5, dead_mask=None, total_steps=390))
    assert torch.equal(plain.log_threshold.detach(), before) and "controlled_l0" not in out.terms


def test_jumprelu_encode_zeroes_everything_at_or_below_threshold():
    sae = _jumprelu()
    x = _x(256)
    with torch.no_grad():
        pre, f = sae.pre_acts(x), sae.encode(x)
    below = pre <= sae.threshold
    assert below.any() and (~below).any()
    assert torch.all(f[below] == 0) and torch.equal(f[~below], pre[~below])


# ----- both: training, checkpoints, config -------------------------------------------------------------------


def _sparse_data(n: int, d: int = 64, m: int = 256, k: float = 5, seed: int = 0) -> torch.Tensor:
    """Rows = sparse non-negative codes (≈k active of m) on m fixed random unit directions; E‖x‖ = √d (MATH §4.1)."""
    dirs = torch.randn(m, d, generator=torch.Generator().manual_seed(1234))
    dirs /= dirs.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, m, generator=g) < k / m) * (0.5 + 1.5 * torch.rand(n, m, generator=g))
    x = codes @ dirs
    return x * (math.sqrt(d) / x.norm(dim=1).mean())


@pytest.fixture(scope="module")
def trained():
    """Both architectures, default sparsity settings, trained together on the same synthetic stream."""
    steps, bs = 1000, 256
    x = _sparse_data(steps * bs)
    torch.manual_seed(0)
    saes = [build_sae(GatedConfig(expansion_factor=4), 64), build_sae(JumpReLUConfig(expansion_factor=4), 64)]
    # Matmuls this small gain nothing from threads, and on a busy shared CPU extra threads cost ~10× in contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_saes(
            saes,
            x.split(bs),
            TrainingConfig(batch_size=bs),
            total_tokens=steps * bs,
            b_dec_sample=x[:2048],
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return saes


@pytest.mark.parametrize("index", [0, 1], ids=["gated", "jumprelu"])
def test_trains_to_low_fvu_at_a_sane_l0(trained, index):
    sae = trained[index]
    ev = _sparse_data(4096, seed=1)
    with torch.no_grad():
        f = sae.encode(ev)
        fvu = float((ev - sae.decode(f)).pow(2).sum() / (ev - ev.mean(0)).pow(2).sum())
    l0 = float((f > 0).sum(-1).float().mean())
    # 1000 steps do not finish this 4×-superposed task (TopK k=5 lands near FVU 0.3 here); these bounds catch a
    # model that did not learn to reconstruct or did not learn to be sparse.
    assert fvu < 0.3, fvu
    assert 3 < l0 < 40, l0  # the data has ≈5 active directions per row; at init ≈80 latents fire


def test_jumprelu_l0_penalty_raised_the_thresholds(trained):
    sae = trained[1]
    assert float(sae.threshold.detach().median()) > 1.2 * sae.cfg.threshold_init


@pytest.mark.parametrize("index", [0, 1], ids=["gated", "jumprelu"])
def test_checkpoint_round_trip_gives_identical_outputs(trained, index, tmp_path):
    from saeflow.storage.checkpoints import load_sae, save_sae

    sae = trained[index]
    loaded = load_sae(save_sae(sae, str(tmp_path / "ckpt")))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    extra = {"r_mag", "b_mag"} if index == 0 else {"log_threshold"}
    assert extra <= set(loaded.state_dict())
    x = _sparse_data(512, seed=2)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
        assert torch.equal(loaded(x), sae(x))


def test_pipeline_config_accepts_both_architectures():
    from saeflow.config import validate_config

    cfg = validate_config({"saes": [{"architecture": "gated"}, {"architecture": "jumprelu", "sparsity": "tanh"}]})
    assert [type(s) for s in cfg.saes] == [GatedConfig, JumpReLUConfig]
    assert [s.label() for s in cfg.saes] == ["gated-x8-l1_3", "jumprelu-x8-tanh_1"]
    assert GatedConfig.adam_betas == JumpReLUConfig.adam_betas == (0.0, 0.999)
