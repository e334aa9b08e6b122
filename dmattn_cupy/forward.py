"""The forward family's host half: plan, params record and launch on the caller's stream.

``run_forward`` takes a validated ``Problem``: short queries go to the decode path
(``decode``), everything else to the family ``select.forward`` picks for the device. Launches
take the params record by value and never synchronize.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import arrays, decode, env, runtime
from .arrays import describe
from .families import padded_head_dim, sparse_supported
from .layout import build_fwd_params
from .masks import SparseMask
from .select import forward as select_forward
from .sparse_plan import (
    SparseArrays,
    block_size_of,
    check_block_fits,
    device_lists,
    sparse_fields,
)
from .spec import KernelSpec
from .validate import Problem, check_cu_seqlens_values


def rows_aligned(pb: Problem, out_strides: tuple[int, ...] | None = None) -> bool:
    """q/k/v (and out) pointers 16-byte aligned and every non-last stride a multiple of 8."""
    infos = (pb.q, pb.k, pb.v)
    ok = all(i.ptr % 16 == 0 and all(st % 8 == 0 for st in i.strides[:-1]) for i in infos)
    return ok and (out_strides is None or all(st % 8 == 0 for st in out_strides[:-1]))


def select_fwd_spec(pb: Problem, debug_counters: bool = False,
                    sparse: bool | tuple[int, int] = False) -> KernelSpec:
    """The forward specialization for ``pb`` on the problem's own device (``sparse``: block
    lists, of this (block_m, block_n) when known)."""
    return select_forward(pb, runtime.device_props(pb.q.device), sparse=sparse,
                          debug_counters=debug_counters)


def _ptr(a: Any) -> int:
    return describe(a).ptr if a is not None else 0


def run_forward(pb: Problem, query: Any, cu_q: Any = None, cu_k: Any = None,
                return_lse: bool = True, tile_counters: Any = None,
                sparse: SparseMask | SparseArrays | None = None) -> tuple[Any, Any]:
    """Launch the forward kernel; returns (out, lse) in the query's library and device.
    ``sparse``: a block mask, or its lists already on the query's device."""
    if pb.varlen and env.check_enabled():
        check_cu_seqlens_values(arrays.to_host(cu_q), arrays.to_host(cu_k), pb.total_q,
                                pb.total_k, pb.seqlen_q, pb.seqlen_k)
    out = arrays.empty(query, pb.q.shape)
    lse_shape = (pb.heads, pb.total_q) if pb.varlen else (pb.batch, pb.heads, pb.seqlen_q)
    lse = arrays.empty(query, lse_shape, "float32") if return_lse else None
    if out.size == 0 or (not pb.varlen and pb.seqlen_q == 0):
        return out, lse
    if sparse is not None and not sparse_supported(padded_head_dim(pb.head_dim),
                                                   pb.mask is not None, pb.bias is not None):
        raise NotImplementedError(
            "block-sparse masks together with attn_mask need head dim <= 192 on the CUDA "
            "backend; use backend='reference' or pass sparse_mask.to_dense() & attn_mask as "
            "attn_mask")
    stream = runtime.current_stream(pb.kind, pb.q.device)
    keep_alive: list[Any] = []  # buffers the launch reads: alive until this function returns
    if not rows_aligned(pb, describe(out).strides):  # kernels read 16-byte rows: copy once
        infos = {}
        for name in ("q", "k", "v"):
            buf, infos[name] = arrays.strided_copy(getattr(pb, name), stream)
            keep_alive.append(buf)
        pb = dataclasses.replace(pb, **infos)
    if sparse is None and tile_counters is None and pb.batch > 0 and decode.use_decode(pb):
        decode.run_decode(pb, query, out, lse, cu_q, cu_k, stream)  # GQA packing + split-KV
        return out, lse
    spec = select_fwd_spec(pb, debug_counters=tile_counters is not None,
                           sparse=block_size_of(sparse))
    rec = build_fwd_params(pb, describe(out), _ptr(lse), _ptr(cu_q), _ptr(cu_k),
                           _ptr(tile_counters))
    if sparse is not None:
        arrs = sparse if isinstance(sparse, SparseArrays) else device_lists(sparse, query)
        check_block_fits((arrs.block_m, arrs.block_n), spec)
        for field in ("full_count", "full_idx", "partial_count", "partial_idx", "partial_slot",
                      "partial_bits"):
            rec[0][f"sp_{field}"] = _ptr(getattr(arrs, field))
        for name, value in sparse_fields(arrs).items():
            rec[0][name] = value
    kernel = runtime.get_kernel(spec, pb.q.device)
    if pb.batch == 0:
        return out, lse
    grid = spec.row.grid(pb, spec)
    args = (rec[0], *spec.row.extra_args(pb, describe(out), spec))
    runtime.launch(kernel, grid, args, stream)
    return out, lse
