"""Public functional backward: ``flash_dmattn_backward`` / ``flash_dmattn_varlen_backward``.

For CuPy (or any) users who run the forward with ``return_lse=True`` and hold ``out`` and
``lse``; torch users get the same kernels through autograd (``autograd.py``). NumPy inputs run
the float64 reference (``reference_bwd``); GPU inputs the CUDA kernels (``backward``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import arrays, edge, fastpath, reference_bwd
from .arrays import common_kind, describe, from_numpy_like, to_numpy_f64
from .backward import run_backward
from .masks import SparseMask
from .sparse_plan import fold_backward
from .validate import (
    check_cu_seqlens_values,
    check_dense,
    check_flag,
    check_flags,
    check_sparse,
    check_varlen,
    normalize_call,
)


def _check_like(name: str, x: Any, shape: tuple[int, ...]) -> None:
    if x is None:
        raise TypeError(f"{name} is required, got None")
    info = describe(x)
    if tuple(info.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {info.shape}")


def _check_lse(name: str, x: Any, shape: tuple[int, ...], required: bool = True) -> None:
    if x is None and not required:
        return
    _check_like(name, x, shape)
    if describe(x).dtype not in ("float32", "float64"):
        raise TypeError(f"{name} must be float32 (as the forward returns it), got "
                        f"{describe(x).dtype}")


def flash_dmattn_backward(dout: Any, query: Any, key: Any, value: Any, out: Any, lse: Any,
                          attn_mask: Any = None, attn_bias: Any = None,
                          softmax_scale: float | None = None, is_causal: bool = False,
                          window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                          sparse_mask: SparseMask | None = None, deterministic: bool = False,
                          backend: str = "auto", dlse: Any = None,
                          bias_grad: bool = True) -> tuple[Any, Any, Any, Any]:
    """Gradients of ``flash_dmattn_func``: returns ``(dq, dk, dv, dbias)``, ``dbias`` in the
    bias's own (broadcast) shape, or None without a bias (or with ``bias_grad=False``: the bias
    then shapes the probabilities but its gradient is not computed). ``out``/``lse`` come from
    the forward (``return_lse=True``); ``dlse`` is an optional incoming gradient of ``lse``."""
    bkey = None
    if sparse_mask is None:  # the thin path: a signature seen before reuses its plan
        bkey = fastpath.functional_backward_key(
            dout, query, key, value, out, lse, None, None, None, None, attn_mask, attn_bias,
            softmax_scale, is_causal, window_size, softcap, deterministic, backend, dlse,
            bias_grad)
        res = fastpath.functional_backward(bkey, dout, query, key, value, out, lse, None, None,
                                           attn_mask, attn_bias, dlse)
        if res is not fastpath.MISS:
            return res
    is_causal, softcap, deterministic, _, _, _ = normalize_call(is_causal, softcap, deterministic,
                                                                False)
    bias_grad = check_flag("bias_grad", bias_grad, None)
    common_kind({"dout": dout, "query": query, "out": out, "lse": lse, "dlse": dlse})
    pb = check_dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                     window_size, softcap, backend)
    check_flags(False, deterministic)
    check_sparse(sparse_mask, pb)
    _check_like("dout", dout, pb.q.shape)
    _check_like("out", out, pb.q.shape)
    _check_lse("lse", lse, (pb.batch, pb.heads, pb.seqlen_q))
    _check_lse("dlse", dlse, (pb.batch, pb.heads, pb.seqlen_q), required=False)
    if edge.nothing_to_compute(pb):
        return edge.zero_grads(query, key, value, attn_bias, bias_grad)
    if pb.backend == "reference":
        dq, dk, dv, db = reference_bwd.dense_backward(
            to_numpy_f64(query), to_numpy_f64(key), to_numpy_f64(value), to_numpy_f64(attn_mask),
            to_numpy_f64(attn_bias), to_numpy_f64(dout), pb.scale, pb.softcap, pb.window,
            None if sparse_mask is None else sparse_mask.to_dense(), to_numpy_f64(dlse))
        return (from_numpy_like(dq, query), from_numpy_like(dk, key), from_numpy_like(dv, value),
                None if db is None or not bias_grad else from_numpy_like(db, attn_bias))
    pb, mask, sparse = fold_backward(sparse_mask, pb, attn_mask, query)
    if mask is not None:
        # built here from the validated mask: (B|1, H|1, Sq, Sk) bool on the query's device
        pb = dataclasses.replace(pb, mask=describe(mask))
    if sparse is None and mask is None:
        return fastpath.build_functional_backward(bkey, pb, dout, query, key, value, out, lse,
                                                  None, None, dlse, deterministic,
                                                  bias_grad and attn_bias is not None)
    return run_backward(pb, arrays.cast(dout, pb.dtype), query, key, value,
                        arrays.cast(out, pb.dtype), lse, dlse=dlse, deterministic=deterministic,
                        need_dbias=bias_grad and attn_bias is not None, sparse=sparse)


def flash_dmattn_varlen_backward(dout: Any, query: Any, key: Any, value: Any, out: Any, lse: Any,
                                 cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: int,
                                 max_seqlen_k: int, attn_mask: Any = None, attn_bias: Any = None,
                                 softmax_scale: float | None = None, is_causal: bool = False,
                                 window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                                 deterministic: bool = False, backend: str = "auto",
                                 dlse: Any = None,
                                 bias_grad: bool = True) -> tuple[Any, Any, Any, Any]:
    """Gradients of ``flash_dmattn_varlen_func`` (``lse`` is ``(H, total_q)``)."""
    bkey = fastpath.functional_backward_key(
        dout, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, attn_mask, attn_bias, softmax_scale, is_causal, window_size, softcap,
        deterministic, backend, dlse, bias_grad)
    res = fastpath.functional_backward(bkey, dout, query, key, value, out, lse, cu_seqlens_q,
                                       cu_seqlens_k, attn_mask, attn_bias, dlse)
    if res is not fastpath.MISS:
        return res
    is_causal, softcap, deterministic, _, _, _ = normalize_call(is_causal, softcap, deterministic,
                                                                False)
    bias_grad = check_flag("bias_grad", bias_grad, None)
    common_kind({"dout": dout, "query": query, "out": out, "lse": lse, "dlse": dlse})
    pb = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      attn_mask, attn_bias, softmax_scale, is_causal, window_size, softcap,
                      backend)
    check_flags(False, deterministic)
    _check_like("dout", dout, pb.q.shape)
    _check_like("out", out, pb.q.shape)
    _check_lse("lse", lse, (pb.heads, pb.total_q))
    _check_lse("dlse", dlse, (pb.heads, pb.total_q), required=False)
    if edge.nothing_to_compute(pb):
        return edge.zero_grads(query, key, value, attn_bias, bias_grad)
    if pb.backend == "reference":
        cu_q = np.asarray(to_numpy_f64(cu_seqlens_q)).astype(np.int64)
        cu_k = np.asarray(to_numpy_f64(cu_seqlens_k)).astype(np.int64)
        check_cu_seqlens_values(cu_q, cu_k, pb.total_q, pb.total_k, pb.seqlen_q, pb.seqlen_k)
        dq, dk, dv, db = reference_bwd.varlen_backward(
            to_numpy_f64(query), to_numpy_f64(key), to_numpy_f64(value), cu_q, cu_k,
            to_numpy_f64(attn_mask), to_numpy_f64(attn_bias), to_numpy_f64(dout), pb.scale,
            pb.softcap, pb.window, to_numpy_f64(dlse))
        return (from_numpy_like(dq, query), from_numpy_like(dk, key), from_numpy_like(dv, value),
                None if db is None or not bias_grad else from_numpy_like(db, attn_bias))
    return fastpath.build_functional_backward(bkey, pb, dout, query, key, value, out, lse,
                                              cu_seqlens_q, cu_seqlens_k, dlse, deterministic,
                                              bias_grad and attn_bias is not None)
