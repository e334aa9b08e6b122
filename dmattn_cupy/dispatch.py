"""A forward call, validated, on its backend: the float64 reference or the CUDA kernels.

No autograd here: ``api`` routes torch calls that want a gradient to ``autograd``, whose
custom op runs these same functions under ``torch.no_grad()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import edge, reference
from .arrays import from_numpy_like, lse_like, to_numpy_f64
from .forward import run_forward
from .masks import SparseMask
from .sparse_plan import dense_block_mask, fold_window, forward_takes_lists
from .validate import (
    Problem,
    check_cu_seqlens_values,
    check_dense,
    check_flags,
    check_sparse,
    check_varlen,
)


def dense(query: Any, key: Any, value: Any, attn_mask: Any, attn_bias: Any,
          softmax_scale: float | None, is_causal: bool, window_size: tuple[int, int],
          softcap: float, sparse_mask: SparseMask | None, return_lse: bool,
          deterministic: bool, backend: str, pb: Problem | None = None) -> Any:
    """``flash_dmattn_func`` without autograd; ``pb``: the call already validated."""
    if pb is None:
        pb = check_dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                         window_size, softcap, backend)
        check_flags(return_lse, deterministic)
        check_sparse(sparse_mask, pb)
    if edge.nothing_to_compute(pb):
        return edge.empty_forward(query, (pb.batch, pb.heads, pb.seqlen_q), return_lse)
    if pb.backend == "reference":
        out, lse = reference.dense_forward(
            to_numpy_f64(query), to_numpy_f64(key), to_numpy_f64(value), to_numpy_f64(attn_mask),
            to_numpy_f64(attn_bias), pb.scale, pb.softcap, pb.window,
            None if sparse_mask is None else sparse_mask.to_dense())
        res = from_numpy_like(out, query)
        return (res, lse_like(lse, query)) if return_lse else res
    # Parametric masks become the kernel's window; a block mask travels as block lists, or
    # where the forward takes none beside attn_mask, as its dense form ANDed into attn_mask.
    pb, block_mask = fold_window(pb, sparse_mask)
    if block_mask is not None and not forward_takes_lists(pb.head_dim, pb.mask is not None):
        mask = dense_block_mask(block_mask, attn_mask, query)
        pb = dataclasses.replace(check_dense(query, key, value, mask, attn_bias, softmax_scale,
                                             is_causal, window_size, softcap, backend),
                                 window=pb.window)
        block_mask = None
    out, lse = run_forward(pb, query, return_lse=return_lse, sparse=block_mask)
    return (out, lse) if return_lse else out


def varlen(query: Any, key: Any, value: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
           max_seqlen_q: int, max_seqlen_k: int, attn_mask: Any, attn_bias: Any,
           softmax_scale: float | None, is_causal: bool, window_size: tuple[int, int],
           softcap: float, return_lse: bool, deterministic: bool, backend: str,
           pb: Problem | None = None) -> Any:
    """``flash_dmattn_varlen_func`` without autograd; ``pb``: the call already validated."""
    if pb is None:
        pb = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, attn_mask, attn_bias, softmax_scale, is_causal,
                          window_size, softcap, backend)
        check_flags(return_lse, deterministic)
    if edge.nothing_to_compute(pb):
        return edge.empty_forward(query, (pb.heads, pb.total_q), return_lse)
    if pb.backend == "reference":
        cu_q = np.asarray(to_numpy_f64(cu_seqlens_q)).astype(np.int64)
        cu_k = np.asarray(to_numpy_f64(cu_seqlens_k)).astype(np.int64)
        check_cu_seqlens_values(cu_q, cu_k, pb.total_q, pb.total_k, pb.seqlen_q, pb.seqlen_k)
        out, lse = reference.varlen_forward(
            to_numpy_f64(query), to_numpy_f64(key), to_numpy_f64(value), cu_q, cu_k,
            to_numpy_f64(attn_mask), to_numpy_f64(attn_bias), pb.scale, pb.softcap, pb.window)
        res = from_numpy_like(out, query)
        return (res, lse_like(lse, query)) if return_lse else res
    out, lse = run_forward(pb, query, cu_seqlens_q, cu_seqlens_k, return_lse=return_lse)
    return (out, lse) if return_lse else out
