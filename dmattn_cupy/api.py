"""Public forward functions: torch calls that want a gradient go through ``autograd``; every
other call is validated and run on its backend by ``dispatch``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import autograd, dispatch
from .masks import SparseMask


def flash_dmattn_func(query: Any, key: Any, value: Any, attn_mask: Any = None,
                      attn_bias: Any = None, softmax_scale: float | None = None,
                      is_causal: bool = False, window_size: tuple[int, int] = (-1, -1),
                      softcap: float = 0.0, sparse_mask: SparseMask | None = None,
                      return_lse: bool = False, deterministic: bool = False,
                      backend: str = "auto") -> Any:
    """Dense attention with mask/bias broadcasting; see API.md for the exact semantics."""
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
                             backend: str = "auto") -> Any:
    """Packed variable-length attention; mask/bias query-based (3-D) or key-based (2-D)."""
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
