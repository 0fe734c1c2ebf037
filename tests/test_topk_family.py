"""BatchTopK (MATH §2.5), top-AFA (MATH §2.6), Matryoshka (MATH §2.7): selection, losses, learning, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from saeflow.sae import BatchTopKSAE, MatryoshkaSAE, TopAFASAE, build_sae
from saeflow.sae.architectures.base import TrainState
from saeflow.sae.architectures.topafa import afa_select
from saeflow.sae.training import TrainingConfig, train_saes
from saeflow.storage.checkpoints import load_sae, save_sae

D, N_TRUE, K = 64, 256, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: on a shared 2-core box intra-op threads only contend (measured ~20× slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- BatchTopK -------------------------------------------------------------------------------------------------
def test_batchtopk_keeps_exactly_k_times_batch_nonzeros_and_rows_vary():
    torch.manual_seed(0)
    sae = build_sae({"architecture": "batchtopk", "k": 4, "d_sae": 64}, d_in=16).train()
    x = torch.randn(32, 16) * torch.linspace(0.2, 3.0, 32)[:, None]  # rows of very different norms
    out = sae.loss(x, TrainState(0.0, None))
    nnz = (out.f > 0).sum(-1)
    assert int(nnz.sum()) == 4 * 32
    assert nnz.min() < 4 < nnz.max()  # L0 averages k but varies per row
    pre = torch.relu(sae.pre_acts(x))
    kept = out.f > 0
    assert torch.equal(out.f[kept], pre[kept])  # kept values are untouched ReLU(π)
    assert pre[~kept].max() <= pre[kept].min()  # and they are the global top of the batch


def test_batchtopk_threshold_is_running_mean_of_smallest_kept_activation():
    torch.manual_seed(0)
    sae = build_sae({"architecture": "batchtopk", "k": 2, "d_sae": 32, "threshold_decay": 1.0}, d_in=8).train()
    mins = []
    for _ in range(3):
        out = sae.loss(torch.randn(16, 8), TrainState(0.0, None))
        mins.append(out.f[out.f > 0].min())
    assert int(sae.threshold_updates) == 3
    assert torch.allclose(sae.threshold, torch.stack(mins).mean())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_training_k_anneals_geometrically_to_k_and_inference_always_uses_k(arch):  # MATH §2.4
    torch.manual_seed(0)
    sae = build_sae({"architecture": arch, "k": 8, "d_sae": 256, "k_start_factor": 4, "k_anneal": 0.5}, d_in=16)
    assert [sae.k_at(p) for p in (0.0, 0.25, 0.5, 0.9, 1.0)] == [32, 16, 8, 8, 8]  # 8·4^(1 − p/0.5)
    x = torch.randn(64, 16)
    for progress, k in ((0.0, 32), (0.25, 16), (0.75, 8)):
        nnz = (sae.train().loss(x, TrainState(progress, None)).f > 0).sum(-1)
        if arch == "topk":
            assert int(nnz.max()) == k  # per row
        else:
            assert int(nnz.sum()) == k * 64  # across the batch
    off = build_sae({"architecture": arch, "k": 8, "d_sae": 256, "k_anneal": 0.0}, d_in=16)
    assert off.k_at(0.0) == 8
    if arch == "topk":
        assert int((sae.eval().encode(x) > 0).sum(-1).max()) == 8


# ----- top-AFA ---------------------------------------------------------------------------------------------------
def _afa_example(**cfg) -> TopAFASAE:
    """Orthonormal decoder rows (e₁..e₆ in ℝ⁸), b = 0, and an encoder chosen so that x = 5·eᵢ gives, by hand,
    row 1: a = (4, 2, 2, 1, .5, 0): C = 4, 4.47, 4.90, 5.00, 5.02 → k* = 4 (4² + 2² + 2² + 1² = 5²);
    row 2: a = (1, 5, 2, 0, 0, 0): C = 5, 5.39, … → k* = 1;
    row 3: a = (4, 2.9, 1.5, 0, 0, 0): C = 4, 4.94, 5.16 → k* = 2 when nearest, 3 when first to exceed 5."""
    sae = build_sae({"architecture": "topafa", "d_sae": 6, **cfg}, d_in=8)
    with torch.no_grad():
        sae.W_dec.copy_(torch.eye(8)[:6])
        sae.W_enc.zero_()
        sae.W_enc[0] = torch.tensor([0.8, 0.4, 0.4, 0.2, 0.1, -0.2])
        sae.W_enc[1] = torch.tensor([0.2, 1.0, 0.4, 0.0, 0.0, 0.0])
        sae.W_enc[2] = torch.tensor([0.8, 0.58, 0.3, 0.0, 0.0, 0.0])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


AFA_X = 5 * torch.eye(8)[:3]


@pytest.mark.parametrize(
    ("how", "k_star", "row3"),
    [("nearest", [4, 1, 2], [4.0, 2.9, 0.0]), ("first_exceed", [4, 1, 3], [4.0, 2.9, 1.5])],
)
def test_topafa_k_star_picks_the_prefix_whose_norm_matches_the_input(how, k_star, row3):
    sae = _afa_example(afa_select=how)
    a = torch.relu(sae.pre_acts(AFA_X))
    sel = afa_select(a, sae.W_dec.norm(dim=1), AFA_X.norm(dim=1), how)
    assert sel.k_star.tolist() == k_star
    f = sae.encode(AFA_X)
    assert torch.allclose(f[0], torch.tensor([4.0, 2, 2, 1, 0, 0]))
    assert torch.allclose(f[1], torch.tensor([0.0, 5, 0, 0, 0, 0]))
    assert torch.allclose(f[2], torch.tensor([*row3, 0.0, 0, 0]))


def test_topafa_centred_target_is_measured_from_b_dec():
    # b_dec = 3·e₈ is invisible to the encoder (W_enc's row 8 is zero) but makes ‖x − b_dec‖ = √34 ≈ 5.83 > ‖x‖.
    centred, raw = _afa_example(afa_target="centred"), _afa_example(afa_target="raw")
    for sae in (centred, raw):
        with torch.no_grad():
            sae.b_dec[7] = 3.0
    assert (raw.encode(AFA_X) > 0).sum(-1).tolist() == [4, 1, 2]
    assert (centred.encode(AFA_X) > 0).sum(-1).tolist() == [5, 3, 3]  # every positive latent fits under √34


def test_topafa_loss_adds_norm_matching_term():
    sae = _afa_example(afa_coefficient=0.5)
    out = sae.loss(AFA_X, TrainState(0.0, None))
    afa = (out.f.norm(dim=-1) - 5.0).pow(2).mean()  # unit rows: ‖f̃‖ = ‖f‖
    assert torch.allclose(out.terms["afa"], afa)
    assert torch.allclose(out.loss, out.terms["mse"] + 0.5 * afa)


# ----- Matryoshka ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matryoshka_loss_is_the_sum_of_prefix_reconstruction_losses(reduction):
    torch.manual_seed(0)
    assert build_sae({"architecture": "matryoshka", "d_sae": 64}, d_in=16).prefixes == [32, 64]  # default [1/2, 1]
    spec = {"architecture": "matryoshka", "k": 4, "d_sae": 64, "prefix_loss": reduction}
    sae = build_sae({**spec, "prefix_fractions": [0.25, 0.5, 1.0]}, d_in=16)
    with torch.no_grad():
        sae.b_dec.normal_()
    assert sae.prefixes == [16, 32, 64]
    x = torch.randn(32, 16)
    out = sae.loss(x, TrainState(0.0, None))
    per_prefix = [(x - (out.f[:, :m] @ sae.W_dec[:m] + sae.b_dec)).pow(2).sum(-1).mean() for m in sae.prefixes]
    expected = sum(per_prefix) / (1 if reduction == "sum" else len(per_prefix))
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    assert torch.allclose(out.x_hat, sae.decode(out.f), atol=1e-5)
    assert int((out.f > 0).sum()) == 4 * 32  # the activation is BatchTopK


def test_matryoshka_explicit_prefixes_always_end_at_d_sae():
    sae = build_sae({"architecture": "matryoshka", "d_sae": 48, "prefixes": [6, 20]}, d_in=8)
    assert sae.prefixes == [6, 20, 48]
    with pytest.raises(ValueError, match="exceeds d_sae"):
        build_sae({"architecture": "matryoshka", "d_sae": 16, "prefixes": [6, 20]}, d_in=8)


# ----- training on a known sparse dictionary ---------------------------------------------------------------------
def _synthetic(rows: int, gen: torch.Generator, dirs: torch.Tensor) -> torch.Tensor:
    """~4 of 256 unit directions active per row with magnitudes in [0.5, 1.5], plus a constant offset for b_dec."""
    codes = (torch.rand(rows, N_TRUE, generator=gen) < 4 / N_TRUE) * (0.5 + torch.rand(rows, N_TRUE, generator=gen))
    return codes @ dirs + 0.3


SPECS = {
    "batchtopk": {"architecture": "batchtopk", "k": K},
    "topafa": {"architecture": "topafa"},
    "matryoshka": {"architecture": "matryoshka", "k": K},
}


@pytest.fixture(scope="module")
def trained(one_thread):
    """The three architectures trained side by side (one shared batch stream) for 250 steps of 256 rows."""
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(N_TRUE, D, generator=gen), dim=1)
    scale = math.sqrt(D) / _synthetic(4096, gen, dirs).norm(dim=1).mean()  # MATH §4.1: E‖x‖ = √d
    x_eval = _synthetic(4096, gen, dirs) * scale

    def batches():
        while True:
            yield _synthetic(256, gen, dirs) * scale

    torch.manual_seed(0)
    saes = {name: build_sae({**spec, "expansion_factor": 4, "lr": 1e-2}, D) for name, spec in SPECS.items()}
    cfg = TrainingConfig(batch_size=256, log_every=1000, device="cpu")
    train_saes(list(saes.values()), batches(), cfg, total_tokens=250 * 256, b_dec_sample=x_eval[:2048], progress=False)
    return saes, x_eval


# (max FVU, L0 range) in eval mode. top-AFA picks its own L0 and lands dense on this toy, as MATH §2.6 warns it
# does at small d; the bound only says it stays a code (under half the latents), not a dense copy of x.
EXPECT = {"batchtopk": (0.35, (K / 2, 2 * K)), "topafa": (0.15, (2, 128)), "matryoshka": (0.45, (K / 2, 2 * K))}


@pytest.mark.parametrize("name", list(SPECS))
def test_learns_a_synthetic_sparse_dictionary_at_a_sane_l0(trained, name):
    saes, x = trained
    sae = saes[name]
    assert not sae.training  # train_saes leaves SAEs in eval mode
    with torch.no_grad():
        f = sae.encode(x)
        fvu = (x - sae.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    l0 = (f > 0).sum(-1).float()
    max_fvu, (lo, hi) = EXPECT[name]
    assert fvu < max_fvu, f"{name}: FVU {fvu:.3f}"
    assert lo <= l0.mean() <= hi, f"{name}: L0 {l0.mean():.1f}"
    assert l0.std() > 0  # no architecture here has a fixed per-row L0


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_learned_threshold_is_a_buffer_and_drives_eval_encoding(trained, name):
    saes, x = trained
    sae = saes[name]
    assert isinstance(sae, BatchTopKSAE)
    assert "threshold" in sae.state_dict() and "threshold" in dict(sae.named_buffers())
    assert sae.threshold > 0 and int(sae.threshold_updates) == 250
    with torch.no_grad():
        pre = sae.pre_acts(x[:64])
        assert torch.equal(sae.encode(x[:64]), pre * (pre > sae.threshold))
        # Inference is batch-independent (up to the matmul's summation order for one row vs many).
        assert torch.allclose(sae.encode(x[:1]), sae.encode(x[:64])[:1], atol=1e-6)


@pytest.mark.parametrize("name", list(SPECS))
def test_checkpoint_round_trip_gives_identical_eval_outputs(trained, name, tmp_path):
    saes, x = trained
    sae = saes[name]
    loaded = load_sae(save_sae(sae, str(tmp_path / name)))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key  # θ and its update count included
    with torch.no_grad():
        assert torch.equal(loaded.encode(x[:256]), sae.encode(x[:256]))
        assert torch.equal(loaded(x[:256]), sae(x[:256]))
    if isinstance(sae, MatryoshkaSAE):
        assert loaded.prefixes == sae.prefixes


def test_pipeline_config_accepts_the_three_architectures():
    from saeflow.config import validate_config

    cfg = validate_config({"saes": [{"architecture": a} for a in ("batchtopk", "topafa", "matryoshka")]})
    assert [type(s).__name__ for s in cfg.saes] == ["BatchTopKConfig", "TopAFAConfig", "MatryoshkaConfig"]
    assert [s.label() for s in cfg.saes] == ["batchtopk-x8-k32", "topafa-x8-afa0.03125", "matryoshka-x8-k32"]
