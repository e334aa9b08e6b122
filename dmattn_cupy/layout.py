"""Strides, offsets and broadcasting turned into the runtime fields of ``FwdParams``.

Pure Python/NumPy: a ``Problem`` plus output pointers in, a filled params record out. A mask or
bias dimension of size 1 gets stride 0, whatever stride its array reports, so broadcast views
are read in place. Varlen mask/bias layouts are told apart by ndim (3-D query-based, 2-D
key-based) and mapped onto the same four strides plus per-sequence start strides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .arrays import ArrayInfo
from .params import new_fwd_params
from .validate import Problem

LOG2E = 1.4426950408889634
FWD_INPUTS = ("q", "k", "v", "mask", "bias", "cu_q", "cu_k")  # a forward plan's inputs, in order
# a KV-cache plan's inputs (k, v: the caches; k_new, v_new: the appended rows), in order
KV_INPUTS = FWD_INPUTS + ("cache_seqlens", "block_table", "k_new", "v_new")
# a block-sparse forward plan's further inputs: the list arrays (source = FwdParams field)
SPARSE_INPUTS = ("sp_full_count", "sp_full_idx", "sp_partial_count", "sp_partial_idx",
                 "sp_partial_slot", "sp_partial_bits")
_POINTER_FIELD = {"q": "q", "k": "k", "v": "v", "mask": "mask", "bias": "bias",
                  "cu_q": "cu_seqlens_q", "cu_k": "cu_seqlens_k", "out": "o", "lse": "lse"}


@dataclass(frozen=True)
class TensorStrides:
    """Element strides of a (possibly broadcast) mask/bias seen as (batch, head, row, col),
    plus the strides that multiply a varlen sequence's first query / key index."""
    batch: int
    head: int
    row: int
    col: int
    qseq: int = 0
    kseq: int = 0


def _bcast(size: int, stride: int) -> int:
    return 0 if size == 1 else stride


def mask_bias_strides(info: ArrayInfo, varlen: bool) -> TensorStrides:
    if not varlen:
        s = tuple(_bcast(n, st) for n, st in zip(info.shape, info.strides, strict=True))
        return TensorStrides(*s)
    if info.ndim == 3:  # query-based (total_q, h', max_k): row t = q_start + i
        row = _bcast(info.shape[0], info.strides[0])
        return TensorStrides(0, _bcast(info.shape[1], info.strides[1]), row,
                             _bcast(info.shape[2], info.strides[2]), qseq=row, kseq=0)
    # key-based (total_k, h'): stride 0 over queries, column j = k_start + j
    col = _bcast(info.shape[0], info.strides[0])
    return TensorStrides(0, _bcast(info.shape[1], info.strides[1]), 0, col, qseq=0, kseq=col)


def head_ratio(heads: int, info: ArrayInfo | None, varlen: bool) -> int:
    """Query heads per mask/bias head (mask head = h // ratio); 1-head tensors use stride 0."""
    if info is None:
        return 1
    n = info.shape[1]
    return heads // n if n > 1 else heads


def qkv_strides(info: ArrayInfo, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) element strides; varlen tensors have no batch dimension."""
    if varlen:
        return 0, info.strides[0], info.strides[1]
    return info.strides[0], info.strides[1], info.strides[2]


def build_fwd_params(pb: Problem, out: ArrayInfo, lse_ptr: int, cu_q_ptr: int = 0,
                     cu_k_ptr: int = 0, counters_ptr: int = 0) -> np.ndarray:
    """A one-element FwdParams record for ``pb``; ``out`` has the layout of the query."""
    rec = new_fwd_params()
    r = rec[0]
    r["q"], r["k"], r["v"], r["o"] = pb.q.ptr, pb.k.ptr, pb.v.ptr, out.ptr
    r["lse"] = lse_ptr
    r["cu_seqlens_q"], r["cu_seqlens_k"] = cu_q_ptr, cu_k_ptr
    r["tile_counters"] = counters_ptr
    for name, info in (("q", pb.q), ("k", pb.k), ("v", pb.v), ("o", out)):
        bs, rs, hs = qkv_strides(info, pb.varlen)
        r[f"{name}_batch_stride"], r[f"{name}_row_stride"], r[f"{name}_head_stride"] = bs, rs, hs
    if pb.varlen:  # lse (H, total_q)
        r["lse_batch_stride"], r["lse_head_stride"] = 0, pb.total_q
    else:          # lse (B, H, Sq)
        r["lse_batch_stride"], r["lse_head_stride"] = pb.heads * pb.seqlen_q, pb.seqlen_q
    for name, info in (("mask", pb.mask), ("bias", pb.bias)):
        if info is None:
            continue
        r[name] = info.ptr
        st = mask_bias_strides(info, pb.varlen)
        for field in ("batch", "head", "row", "col", "qseq", "kseq"):
            r[f"{name}_{field}_stride"] = getattr(st, field)
    r["batch"], r["heads"], r["kv_heads"] = pb.batch, pb.heads, pb.kv_heads
    r["seqlen_q"], r["seqlen_k"], r["head_dim"] = pb.seqlen_q, pb.seqlen_k, pb.head_dim
    r["q_per_kv"] = pb.heads // pb.kv_heads
    r["mask_head_ratio"] = head_ratio(pb.heads, pb.mask, pb.varlen)
    r["bias_head_ratio"] = head_ratio(pb.heads, pb.bias, pb.varlen)
    r["window_left"], r["window_right"] = pb.window
    r["bias_is_fp32"] = int(pb.bias is not None and pb.bias.dtype == "float32")
    r["scale_log2"] = pb.scale * LOG2E
    r["softcap"] = pb.softcap
    r["scale_over_softcap"] = pb.scale / pb.softcap if pb.softcap > 0 else 0.0
    return rec


def fwd_pointer_fields(pb: Problem, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """(source, FwdParams field) of every pointer a call with ``pb``'s signature passes: the
    inputs the problem has, then ``names`` (the outputs: out, lse)."""
    present = {"q": True, "k": True, "v": True, "mask": pb.mask is not None,
               "bias": pb.bias is not None, "cu_q": pb.varlen, "cu_k": pb.varlen}
    return [(n, _POINTER_FIELD[n]) for n in FWD_INPUTS if present[n]] + \
        [(n, _POINTER_FIELD[n]) for n in names]


def num_m_blocks(seqlen_q: int, block_m: int) -> int:
    return max(1, math.ceil(seqlen_q / block_m))
