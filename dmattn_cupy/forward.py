"""The forward family's host half: plan, params record and launch on the caller's stream.

``run_forward`` takes a validated ``Problem``: short queries go to the decode path
(``decode``), everything else to the family ``select.forward`` picks for the device. Launches
take the params record by value and never synchronize.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from . import arrays, decode, env, forward_sm90, mask_pack, row_bias, row_pad, runtime
from .arrays import ArrayInfo, describe
from .launch_plan import Alloc, Launch, Plan, RowCopy
from .layout import FWD_INPUTS, SPARSE_INPUTS, build_fwd_params, fwd_pointer_fields
from .masks import SparseMask
from .select import forward as select_forward
from .select import forward_order_spec
from .sparse_plan import (
    SparseArrays,
    block_size_of,
    check_block_fits,
    check_partial_words,
    device_lists,
    forward_takes_lists,
    sparse_fields,
)
from .spec import KernelSpec
from .validate import Problem, check_cu_seqlens_values


def rows_aligned(pb: Problem, out_strides: tuple[int, ...] | None = None) -> bool:
    """q/k/v (and out) pointers 16-byte aligned and every non-last stride a multiple of 8."""
    infos = (pb.q, pb.k, pb.v)
    ok = all(i.ptr % 16 == 0 and all(st % 8 == 0 for st in i.strides[:-1]) for i in infos)
    return ok and (out_strides is None or all(st % 8 == 0 for st in out_strides[:-1]))


def _tma_rows(info: ArrayInfo) -> bool:
    """Whether a mask/bias already has what a tensor map needs of its layout: a 16-byte
    aligned start, unit key stride and every other stepped stride a 16-byte multiple."""
    item = arrays.ITEM_BYTES.get(info.dtype, 0)
    return (item > 0 and info.ptr % 16 == 0 and (info.strides[-1] == 1 or info.shape[-1] == 1)
            and all((st * item) % 16 == 0
                    for n, st in zip(info.shape[:-1], info.strides[:-1], strict=True) if n > 1))


def operands_to_pad(pb: Problem, sparse: bool | tuple[int, int] = False) -> tuple[str, ...]:
    """The mask/bias operands to copy into 16-byte aligned rows (``row_pad``, or
    ``arrays.padded_copy`` where rows are not equally spaced):
    those whose layout alone keeps the problem off the sm_90a family (rows of Sk bytes or
    values that are not 16-byte multiples, a misaligned view; e.g. a (B, 1, Sq, Sk) bool mask
    at an odd Sk). One pass over the operand (the mask: Sq * Sk bytes per batch) costs a few
    percent of the attention; the portable family runs such problems ~3x slower."""
    names = tuple(n for n in ("mask", "bias")
                  if getattr(pb, n) is not None and not _tma_rows(getattr(pb, n)))
    if not names or pb.kind == "numpy":
        return ()
    dev = runtime.device_props(pb.q.device)
    if select_forward(pb, dev, sparse=sparse).family == "fwd_sm90":
        return ()
    trial = padded_problem(pb, names)
    return names if select_forward(trial, dev, sparse=sparse).family == "fwd_sm90" else ()


def padded_problem(pb: Problem, names: tuple[str, ...]) -> Problem:
    """``pb`` with the named operands described as ``arrays.padded_buffer`` lays them out (at
    an aligned placeholder address until copied): what the selector sees after the copies."""
    return dataclasses.replace(pb, **{n: dataclasses.replace(
        arrays.padded_rows(getattr(pb, n)), ptr=1 << 20) for n in names})


def collapsed_broadcasts(pb: Problem) -> Problem:
    """``pb`` with its mask/bias's expanded dimensions (stride 0) described as size 1 (the same
    problem; a tensor map can read that layout)."""
    infos = {n: arrays.collapse_broadcast(getattr(pb, n)) for n in ("mask", "bias")
             if getattr(pb, n) is not None}
    return dataclasses.replace(pb, **infos) if infos else pb


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
    out, lse, _ = forward_call(pb, query, cu_q, cu_k, return_lse, tile_counters, sparse)
    return out, lse


def forward_call(pb: Problem, query: Any, cu_q: Any = None, cu_k: Any = None,
                 return_lse: bool = True, tile_counters: Any = None,
                 sparse: SparseMask | SparseArrays | None = None
                 ) -> tuple[Any, Any, Plan | None]:
    """``run_forward``, also returning the plan it launched (None when nothing launched).
    The plan is cacheable when a later call with the same signature (shapes, strides, dtypes,
    pointer alignment, flags, device, environment) would build the same one: no input copies,
    no debug counters, no device-side checks. Block lists are further inputs of the plan
    (``SPARSE_INPUTS``, 0 for an absent array): a caller that caches it must key their
    shapes, dtypes and block size and supply their pointers on every call."""
    check = pb.varlen and env.check_enabled()
    if check:
        check_cu_seqlens_values(arrays.to_host(cu_q), arrays.to_host(cu_k), pb.total_q,
                                pb.total_k, pb.seqlen_q, pb.seqlen_k)
    out = arrays.empty(query, pb.q.shape)
    lse_shape = (pb.heads, pb.total_q) if pb.varlen else (pb.batch, pb.heads, pb.seqlen_q)
    lse = arrays.empty(query, lse_shape, "float32") if return_lse else None
    if math.prod(pb.q.shape) == 0:   # no batch, query or head: nothing to launch
        return out, lse, None
    if sparse is not None and not forward_takes_lists(pb.head_dim, pb.mask is not None):
        # (the public calls AND such a mask's dense form into attn_mask first: dispatch.dense)
        raise NotImplementedError(
            "block-sparse masks together with attn_mask need head dim <= 192 on the CUDA "
            "backend; use backend='reference' or pass sparse_mask.to_dense() & attn_mask as "
            "attn_mask")
    stream = runtime.current_stream(pb.kind, pb.q.device)
    keep_alive: list[Any] = []  # buffers the launch reads: alive until this function returns
    out_info = describe(out)
    copied = not rows_aligned(pb, out_info.strides)
    if copied:  # kernels read 16-byte rows: copy once
        infos = {}
        for name in ("q", "k", "v"):
            buf, infos[name] = arrays.strided_copy(getattr(pb, name), stream, query)
            keep_alive.append(buf)
        pb = dataclasses.replace(pb, **infos)
    allocs = [Alloc("out", pb.q.shape, None)]
    if return_lse:
        allocs.append(Alloc("lse", lse_shape, "float32"))
    out_names = tuple(a.name for a in allocs)  # the outputs' pointer fields (allocs grows)
    plan = Plan(device=pb.q.device,
                inputs=FWD_INPUTS if sparse is None else FWD_INPUTS + SPARSE_INPUTS,
                allocs=allocs, cacheable=not (copied or check or tile_counters is not None))
    if sparse is None and tile_counters is None and pb.batch > 0 and decode.use_decode(pb):
        # GQA packing + split-KV
        keep_alive.append(decode.plan_decode(pb, plan, query, out_info, _ptr(lse), _ptr(cu_q),
                                             _ptr(cu_k), stream))
        plan.run(stream)
        return out, lse, plan
    pb = collapsed_broadcasts(pb)
    shifted = None   # the problem with its bias, where the bias is an lse shift after the forward
    if tile_counters is None and \
            row_bias.shifts_bias(pb, runtime.device_props(pb.q.device), block_size_of(sparse)):
        shifted, pb = pb, dataclasses.replace(pb, bias=None)
        if lse is None:   # the shift reads the forward's lse: made for it (not returned)
            lse = arrays.empty(query, lse_shape, "float32")
            plan.allocs.append(Alloc("lse", lse_shape, "float32"))
            out_names = (*out_names, "lse")
    # attn_mask packed by the forward's own pack warps (its bias spec, no mask tiles)
    packed = sparse is None and tile_counters is None and \
        mask_pack.packs_in_forward(pb, runtime.device_props(pb.q.device))
    ready = None   # the overlapped packing's ready words (mask_pack.overlaps)
    if sparse is None and tile_counters is None and not packed and \
            mask_pack.routes_mask(pb, runtime.device_props(pb.q.device)):
        # attn_mask as block lists packed in this call (the plan's first launches)
        overlap = mask_pack.overlaps(pb, runtime.device_props(pb.q.device))
        sparse, ready = mask_pack.plan_lists(plan, pb.mask, query, keep_alive,
                                             stream.ptr if overlap else None)
        pb = dataclasses.replace(pb, mask=None)
    # Operands the Hopper family's maps read once their rows are 16-byte aligned: copied here;
    # a cached plan repeats a pitched copy (RowCopy) into a buffer it allocates per call.
    renames: dict[str, str] = {}
    pads = operands_to_pad(pb, block_size_of(sparse))
    if pads:
        infos = {}
        for name in pads:
            info = getattr(pb, name)
            pitched = arrays.row_copy(info)
            if pitched is None:  # rows not equally spaced: element by element, never cached
                buf, infos[name] = arrays.padded_copy(info, stream, query)
                keep_alive.append(buf)
                plan.cacheable = False
                continue
            buf, infos[name] = arrays.padded_buffer(info, stream, query)
            keep_alive.append(buf)
            width, rows, src_pitch, dst_pitch = pitched
            row_pad.copy_rows(info.device, infos[name].ptr, dst_pitch, info.ptr, src_pitch,
                              width, rows, stream.ptr)
            renames[name] = name + "_rows"
            plan.allocs.append(Alloc(renames[name], (arrays.padded_bytes(info),), "uint8"))
            plan.copies.append(RowCopy(name, renames[name], *pitched))
        pb = dataclasses.replace(pb, **infos)
    spec = select_fwd_spec(dataclasses.replace(pb, mask=None) if packed else pb,
                           debug_counters=tile_counters is not None,
                           sparse=block_size_of(sparse))
    rec = build_fwd_params(pb, out_info, _ptr(lse), _ptr(cu_q), _ptr(cu_k),
                           _ptr(tile_counters))
    for name, field in fwd_pointer_fields(pb, out_names):
        plan.slot(renames.get(name, name), rec, field)
    if sparse is not None:
        arrs = sparse if isinstance(sparse, SparseArrays) else device_lists(sparse, query)
        check_block_fits((arrs.block_m, arrs.block_n), spec)
        check_partial_words(arrs, spec)
        for field in SPARSE_INPUTS:   # "sp_" + the SparseArrays field
            rec[0][field] = _ptr(getattr(arrs, field[3:]))
            plan.slot(field, rec, field)
        for name, value in sparse_fields(arrs).items():
            rec[0][name] = value
    kernel = runtime.get_kernel(spec, pb.q.device)
    if pb.batch == 0:
        return out, lse, None
    extra = tuple(_as_record(a) for a in spec.row.extra_args(pb, out_info, spec))
    slots = spec.row.extra_slots(pb, spec)
    if slots is None:
        plan.hooks.append(_rebuild_extra_args(pb, out_info, spec, extra))
        plan.cacheable = plan.cacheable and not renames  # the hook reads the callers' pointers
    else:
        for name, index, offset in slots:
            plan.slot_at(renames.get(name, name), extra[index], offset)
    counter = spec.row.counter_slot(spec)
    if counter is not None:  # a zero int32 word the kernel claims work items from
        index, offset = counter
        buf = plan.add_counter("item_counter", 1, pb.kind, stream.ptr, query)
        keep_alive.append(buf)
        extra[index].view(np.uint64).reshape(-1)[offset // 8] = describe(buf).ptr
        plan.slot_at("item_counter", extra[index], offset)
    if ready is not None:   # the producer waits per block row (the packing runs beside it)
        extra[0]["row_ready"] = describe(ready).ptr
        plan.slot("mask_ready", extra[0], "row_ready")
    # (the overlapped packing's rows come in the kernel's own order: no ranking launch)
    n_order = 0 if spec.family != "fwd_sm90" or ready is not None else \
        forward_sm90.item_order_items(pb.seqlen_q, pb.heads, pb.batch, pb.varlen, pb.window,
                                      sparse is not None)
    if n_order:  # block lists: the work items longest first per group, ranked by a launch first
        buf = arrays.empty(query, (n_order,), "int32")
        keep_alive.append(buf)
        extra[0]["item_order"] = describe(buf).ptr
        plan.allocs.append(Alloc("item_order", (n_order,), "int32"))
        plan.slot("item_order", extra[0], "item_order")
        plan.launches.append(Launch(
            runtime.get_kernel(forward_order_spec(), pb.q.device),
            (-(-n_order // forward_sm90.ORDER_GROUP), 1, 1), (rec, extra[0])))
    grid = spec.row.grid(pb, spec, runtime.device_props(pb.q.device).sm_count)
    if packed:   # the pack warps' bits: a tile per CTA and stage, read as a block list's
        words = mask_pack.pack_scratch_words(grid[0], spec.stages, spec.block_n)
        plan.allocs.append(Alloc("pack_bits", (words,), "float32", scratch=True))
        buf = arrays.empty(query, (words,), "float32")
        keep_alive.append(buf)
        r = rec[0]
        r["sp_partial_bits"] = describe(buf).ptr
        r["sp_block_m"], r["sp_block_n"] = forward_sm90.BLOCK_M, spec.block_n
        plan.slot("pack_bits", rec, "sp_partial_bits")
    # behind the overlapped packing: started once its CTAs are (they let it), not after them
    plan.launches.append(Launch(kernel, grid, (rec, *extra),
                                programmatic=ready is not None and env.programmatic_launches()))
    if shifted is not None:
        row_bias.add_launch(plan, dataclasses.replace(pb, bias=shifted.bias), out_info,
                            _ptr(lse), renames, out_names)
    plan.run(stream)
    return out, lse if return_lse else None, plan


def _as_record(arg: Any) -> np.ndarray:
    """A one-element record array holding ``arg`` (a record array or a structured scalar)."""
    if isinstance(arg, np.ndarray):
        return arg.reshape(1)
    rec = np.zeros(1, dtype=arg.dtype)   # zeros: padding bytes too (launches copy them)
    rec[0] = arg
    return rec


def _rebuild_extra_args(pb: Problem, out: ArrayInfo, spec: KernelSpec,
                        records: tuple[np.ndarray, ...]) -> Callable[[dict[str, int]], None]:
    """A plan hook re-making a family's extra arguments for new pointers (tensor maps the
    driver's layout does not let us patch), cached per pointer tuple."""
    names = ("q", "k", "v", "mask", "bias")

    @lru_cache(maxsize=64)
    def make(ptrs: tuple[int, ...]) -> tuple[bytes, ...]:
        infos = {n: dataclasses.replace(getattr(pb, n), ptr=p)
                 for n, p in zip(names, ptrs, strict=True) if getattr(pb, n) is not None}
        args = spec.row.extra_args(dataclasses.replace(pb, **infos), out, spec)
        return tuple(_as_record(a).tobytes() for a in args)

    def hook(ptrs: dict[str, int]) -> None:
        for rec, raw in zip(records, make(tuple(ptrs[n] for n in names)), strict=True):
            rec.view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)

    return hook
