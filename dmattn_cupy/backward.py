"""The CUDA backward pass: the launches of the backward families.

The kernels (cuda_src/sm80/bwd.cu) read one ``BwdParams`` record (``params``): a preprocess
(``dsum = rowsum(dO * O) - dlse``; zeroes dq_accum), the dK/dV kernel (per key tile and kv
head; it also writes dbias, and in the default mode adds dQ with fp32 atomics into dq_accum),
then the post kernel (dq = dq_accum cast to the query dtype, the cast torch would do); with
``deterministic=True`` a dQ kernel (per query tile) that needs no atomics writes dq instead of
the last two. ``select.backward`` picks their specs.
Where ``select.backward_family`` picks ``bwd_sm90`` (compute capability 9.0, by default),
the Hopper kernel (cuda_src/sm90/bwd.cu) replaces the dK/dV kernel after the same preprocess;
it writes dbias once per element in the bias's dtype and adds dQ into the fp32 buffer, in a
fixed order with ``deterministic=True`` (its counters share the zeroed workspace); the post
kernel follows it in both modes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from . import arrays, backward_sm90, env, row_bias, row_pad, runtime
from .arrays import ArrayInfo, describe
from .device import DeviceProps
from .launch_plan import Alloc, Launch, Plan, RowCopy
from .layout import (
    SPARSE_INPUTS,
    build_fwd_params,
    fwd_pointer_fields,
    mask_bias_strides,
    qkv_strides,
)
from .params import FWD_DTYPE, bwd_dtype_flat
from .select import backward as select_backward
from .select import backward_family, backward_order_spec, backward_sm90_spec
from .sparse_plan import SparseArrays, sparse_fields
from .validate import Problem, check_cu_seqlens_values

# Launches per backward family ("bwd_dkdv", "bwd_sm90") in this process: tests read it to
# assert which kernel ran.
launches: Counter[str] = Counter()


def _aligned(info) -> bool:
    """Rows readable with 16-byte copies: unit last stride (an expanded gradient such as the
    one of ``out.sum()`` has stride 0 there), 16-byte aligned pointer and row/head strides."""
    unit = info.shape[-1] <= 1 or info.strides[-1] == 1
    return unit and info.ptr % 16 == 0 and all(st % 8 == 0 for st in info.strides[:-1])


def _contiguous_f32(x: Any) -> Any:
    info = describe(x)
    want = tuple(int(np.prod(info.shape[i + 1:])) for i in range(len(info.shape)))
    ok = info.dtype == "float32" and all(
        st == w for st, w, n in zip(info.strides, want, info.shape, strict=True) if n > 1)
    return x if ok else arrays.contiguous_copy(x, "float32")


def dbias_mode(pb: Problem, strides, block_m: int, block_n: int) -> int:
    """How the dK/dV kernel writes dbias (see cuda_src/bwd_params.cuh): 1 when every element
    gets exactly one write, 2 when all writes to an element come from one CTA (fp32 adds in a
    fixed order), 3 when several CTAs add to one element (fp32 atomics)."""
    bias = pb.bias
    nh = bias.shape[1]
    batch_shared = not pb.varlen and bias.shape[0] == 1 and pb.batch > 1
    heads_cross = nh == 1 and pb.kv_heads > 1
    heads_shared = nh != pb.heads
    multi_q = strides.row == 0 and pb.seqlen_q > block_m
    multi_k = strides.col == 0 and pb.seqlen_k > block_n
    if not (batch_shared or heads_shared or multi_q or multi_k):
        return 1
    return 3 if (batch_shared or heads_cross or multi_k) else 2


BWD_INPUTS = ("q", "k", "v", "mask", "bias", "cu_q", "cu_k", "out", "lse", "dout", "dlse")
_BWD_POINTER_FIELD = {"dout": "dout", "dlse": "dlse", "dsum": "dsum", "dq": "dq", "dk": "dk",
                      "dv": "dv", "dbias": "dbias", "sp_grid": "sp_grid"}
_WS_ALIGN = 64   # float32 elements (256 bytes): where dsum starts in the workspace
# query rows per warp of the pre and post kernels (kBwdRowsPerWarp in sm80/bwd.cu)
ROWS_PER_WARP = 4
# consecutive CTAs the bwd_order kernel ranks together (kSpOrderGroup in bwd_params.cuh): one
# of its CTAs per group
ORDER_GROUP = 128


def run_backward(pb: Problem, dout: Any, query: Any, key: Any, value: Any, out: Any, lse: Any,
                 cu_q: Any = None, cu_k: Any = None, dlse: Any = None,
                 deterministic: bool = False, need_dbias: bool = True,
                 sparse: SparseArrays | None = None) -> tuple[Any, Any, Any, Any]:
    """Launch the backward kernels for a validated CUDA problem; returns (dq, dk, dv, dbias)
    in the query's library (dbias None unless ``need_dbias`` and the problem has a bias).
    ``sparse``: a block mask's lists on the query's device (its blocks must tile the kernels:
    ``sparse_fits_backward``); unlisted blocks are skipped like all-false mask tiles."""
    grads, _ = backward_call(pb, dout, query, key, value, out, lse, cu_q, cu_k, dlse,
                             deterministic, need_dbias, sparse)
    return grads


def order_items(pb: Problem, family: str, deterministic: bool) -> int:
    """The Hopper backward's CTAs when a block mask runs them longest first within groups of
    ORDER_GROUP (the bwd_order kernel's permutation: default mode, no window,
    ``DMATTN_SM90_BWD_ORDER`` not 0), else 0 (grid order)."""
    if family != "bwd_sm90" or deterministic or pb.window != (-1, -1) or pb.varlen:
        return 0
    items = math.ceil(pb.seqlen_k / backward_sm90.BLOCK_N) * pb.kv_heads * pb.batch
    return items if items > 0 and env.sm90_bwd_order() else 0


def backward_call(pb: Problem, dout: Any, query: Any, key: Any, value: Any, out: Any, lse: Any,
                  cu_q: Any = None, cu_k: Any = None, dlse: Any = None,
                  deterministic: bool = False, need_dbias: bool = True,
                  sparse: SparseArrays | None = None
                  ) -> tuple[tuple[Any, Any, Any, Any], Plan | None]:
    """``run_backward``, also returning the plan it launched: cacheable when no input was
    copied and no device-side value checked (a later call with the same signature builds the
    same plan); None when nothing launched. Block lists are further inputs of the plan
    (``SPARSE_INPUTS`` after ``BWD_INPUTS``, 0 for an absent array) and their block grid
    (``sp_grid``, written whole by the grid kernel every call) its last allocation: a caller
    that caches the plan must key the lists' shapes, dtypes and block size and supply their
    pointers on every call."""
    check = pb.varlen and env.check_enabled()
    if check:   # DMATTN_CHECK=1: cu_seqlens read back and checked (a sync), as the forward does
        check_cu_seqlens_values(arrays.to_host(cu_q), arrays.to_host(cu_k), pb.total_q,
                                pb.total_k, pb.seqlen_q, pb.seqlen_k)
    dt = pb.dtype
    copied = False
    # The tensor-core kernels read rows with 16-byte cp.async: copy unaligned inputs.
    qkv = {"q": query, "k": key, "v": value}
    for name, arr in qkv.items():
        if not _aligned(describe(arr)):
            qkv[name] = arrays.contiguous_copy(arr)
            copied = True
    if not _aligned(describe(dout)):
        dout = arrays.contiguous_copy(dout)
        copied = True
    out_info = describe(out)
    if out_info.shape[-1] > 1 and out_info.strides[-1] != 1:
        out = arrays.contiguous_copy(out)
        copied = True
    query, key, value = qkv["q"], qkv["k"], qkv["v"]
    pb = dataclasses.replace(pb, q=describe(query), k=describe(key), v=describe(value))
    lse0, dlse0 = lse, dlse
    lse = _contiguous_f32(lse)
    if dlse is not None:
        dlse = _contiguous_f32(dlse)
    copied = copied or lse is not lse0 or dlse is not dlse0

    want_dbias = need_dbias and pb.bias is not None
    # A dense bias of one value per query row (key dim 1) shifts whole softmax rows: the
    # output does not move, lse moves one for one. Its gradient is exact without a kernel
    # (there, D from the rounded output would leave ~1e-3 of noise): 0, or from dlse
    # (row_shift_grad, after the launches; such a plan is not cached).
    row_shift = want_dbias and not pb.varlen and pb.bias.shape[3] == 1
    want_dbias = want_dbias and not row_shift
    dev_props = runtime.device_props(pb.q.device)
    sparse_arg = False if sparse is None else (sparse.block_m, sparse.block_n)
    # element bits to read: a MixedMask with partial blocks (one without walks like block lists)
    partial = (sparse is not None and sparse.partial_bits is not None
               and sparse.partial_bits.shape[0] > 0)
    dout_info = describe(dout)
    family = backward_family(pb, dout_info, deterministic, sparse_arg, dev_props, partial)
    # unshift: a dense bias of one value per query row, which only shifts softmax rows, keeps
    # the problem off the Hopper backward: it runs without it, on the forward's lse minus the
    # row's value (the pre kernel writes that into the workspace: BwdParams.lse_shifted).
    unshift = (family != "bwd_sm90" and row_bias.has_row_bias(pb)
               and backward_family(dataclasses.replace(pb, bias=None), dout_info,
                                   deterministic, sparse_arg, dev_props, partial) == "bwd_sm90")
    if unshift:
        family = "bwd_sm90"
    # A bias tile whose rows alone keep it from bwd_sm90's tensor map (Sk values that are no
    # 16-byte multiple, a misaligned view) is read from a copy in 16-byte rows ("bias_rows",
    # made by row_pad before the launches; a cached plan repeats it). dbias keeps the bias's
    # own contiguous layout (the kernel stores it at any strides).
    bias_src = pb.bias
    pad_bias = family != "bwd_sm90" and bias_to_pad(pb, dout_info, deterministic,
                                                    sparse_arg, dev_props, partial)
    if pad_bias:
        pb = dataclasses.replace(pb, bias=_padded_placeholder(pb.bias))
        family = "bwd_sm90"
    pre, dkdv, dqs, grid_spec, post = select_backward(dt, pb.head_dim, pb.mask is not None,
                                                      pb.bias is not None, pb.varlen,
                                                      deterministic, sparse is not None,
                                                      dev_props)
    if sparse is not None and not (sparse.block_m % dkdv.block_m == 0
                                   and sparse.block_n % dkdv.block_n == 0):
        raise ValueError(f"sparse_mask block_size {(sparse.block_m, sparse.block_n)} must be a "
                         f"multiple of the backward tile {(dkdv.block_m, dkdv.block_n)}")
    empty = pb.batch == 0 or (pb.varlen and pb.total_q == 0) or (not pb.varlen and
                                                                  pb.seqlen_q == 0)
    plan = Plan(device=pb.q.device,
                inputs=BWD_INPUTS if sparse is None else BWD_INPUTS + SPARSE_INPUTS,
                cacheable=not (copied or check or empty or pb.seqlen_k == 0
                               or (pb.varlen and pb.total_k == 0)))
    mode = 0
    dbias_st = None
    expanded_axes: tuple[int, ...] = ()
    dbias_view: tuple[int, ...] | None = None   # the widened dbias as the sum reads it
    if row_shift and dlse is None:
        plan.allocs.append(Alloc("dbias", tuple(pb.bias.shape), pb.bias.dtype, zero=True))
    elif row_shift:
        plan.cacheable = False
    elif want_dbias and family == "bwd_sm90":
        # every element of a (B, H, Sq, Sk) or (B, H, 1, Sk) dbias is written at most once, in
        # the bias's dtype (the query's: backward_sm90.accepts; a shared key row: float32, below);
        # never-visited ones stay 0.
        # Without a mask, block lists, causal or window every tile is visited and every
        # in-bounds element written: no zero fill (268 MB at B2 H16 S2048, ~70 us). A bias
        # shared by the batch or by groups of heads: its dbias widened to (B, H, ..), summed.
        mode = 1
        shape_b, dbias_view, expanded_axes = backward_sm90.widened_dbias(
            tuple(pb.bias.shape), pb.batch, pb.heads)
        every_tile = pb.mask is None and sparse is None and pb.window == (-1, -1)
        # A key row's partials (one per batch, head and key: small) stay float32 until that
        # sum, so a shared key row is rounded once, not once per head it serves as well.
        key_row = backward_sm90.bias_mode(pb.bias, pb.batch, pb.heads, pb.seqlen_q,
                                          pb.seqlen_k) == backward_sm90.BIAS_KEY_ROW
        buf_dt = "float32" if key_row and expanded_axes else pb.bias.dtype
        plan.allocs.append(Alloc("dbias", shape_b, buf_dt, zero=not every_tile))
        dbias_st = mask_bias_strides(_contig_info(pb.bias, shape_b, buf_dt), pb.varlen)
    elif want_dbias:
        mode = dbias_mode(pb, _probe_strides(pb), dkdv.block_m, dkdv.block_n)
        if deterministic and mode == 3:  # no cross-block atomics: widen, then reduce in order
            pb, expanded_axes = _widen_bias(pb)
            mode = dbias_mode(pb, _probe_strides(pb), dkdv.block_m, dkdv.block_n)
        if deterministic and mode == 3:
            raise AssertionError(f"deterministic dbias of bias shape {pb.bias.shape} would "
                                 "need cross-block atomics")  # _widen_bias covers every case
        shape = list(pb.bias.shape)
        buf_dtype = pb.bias.dtype if mode == 1 and not expanded_axes else "float32"
        # Mode 1 writes every element of every visited tile; without a mask or window (dense)
        # every tile is visited, so the buffer needs no zero fill.
        every_tile = (not pb.varlen and pb.mask is None and sparse is None
                      and pb.window == (-1, -1) and pb.seqlen_k > 0)
        plan.allocs.append(Alloc("dbias", tuple(shape), buf_dtype,
                                 zero=not (mode == 1 and every_tile)))
        dbias_st = mask_bias_strides(_contig_info(pb.bias, tuple(shape), buf_dtype), pb.varlen)

    lse_shape = (pb.heads, pb.total_q) if pb.varlen else (pb.batch, pb.heads, pb.seqlen_q)
    n_dsum = math.prod(lse_shape)
    sem_at = 0  # the Hopper kernel's deterministic counters: their element in the workspace
    if deterministic and family != "bwd_sm90":
        plan.allocs += [Alloc("dsum", lse_shape, "float32"), Alloc("dk", pb.k.shape, dt),
                        Alloc("dv", pb.v.shape, dt), Alloc("dq", pb.q.shape, dt)]
    else:
        # one float32 workspace per call: dq_accum (q's shape, contiguous) at element 0, dsum
        # after it at a 256-byte boundary. No fill: the pre kernel zeroes every dq_accum row
        # and writes every dsum; the post kernel casts it into dq, the last launch (scratch: a
        # cached plan may reuse one buffer). The Hopper kernel's deterministic mode adds its
        # int32 counters at the next boundary, which must start at 0: that workspace is
        # zero-filled per call instead
        n_dqa = math.prod(pb.q.shape)
        dsum_at = -(-n_dqa // _WS_ALIGN) * _WS_ALIGN
        n_ws = dsum_at + n_dsum
        if unshift:   # lse without the row bias, in lse layout, at the next boundary
            lse_at = -(-n_ws // _WS_ALIGN) * _WS_ALIGN
            n_ws = lse_at + n_dsum
            plan.extra["ws_lse_bytes"] = 4 * lse_at
        if deterministic:
            sem_at = -(-n_ws // _WS_ALIGN) * _WS_ALIGN
            n_ws = sem_at + backward_sm90.semaphore_words(pb.batch, pb.heads, pb.seqlen_q)
        plan.allocs += [Alloc("ws", (n_ws,), "float32", zero=deterministic,
                              scratch=not deterministic),
                        Alloc("dk", pb.k.shape, dt), Alloc("dv", pb.v.shape, dt),
                        Alloc("dq", pb.q.shape, dt)]
        plan.extra["ws_dsum_bytes"] = 4 * dsum_at
    grid_shape = None
    n_order = 0
    if sparse is not None:  # per (mask batch, mask head, row block, column block): its state
        grid_shape = tuple(int(n) for n in describe(sparse.full_count).shape) + (
            math.ceil(pb.seqlen_k / sparse.block_n),)
        # then the Hopper CTAs' longest-first order (bwd_order) where it applies
        n_order = order_items(pb, family, deterministic)
        plan.allocs.append(Alloc("sp_grid", (math.prod(grid_shape) + n_order,), "int32"))
    if pad_bias:  # after every alloc the code above indexes (dbias is allocs[0])
        width, rows, src_pitch, dst_pitch = arrays.row_copy(bias_src)
        plan.allocs.append(Alloc("bias_rows", (arrays.padded_bytes(bias_src),), "uint8"))
        plan.copies.append(RowCopy("bias", "bias_rows", width, rows, src_pitch, dst_pitch))
    plan.extra.update(expanded_axes=expanded_axes, dbias_view=dbias_view,
                      bias_shape=None if pb.bias is None else tuple(bias_src.shape),
                      bias_dtype=None if pb.bias is None else pb.bias.dtype)
    bufs = {a.name: (arrays.zeros if a.zero else arrays.empty)(query, a.shape, a.dtype or dt)
            for a in plan.allocs}
    if pad_bias:  # this call's copy; the kernels read the bias from it
        pb = dataclasses.replace(pb, bias=dataclasses.replace(pb.bias,
                                                               ptr=describe(bufs["bias_rows"]).ptr))
        row_pad.copy_rows(pb.q.device, pb.bias.ptr, dst_pitch, bias_src.ptr, src_pitch, width,
                          rows, runtime.stream_ptr(pb.kind, pb.q.device))
    renames = {"bias": "bias_rows"} if pad_bias else {}
    if "ws" in bufs:
        bufs["dq_accum"] = arrays.flat_view(bufs["ws"], pb.q.shape)

    def ptr(a: Any) -> int:
        return describe(a).ptr if a is not None else 0

    fwd = build_fwd_params(pb, describe(out), ptr(lse), ptr(cu_q), ptr(cu_k))
    rec = np.zeros(1, dtype=bwd_dtype_flat())
    r = rec[0]
    for name in FWD_DTYPE.names:
        r[name] = fwd[0][name]
    for name, field in fwd_pointer_fields(pb, ("out", "lse")):
        if unshift and name == "lse":   # the pre kernel reads it; the rest read the workspace's
            field = "lse_shifted"
            r[field] = ptr(lse)
        plan.slot(renames.get(name, name), rec, field)
    r["dout"], r["dlse"] = ptr(dout), ptr(dlse)
    plan.slot("dout", rec, "dout")
    if dlse is not None:
        plan.slot("dlse", rec, "dlse")
    for a in plan.allocs:
        # bias_rows: read through the bias fields (renames); row_shift's zeros: never written
        if a.name == "bias_rows" or (a.name == "dbias" and row_shift):
            continue
        if a.name == "ws":
            ws, off = ptr(bufs["ws"]), plan.extra["ws_dsum_bytes"]
            r["dq_accum"], r["dsum"] = ws, ws + off
            plan.slot("ws", rec, "dq_accum")
            plan.slot("ws", rec, "dsum", off)
            if unshift:
                r["lse"] = ws + plan.extra["ws_lse_bytes"]
                plan.slot("ws", rec, "lse", plan.extra["ws_lse_bytes"])
            continue
        r[_BWD_POINTER_FIELD[a.name]] = ptr(bufs[a.name])
        plan.slot(a.name, rec, _BWD_POINTER_FIELD[a.name])
    for name, arr in (("do", dout), ("dq", bufs.get("dq")), ("dk", bufs["dk"]),
                      ("dv", bufs["dv"]), ("dqa", bufs.get("dq_accum"))):
        if arr is None:
            continue
        bs, rs, hs = qkv_strides(describe(arr), pb.varlen)
        r[f"{name}_batch_stride"], r[f"{name}_row_stride"], r[f"{name}_head_stride"] = bs, rs, hs
    if dbias_st is not None:
        for field in ("batch", "head", "row", "col", "qseq", "kseq"):
            r[f"dbias_{field}_stride"] = getattr(dbias_st, field)
    r["dbias_mode"] = mode
    r["dbias_is_fp32"] = int(want_dbias and plan.allocs[0].dtype == "float32")
    r["scale"] = pb.scale
    if grid_shape is not None:
        for field in SPARSE_INPUTS:   # "sp_" + the SparseArrays field
            r[field] = ptr(getattr(sparse, field[3:]))
            plan.slot(field, rec, field)
        for name, value in sparse_fields(sparse).items():
            r[name] = value
        r["sp_grid_cols"] = grid_shape[-1]
        if n_order:
            r["sp_order"] = ptr(bufs["sp_grid"]) + 4 * math.prod(grid_shape)
            plan.slot("sp_grid", rec, "sp_order", 4 * math.prod(grid_shape))

    if not empty:
        dev = pb.q.device
        plan.launches.append(Launch(runtime.get_kernel(pre, dev), (
            max(1, math.ceil(pb.seqlen_q / (pre.num_warps * ROWS_PER_WARP))), pb.heads,
            pb.batch), (rec,)))
        if grid_shape is not None and pb.seqlen_k > 0:
            bm, hm, nrb = grid_shape[:3]
            plan.launches.append(Launch(runtime.get_kernel(grid_spec, dev), (nrb, hm, bm),
                                        (rec,)))
            if n_order:
                plan.launches.append(Launch(runtime.get_kernel(
                    backward_order_spec(dev_props.arch), dev),
                    (math.ceil(n_order / ORDER_GROUP), 1, 1), (rec,)))
        if pb.seqlen_k > 0 and family == "bwd_sm90":
            kernel_bias = None if unshift else pb.bias   # the bias its maps and spec read
            mode_b = backward_sm90.bias_mode(kernel_bias, pb.batch, pb.heads, pb.seqlen_q,
                                             pb.seqlen_k) or 0
            spec = backward_sm90_spec(pb.dtype, pb.head_dim, pb.mask is not None,
                                      kernel_bias is not None,
                                      mode_b == backward_sm90.BIAS_KEY_ROW, listed_bits=partial)
            sem = ptr(bufs["ws"]) + 4 * sem_at if deterministic else 0
            args = backward_sm90.build_args(pb.q, pb.k, pb.v, dout_info, kernel_bias, mode_b,
                                            sem, ptr(bufs["ws"]))
            slots = backward_sm90.address_slots(pb.q, pb.k, pb.v, dout_info, kernel_bias,
                                                mode_b)
            if slots is None:  # the driver's map layout cannot be patched: plan per call
                plan.cacheable = False
            else:  # the dqa map spans dq_accum, element 0 of the workspace
                for name, offset in slots:
                    plan.slot_at("ws" if name == "dqa" else renames.get(name, name), args,
                                 offset)
            if deterministic:
                plan.slot_at("ws", args, backward_sm90.DQ_SEM_OFFSET, 4 * sem_at)
            plan.launches.append(Launch(runtime.get_kernel(spec, dev), (
                math.ceil(pb.seqlen_k / backward_sm90.BLOCK_N), pb.kv_heads, pb.batch),
                (rec, args)))
        elif pb.seqlen_k > 0:
            plan.launches.append(Launch(runtime.get_kernel(dkdv, dev), (
                math.ceil(pb.seqlen_k / dkdv.block_n), pb.kv_heads, pb.batch), (rec,)))
        launches[family] += 1
        if dqs is not None and family != "bwd_sm90":
            plan.launches.append(Launch(runtime.get_kernel(dqs, dev), (
                max(1, math.ceil(pb.seqlen_q / dqs.block_m)), pb.heads, pb.batch), (rec,)))
        if "ws" in bufs:   # dq from dq_accum, after every kernel that adds into it
            plan.launches.append(Launch(runtime.get_kernel(post, dev), (
                max(1, math.ceil(pb.seqlen_q / (post.num_warps * ROWS_PER_WARP))), pb.heads,
                pb.batch), (rec,)))
        plan.run(runtime.current_stream(pb.kind, pb.q.device))
    elif pb.seqlen_k > 0:  # no query rows: dK = dV = 0
        bufs["dk"] = arrays.zeros(query, pb.k.shape, dt)
        bufs["dv"] = arrays.zeros(query, pb.v.shape, dt)
    if pb.seqlen_k == 0 or (pb.varlen and pb.total_k == 0):
        bufs["dk"] = arrays.zeros(query, pb.k.shape, dt)
        bufs["dv"] = arrays.zeros(query, pb.v.shape, dt)
    if row_shift and dlse is not None:
        bufs["dbias"] = row_shift_grad(lse, dlse, tuple(pb.bias.shape), pb.bias.dtype)
    return finish_backward(plan, bufs), (None if empty else plan)


def row_shift_grad(lse: Any, dlse: Any, bias_shape: tuple[int, ...], bias_dtype: str) -> Any:
    """dbias of a dense bias constant over keys (``row_shift``) under an incoming ``dlse``
    ((B, H, Sq) float32, as ``lse``): d(lse_i)/d(bias_i) = sum_j P_ij = 1 where row i has an
    allowed key (lse finite), else 0; summed over what the bias broadcasts (batch, the heads
    of a bias head's group, query rows) into the bias's shape and dtype."""
    b, h, sq = (int(n) for n in describe(lse).shape)
    nb, nh, nq = bias_shape[:3]
    xp = arrays.module_of(lse)
    g = xp.where(xp.isfinite(lse), dlse, 0.0).reshape(b, nh, h // nh, sq)
    axes = tuple(a for a, summed in ((0, nb != b), (2, True), (3, nq != sq)) if summed)
    return arrays.summer(lse, axes, bias_dtype)(g).reshape(bias_shape)


def finisher(plan: Plan, like: Any) -> Callable[[list[Any]], tuple[Any, Any, Any, Any]]:
    """``finish_backward`` bound once for a cached plan: a function of the plan's buffers in
    ``plan.allocs`` order (``like``: an array of the calls' library). The common case (dQ
    written by the post kernel, no dbias) indexes the buffers directly."""
    names = tuple(a.name for a in plan.allocs)
    if names in (("ws", "dk", "dv", "dq"), ("ws", "dk", "dv", "dq", "sp_grid")) \
            and not plan.extra["expanded_axes"]:
        return lambda made: (made[3], made[1], made[2], None)
    return lambda made: finish_backward(plan, dict(zip(names, made, strict=True)))


def finish_backward(plan: Plan, bufs: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(dq, dk, dv, dbias) from a launched plan's buffers: dbias summed over widened dims (a
    fixed order) and cast to the bias dtype. The cast is bound once per plan (the thin path
    calls this on every step)."""
    cast_db = plan.extra.get("cast_db", False)
    axes = plan.extra["expanded_axes"]
    if cast_db is False:
        bias_dt = plan.extra["bias_dtype"]
        dbias = next((a for a in plan.allocs if a.name == "dbias"), None)
        # widened partials (float32, or the bias's dtype from the Hopper kernel) are summed by
        # a float32 accumulator straight into the bias's dtype; others are cast if need be
        plan.extra["sum_db"] = (arrays.summer(bufs["dk"], axes, bias_dt)
                                if dbias is not None and axes else None)
        cast_db = plan.extra["cast_db"] = (
            arrays.caster(bufs["dk"], bias_dt)
            if dbias is not None and not axes and dbias.dtype != bias_dt else None)
    dbias = bufs.get("dbias")
    if axes:  # a fixed-order reduction over the widened dims (float32 accumulator)
        view = plan.extra["dbias_view"]
        if view is not None:  # (B, H', H / H', ..): a bias head's group on axis 2
            dbias = dbias.reshape(view)
        dbias = plan.extra["sum_db"](dbias)
        if view is not None:
            dbias = dbias.reshape(plan.extra["bias_shape"])
    if cast_db is not None:
        dbias = cast_db(dbias)
    return bufs["dq"], bufs["dk"], bufs["dv"], dbias


def bias_to_pad(pb: Problem, dout: ArrayInfo, deterministic: bool, sparse: bool | tuple[int, int],
                dev: DeviceProps, partial: bool = False) -> bool:
    """Whether the bias alone keeps the problem off bwd_sm90 and a copy in 16-byte rows
    (``row_pad``; equally spaced rows, no expanded dims) puts it there: e.g. a (B, H, Sq, Sk)
    tile or a (B, H, 1, Sk) key row at an odd Sk."""
    bias = pb.bias
    if bias is None or arrays.collapse_broadcast(bias) != bias or arrays.row_copy(bias) is None:
        return False
    if backward_family(pb, dout, deterministic, sparse, dev, partial) == "bwd_sm90":
        return False
    trial = dataclasses.replace(pb, bias=_padded_placeholder(bias))
    return backward_family(trial, dout, deterministic, sparse, dev, partial) == "bwd_sm90"


def _padded_placeholder(bias: ArrayInfo) -> ArrayInfo:
    """``bias`` as ``arrays.padded_buffer`` lays it out, at an aligned placeholder address."""
    return dataclasses.replace(arrays.padded_rows(bias), ptr=1 << 20)


def _contig_info(info, shape: tuple[int, ...], dtype: str):
    return dataclasses.replace(info, shape=shape, strides=_contig_strides(shape), dtype=dtype)


def _probe_strides(pb: Problem):
    """The bias's strides as a contiguous dbias of its shape would have them."""
    return mask_bias_strides(
        dataclasses.replace(pb.bias, strides=_contig_strides(pb.bias.shape)), pb.varlen)


def _widen_bias(pb: Problem) -> tuple[Problem, tuple[int, ...]]:
    """For deterministic dbias, the dims whose gradient several CTAs would add into. Batch
    (B > 1) and a single head with several kv heads: the bias is seen as widened (stride 0)
    there, so every CTA writes its own slice of a float32 buffer of the widened shape (a bias
    constant over keys never gets here: ``row_shift``). Returns (problem, axes to sum over
    afterwards)."""
    bias = pb.bias
    shape, strides = list(bias.shape), list(bias.strides)
    head_axis = 1
    wide = {}
    if not pb.varlen and shape[0] == 1 and pb.batch > 1:
        wide[0] = pb.batch
    if shape[head_axis] == 1 and pb.kv_heads > 1:
        wide[head_axis] = pb.heads
    for axis, n in wide.items():
        shape[axis], strides[axis] = n, 0
    widened = dataclasses.replace(bias, shape=tuple(shape), strides=tuple(strides))
    return dataclasses.replace(pb, bias=widened), tuple(sorted(wide))


def _contig_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
