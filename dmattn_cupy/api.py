"""Public forward functions. A GPU call whose signature was seen before takes the thin path
(``fastpath``: its cached plan, pointers patched, a block sparse mask's list pointers too);
otherwise torch calls that want a gradient go through ``autograd`` and every other call is
validated and run on its backend by ``dispatch``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import autograd, dispatch, fastpath
from .masks import SparseMask
from .sparse_plan import diagonal_window, tighter_window
from .validate import INT32_MAX, normalize_call


def _fold_parametric(sparse_mask: Any, query: Any, key: Any, window_size: Any) -> tuple[Any, Any]:
    """(window_size, sparse_mask) for the thin path: a parametric mask (causal, window,
    causal-window, or an ``&`` of them) folded into the window as the kernels see it anyway
    (sparse_plan.split_sparse), so that the call is served like ``is_causal``; unchanged for
    any other mask, a window that is not a pair of ints in [-1, 2**31 - 1], or a mask whose
    (seqlen_q, seqlen_k) are not the 4-D inputs' (the validated path reports those). A call
    the thin path misses goes on unfolded (the reference backend applies the mask itself)."""
    if sparse_mask is None or type(window_size) is not tuple or len(window_size) != 2 \
            or not all(type(w) is int and -1 <= w <= INT32_MAX for w in window_size):
        return window_size, sparse_mask
    win = diagonal_window(sparse_mask) if isinstance(sparse_mask, SparseMask) else None
    shape_q, shape_k = getattr(query, "shape", None), getattr(key, "shape", None)
    if win is None or shape_q is None or shape_k is None or len(shape_q) != 4 \
            or len(shape_k) != 4 \
            or (sparse_mask.seqlen_q, sparse_mask.seqlen_k) != (shape_q[1], shape_k[1]):
        return window_size, sparse_mask
    return tighter_window(window_size, win), None


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
    if scale is None and return_attn_probs is None:
        window, rest = _fold_parametric(sparse_mask, query, key, window_size)
        res = fastpath.dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                             window, softcap, return_lse, deterministic, backend, rest)
        if res is not fastpath.MISS:
            return res
    is_causal, softcap, deterministic, return_lse, softmax_scale, probs = normalize_call(
        is_causal, softcap, deterministic, return_lse, softmax_scale, scale, return_attn_probs)
    if probs:
        out, lse = flash_dmattn_func(query, key, value, attn_mask, attn_bias, softmax_scale,
                                     is_causal, window_size, softcap, sparse_mask, True,
                                     deterministic, backend)
        return out, lse, None
    run = autograd.dense if autograd.wants_autograd(query, key, value, attn_bias) else \
        dispatch.dense
    return run(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal, window_size,
               softcap, sparse_mask, return_lse, deterministic, backend)


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
    if scale is None and return_attn_probs is None:
        res = fastpath.varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, attn_mask, attn_bias, softmax_scale, is_causal,
                              window_size, softcap, return_lse, deterministic, backend)
        if res is not fastpath.MISS:
            return res
    is_causal, softcap, deterministic, return_lse, softmax_scale, probs = normalize_call(
        is_causal, softcap, deterministic, return_lse, softmax_scale, scale, return_attn_probs)
    if probs:
        out, lse = flash_dmattn_varlen_func(
            query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
            attn_bias, softmax_scale, is_causal, window_size, softcap, True, deterministic,
            backend)
        return out, lse, None
    run = autograd.varlen if autograd.wants_autograd(query, key, value, attn_bias) else \
        dispatch.varlen
    return run(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
               attn_mask, attn_bias, softmax_scale, is_causal, window_size, softcap, return_lse,
               deterministic, backend)


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
