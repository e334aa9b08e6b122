"""Results of calls with nothing to compute: no batch, query heads or queries, or no keys.

As SDPA and FlashAttention do, ``B == 0``, ``H == 0`` or ``Sq == 0`` (varlen:
``total_q == 0``) gives empty outputs and lse; ``Sk == 0`` (varlen: ``total_k == 0``) gives
``out = 0`` and ``lse = -inf`` (every row has no allowed key). Gradients are zeros of each
input's shape (empty where the input is). The arrays are made in the query's library, on its
device (no host round trip).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import array_kind


def full_like_kind(shape: tuple[int, ...], like: Any, value: float = 0.0,
                   dtype: str | None = None) -> Any:
    """A new array of ``shape`` filled with ``value``, of ``like``'s kind and device, in
    ``dtype`` (a name such as "float32"; default: ``like``'s dtype)."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        dt = like.dtype if dtype is None else getattr(torch, dtype)
        return torch.full(shape, value, dtype=dt, device=like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.full(shape, value, dtype=like.dtype if dtype is None else dtype)
    return np.full(shape, value, dtype=like.dtype if dtype is None else dtype)


def nothing_to_compute(pb: Any) -> bool:
    """Whether validated problem ``pb`` (validate.Problem) launches nothing: no batch, query
    heads, queries or keys (dense: per sequence; varlen: in total)."""
    if pb.heads == 0:
        return True
    if pb.varlen:
        return pb.total_q == 0 or pb.total_k == 0
    return pb.batch == 0 or pb.seqlen_q == 0 or pb.seqlen_k == 0


def empty_forward(query: Any, lse_shape: tuple[int, ...], return_lse: bool) -> Any:
    """``out`` zeros of the query's shape (empty when it is) and ``lse`` = -inf."""
    out = full_like_kind(tuple(query.shape), query, 0.0)
    if not return_lse:
        return out
    return out, full_like_kind(lse_shape, query, -np.inf, "float32")


def zero_grads(query: Any, key: Any, value: Any, attn_bias: Any,
               bias_grad: bool) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dbias) zeros: what the backward of a call with no query or no key gives."""
    def zeros(x: Any) -> Any:
        return full_like_kind(tuple(x.shape), x, 0.0)

    db = zeros(attn_bias) if attn_bias is not None and bias_grad else None
    return zeros(query), zeros(key), zeros(value), db
