"""Public functions: validate, then run on the reference or CUDA backend."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from . import edge, reference
from .arrays import array_kind, from_numpy_like, lse_like, to_numpy_f64
from .masks import SparseMask
from .sparse_plan import bound_min, split_sparse
from .validate import (
    Problem,
    check_cu_seqlens_values,
    check_dense,
    check_varlen,
    normalize_call,
)


def _check_sparse(sparse_mask: Any, pb: Problem) -> None:
    if sparse_mask is None:
        return
    if not isinstance(sparse_mask, SparseMask):
        raise TypeError(f"sparse_mask must be a dmattn_cupy mask object (CausalMask, "
                        f"BlockBitsetMask, ...), got {type(sparse_mask).__name__}")
    if (sparse_mask.seqlen_q, sparse_mask.seqlen_k) != (pb.seqlen_q, pb.seqlen_k):
        raise ValueError(f"sparse_mask is for (seqlen_q, seqlen_k) = "
                         f"({sparse_mask.seqlen_q}, {sparse_mask.seqlen_k}), but the inputs have "
                         f"({pb.seqlen_q}, {pb.seqlen_k})")
    bm, hm = sparse_mask.batch_heads
    if bm not in (1, pb.batch) or hm not in (1, pb.heads):
        raise ValueError(f"sparse_mask batch/head dims must be 1 or ({pb.batch}, {pb.heads}), "
                         f"got ({bm}, {hm})")


def _check_flags(return_lse: Any, deterministic: Any) -> None:
    for name, val in (("return_lse", return_lse), ("deterministic", deterministic)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be a bool, got {type(val).__name__}")


def _torch_autograd(query: Any, *others: Any) -> bool:
    """torch inputs that want a gradient (or are being traced by torch.compile) go through the
    autograd-aware custom ops of ``autograd.py``."""
    if array_kind(query) != "torch":
        return False
    from .autograd import wants_autograd

    return wants_autograd(query, *others)


def flash_dmattn_func(query: Any, key: Any, value: Any, attn_mask: Any = None,
                      attn_bias: Any = None, softmax_scale: float | None = None,
                      is_causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                      softcap: float = 0.0, sparse_mask: SparseMask | None = None,
                      return_lse: bool = False, deterministic: bool = False,
                      backend: str = "auto", *, scale: float | None = None,
                      return_attn_probs: bool | None = None) -> Any:
    """Dense attention with mask/bias broadcasting; see docs/api.md for the exact semantics.

    flash-dmattn 1.x spellings are accepted: ``None`` for ``is_causal``/``softcap``/
    ``deterministic``, ``scale=`` for ``softmax_scale=``, and ``return_attn_probs=True``, which
    returns ``(out, lse, None)`` (the probabilities are never materialized)."""
    is_causal, softcap, deterministic, return_lse, softmax_scale, probs = normalize_call(
        is_causal, softcap, deterministic, return_lse, softmax_scale, scale, return_attn_probs)
    if probs:
        out, lse = flash_dmattn_func(query, key, value, attn_mask, attn_bias, softmax_scale,
                                     is_causal, window_size, softcap, sparse_mask, True,
                                     deterministic, backend)
        return out, lse, None
    if _torch_autograd(query, key, value, attn_bias):
        from . import autograd

        return autograd.dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                              window_size, softcap, sparse_mask, return_lse, deterministic,
                              backend)
    pb = check_dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                     window_size, softcap, backend)
    _check_flags(return_lse, deterministic)
    _check_sparse(sparse_mask, pb)
    if edge.is_empty_dense(pb.batch, pb.seqlen_q, pb.seqlen_k):
        return edge.empty_forward(query, (pb.batch, pb.heads, pb.seqlen_q), return_lse)
    if pb.backend == "reference":
        out, lse = reference.dense_forward(
            to_numpy_f64(query), to_numpy_f64(key), to_numpy_f64(value), to_numpy_f64(attn_mask),
            to_numpy_f64(attn_bias), pb.scale, pb.softcap, pb.window,
            None if sparse_mask is None else sparse_mask.to_dense())
        res = from_numpy_like(out, query)
        return (res, lse_like(lse, query)) if return_lse else res
    block_mask = None
    if sparse_mask is not None:
        # Parametric masks become the kernel's window (zero bytes, tiles classed by formula);
        # a block mask travels as per-row block lists.
        win, block_mask = split_sparse(sparse_mask)
        pb = dataclasses.replace(pb, window=(bound_min(pb.window[0], win[0]),
                                             bound_min(pb.window[1], win[1])))
    from .launch import run_forward

    out, lse = run_forward(pb, query, return_lse=return_lse, sparse=block_mask)
    return (out, lse) if return_lse else out


def flash_dmattn_varlen_func(query: Any, key: Any, value: Any, cu_seqlens_q: Any,
                             cu_seqlens_k: Any, max_seqlen_q: int, max_seqlen_k: int,
                             attn_mask: Any = None, attn_bias: Any = None,
                             softmax_scale: float | None = None, is_causal: bool = False,
                             window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                             return_lse: bool = False, deterministic: bool = False,
                             backend: str = "auto", *, scale: float | None = None,
                             return_attn_probs: bool | None = None) -> Any:
    """Packed variable-length attention; mask/bias query-based (3-D) or key-based (2-D).

    Accepts the same flash-dmattn 1.x spellings as ``flash_dmattn_func``."""
    is_causal, softcap, deterministic, return_lse, softmax_scale, probs = normalize_call(
        is_causal, softcap, deterministic, return_lse, softmax_scale, scale, return_attn_probs)
    if probs:
        out, lse = flash_dmattn_varlen_func(
            query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
            attn_bias, softmax_scale, is_causal, window_size, softcap, True, deterministic,
            backend)
        return out, lse, None
    if _torch_autograd(query, key, value, attn_bias):
        from . import autograd

        return autograd.varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, attn_mask, attn_bias, softmax_scale, is_causal,
                               window_size, softcap, return_lse, deterministic, backend)
    pb = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      attn_mask, attn_bias, softmax_scale, is_causal, window_size, softcap,
                      backend)
    _check_flags(return_lse, deterministic)
    if pb.total_q == 0 or pb.total_k == 0:
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
    from .launch import run_forward

    out, lse = run_forward(pb, query, cu_seqlens_q, cu_seqlens_k, return_lse=return_lse)
    return (out, lse) if return_lse else out


def flash_dmattn_func_auto(backend: str | None = None) -> Callable[..., Any]:
    """``flash_dmattn_func`` with ``backend`` bound (None keeps per-call "auto" dispatch)."""
    if backend is None:
        return flash_dmattn_func
    if backend not in ("auto", "cuda", "reference"):
        raise ValueError(f"backend must be None, 'auto', 'cuda' or 'reference', got {backend!r}")

    def bound(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backend", backend)
        return flash_dmattn_func(*args, **kwargs)

    bound.__name__ = f"flash_dmattn_func[{backend}]"
    return bound

