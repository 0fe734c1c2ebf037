"""The sparse TopK decoder (sae/architectures/kernels.py, MATH §2.4) computes what the dense decoder computes,
forward and backward."""

from __future__ import annotations

import pytest
import torch

from saeflow.sae import TopKConfig, TrainState, build_sae
from saeflow.sae.architectures.kernels import decode_topk, dense_decode, sparse_decode, use_sparse

B, D_IN, D_SAE, K = 64, 48, 512, 8


def _code(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(B, D_SAE, generator=g)
    vals, idx = pre.topk(K, dim=-1, sorted=False)
    W_dec = torch.randn(D_SAE, D_IN, generator=g)
    b_dec = torch.randn(D_IN, generator=g)
    return torch.relu(vals), idx, W_dec, b_dec


def _grads(decode, vals, idx, W_dec, b_dec):
    vals, W_dec, b_dec = (t.clone().requires_grad_() for t in (vals, W_dec, b_dec))
    out = decode(vals, idx, W_dec, b_dec)
    # A loss whose gradient differs per output entry, so a transposed or misrouted gradient cannot pass.
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    return out.detach(), vals.grad, W_dec.grad, b_dec.grad


def test_sparse_decode_forward_matches_dense():
    vals, idx, W_dec, b_dec = _code()
    torch.testing.assert_close(
        sparse_decode(vals, idx, W_dec, b_dec), dense_decode(vals, idx, W_dec, b_dec), atol=1e-5, rtol=1e-5
    )


def test_sparse_decode_gradients_match_dense():
    vals, idx, W_dec, b_dec = _code(1)
    sparse = _grads(sparse_decode, vals, idx, W_dec, b_dec)
    dense = _grads(dense_decode, vals, idx, W_dec, b_dec)
    for name, s, d in zip(("x_hat", "vals", "W_dec", "b_dec"), sparse, dense, strict=True):
        torch.testing.assert_close(s, d, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_sparse_decode_gradient_touches_only_active_rows():
    vals, idx, W_dec, b_dec = _code(2)
    _, _, grad_W, _ = _grads(sparse_decode, vals, idx, W_dec, b_dec)
    inactive = torch.ones(D_SAE, dtype=torch.bool)
    inactive[idx.unique()] = False
    assert inactive.any()
    assert grad_W[inactive].abs().max() == 0


def test_sparse_decode_accepts_extra_leading_dims():
    vals, idx, W_dec, b_dec = _code(3)
    out = sparse_decode(vals.view(4, B // 4, K), idx.view(4, B // 4, K), W_dec, b_dec)
    torch.testing.assert_close(out.view(B, D_IN), sparse_decode(vals, idx, W_dec, b_dec))


def test_decode_topk_picks_sparse_only_for_small_k():
    assert use_sparse(32, 8192) and not use_sparse(4096, 8192)
    assert use_sparse(4096, 8192, "sparse") and not use_sparse(32, 8192, "dense")
    with pytest.raises(ValueError, match="decode impl"):
        use_sparse(32, 8192, "fast")  # type: ignore[arg-type]
    vals, idx, W_dec, b_dec = _code(4)
    torch.testing.assert_close(
        decode_topk(vals, idx, W_dec, b_dec, "sparse"),
        decode_topk(vals, idx, W_dec, b_dec, "dense"),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_training_loss_and_gradients_same_with_sparse_or_dense_decoder(with_dead):
    torch.manual_seed(0)
    sae = build_sae(TopKConfig(k=K, d_sae=D_SAE, k_aux=16), D_IN)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    x = torch.randn(B, D_IN)
    dead = torch.arange(D_SAE) % 3 == 0 if with_dead else None
    results = {}
    for impl in ("sparse", "dense"):
        sae.decode_impl = impl
        sae.zero_grad(set_to_none=True)
        out = sae.loss(x, TrainState(0.5, dead))
        out.loss.backward()
        results[impl] = (out, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (s_out, s_grads), (d_out, d_grads) = results["sparse"], results["dense"]
    torch.testing.assert_close(s_out.loss, d_out.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_out.x_hat, d_out.x_hat, atol=1e-5, rtol=1e-5)
    assert torch.equal(s_out.f, d_out.f)
    for name in s_grads:
        torch.testing.assert_close(
            s_grads[name], d_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_topk_training_code_equals_encode():
    torch.manual_seed(1)
    sae = build_sae(TopKConfig(k=K, d_sae=D_SAE), D_IN)
    x = torch.randn(B, D_IN)
    out = sae.loss(x, TrainState(1.0, None))  # past k annealing (MATH §2.4), where training selects k too
    assert torch.equal(out.f, sae.encode(x))
    torch.testing.assert_close(out.x_hat, sae(x), atol=1e-5, rtol=1e-5)
