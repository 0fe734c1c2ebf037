"""Fast paths for the TopK family, kept apart from the models (MATH §2.4, last bullet).

A TopK code has k non-zeros per row out of d_sae, so the decoder needs only k rows of W_dec per token:
x̂ = Σⱼ valsⱼ · W_dec[idxⱼ] + b_dec. The dense path instead scatters the code into a [B, d_sae] matrix and pays a
full [B, d_sae] × [d_sae, d_in] matmul forward and two more backward (the W_dec gradient and the code gradient),
almost all of it multiplying zeros.

`sparse_decode` uses `torch.nn.functional.embedding_bag` in `sum` mode with per-sample weights: the forward is a
gather + weighted sum that never materialises the [B, k, d_in] block of rows, and its backward
(a) adds valsⱼ · ∂x̂ only into the k·B selected rows of the W_dec gradient and (b) gives ∂vals as the dot product of
∂x̂ with each selected row. Both directions cost O(B·k·d_in) instead of O(B·d_sae·d_in), on CPU and CUDA alike.
A hand-written autograd.Function (gather + bmm for ∂vals, index_add_ / torch.sparse.mm for ∂W_dec) was measured
slower on CPU than embedding_bag's own backward, because it has to materialise the gathered rows.

`decode_topk` is the one entry point models call; it picks dense or sparse so the model code does not know which
kernel runs (STYLE: kernels apart from the model).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

DecodeImpl = Literal["auto", "sparse", "dense"]

SPARSE_MAX_DENSITY = 1 / 32
"""`auto` uses the sparse decoder when k / d_sae is at most this. Measured on a shared 2-core CPU
(d_in = 512, d_sae = 8192, B = 1024, TopK + decode forward and backward): sparse is ~1.6–2× faster at k = 32
and 128, breaks even at k = 512 (1/16) and is slower at k = 1024 (1/8). 1/32 keeps a margin below the
crossover; GPU numbers go in benchmarks/README.md."""


def sparse_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """x̂ = Σⱼ vals[:, j] · W_dec[idx[:, j]] + b_dec, touching only the selected rows forward and backward.

    vals: [B, k] activations (already ReLU'd), idx: [B, k] latent indices, W_dec: [d_sae, d_in], b_dec: [d_in].
    Gradients flow to vals, W_dec and b_dec (not to idx). Leading batch dimensions beyond one are flattened.
    """
    lead = vals.shape[:-1]
    k = vals.shape[-1]
    # embedding_bag wants per-sample weights in the table's dtype: under CUDA autocast `vals` arrives in bf16
    # while W_dec stays fp32, and the sum in fp32 is the more accurate of the two anyway.
    flat_vals = vals.reshape(-1, k).to(W_dec.dtype)
    out = F.embedding_bag(idx.reshape(-1, k), W_dec, per_sample_weights=flat_vals, mode="sum")
    return (out + b_dec).reshape(*lead, W_dec.shape[1])


def dense_decode(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """The reference path: scatter into a dense [B, d_sae] code, then f W_dec + b_dec (MATH §1)."""
    f = vals.new_zeros(*vals.shape[:-1], W_dec.shape[0]).scatter(-1, idx, vals)
    return f @ W_dec + b_dec


def use_sparse(k: int, d_sae: int, impl: DecodeImpl = "auto") -> bool:
    """Whether `decode_topk` would take the sparse path for this k and d_sae."""
    if impl not in ("auto", "sparse", "dense"):
        raise ValueError(f"decode impl must be 'auto', 'sparse' or 'dense', not {impl!r}")
    if impl != "auto":
        return impl == "sparse"
    return k <= SPARSE_MAX_DENSITY * d_sae


def decode_topk(vals: Tensor, idx: Tensor, W_dec: Tensor, b_dec: Tensor, impl: DecodeImpl = "auto") -> Tensor:
    """Decode a code given as (values, indices) of its k non-zeros per row, by the faster path for its density."""
    if use_sparse(vals.shape[-1], W_dec.shape[0], impl):
        return sparse_decode(vals, idx, W_dec, b_dec)
    return dense_decode(vals, idx, W_dec, b_dec)
