"""The CUDA backward pass: kernel specs, the ``BwdParams`` mirror, and the launches.

``BwdParams`` (cuda_src/bwd_params.cuh) is the forward's ``FwdParams`` record followed by the
gradient buffers; its NumPy mirror is FWD_DTYPE's fields followed by ``BWD_EXTRA_FIELDS`` and is
pinned by generated ``static_assert``s like the forward's. Three kernels (cuda_src/sm80/bwd.cu):
a preprocess (``dsum = rowsum(dO * O) - dlse``), the dK/dV kernel (per key tile and kv head; it
also writes dbias, and in the default mode adds dQ with fp32 atomics), and, with
``deterministic=True``, a dQ kernel (per query tile) that needs no atomics.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import array_kind, describe
from .layout import build_fwd_params, mask_bias_strides, qkv_strides
from .params import FWD_DTYPE, abi_check_source
from .sparse_plan import SparseArrays, sparse_fields
from .spec import DTYPES, HEAD_DIMS, padded_head_dim
from .validate import Problem

_PTR, _I64, _I32, _F32 = np.uint64, np.int64, np.int32, np.float32

BWD_EXTRA_FIELDS: tuple[tuple[str, type], ...] = (
    ("dout", _PTR), ("dlse", _PTR), ("dsum", _PTR), ("dq_accum", _PTR), ("dq", _PTR),
    ("dk", _PTR), ("dv", _PTR), ("dbias", _PTR), ("sp_grid", _PTR),
    ("do_batch_stride", _I64), ("do_row_stride", _I64), ("do_head_stride", _I64),
    ("dq_batch_stride", _I64), ("dq_row_stride", _I64), ("dq_head_stride", _I64),
    ("dk_batch_stride", _I64), ("dk_row_stride", _I64), ("dk_head_stride", _I64),
    ("dv_batch_stride", _I64), ("dv_row_stride", _I64), ("dv_head_stride", _I64),
    ("dqa_batch_stride", _I64), ("dqa_row_stride", _I64), ("dqa_head_stride", _I64),
    ("dbias_batch_stride", _I64), ("dbias_head_stride", _I64), ("dbias_row_stride", _I64),
    ("dbias_col_stride", _I64), ("dbias_qseq_stride", _I64), ("dbias_kseq_stride", _I64),
    ("dbias_tile_stride", _I64),
    ("dbias_mode", _I32), ("dbias_is_fp32", _I32), ("scale", _F32), ("sp_grid_cols", _I32),
)


def bwd_dtype_nested() -> np.dtype:
    """BwdParams as the C++ declares it: ``FwdParams f`` then the extra fields."""
    return np.dtype([("f", FWD_DTYPE)] + list(BWD_EXTRA_FIELDS), align=True)


def bwd_dtype_flat() -> np.dtype:
    """The same bytes with the forward's fields inlined (what a launch fills and passes)."""
    fields = [(n, FWD_DTYPE.fields[n][0]) for n in FWD_DTYPE.names] + list(BWD_EXTRA_FIELDS)
    return np.dtype(fields, align=True)


def bwd_abi_check_source() -> str:
    src = abi_check_source("BwdParams", bwd_dtype_nested())
    return src.replace('#include "params.cuh"', '#include "bwd_params.cuh"')


BWD_KERNEL_NAMES = {"bwd_pre": "flash_bwd_pre_kernel", "bwd_dkdv": "flash_bwd_dkdv_kernel",
                    "bwd_dq": "flash_bwd_dq_kernel", "bwd_grid": "flash_bwd_sparse_grid_kernel"}


@dataclass(frozen=True)
class BwdSpec:
    """A backward kernel specialization; duck-types ``KernelSpec`` for compile/launch."""
    kind: str = "bwd_dkdv"     # bwd_pre | bwd_dkdv | bwd_dq | bwd_grid
    dtype: str = "bf16"
    head_dim: int = 128
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    has_mask: bool = False
    has_bias: bool = False
    varlen: bool = False
    deterministic: bool = False
    debug_counters: bool = False

    def __post_init__(self) -> None:
        if self.kind not in BWD_KERNEL_NAMES:
            raise ValueError(f"BwdSpec.kind must be one of {tuple(BWD_KERNEL_NAMES)}, "
                             f"got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"BwdSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"BwdSpec.head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")

    @property
    def id(self) -> str:
        return (f"{self.kind}_{self.dtype}_d{self.head_dim}_m{self.block_m}n{self.block_n}"
                f"w{self.num_warps}_mask{int(self.has_mask)}_bias{int(self.has_bias)}"
                f"_varlen{int(self.varlen)}" + ("_det" if self.deterministic else ""))

    @property
    def source_file(self) -> str:
        return "sm80/bwd.cu"

    @property
    def extra_abi_check(self) -> str:
        return bwd_abi_check_source()

    @property
    def name_expression(self) -> str:
        elem = "dm::Half" if self.dtype == "fp16" else "dm::BFloat16"
        flags = [self.has_mask, self.has_bias, self.varlen, self.deterministic,
                 self.debug_counters]
        args = ", ".join([elem, str(self.head_dim), str(self.block_m), str(self.block_n),
                          str(self.num_warps)] + [str(f).lower() for f in flags])
        return f"dm::{BWD_KERNEL_NAMES[self.kind]}<{args}>"

    @property
    def dynamic_smem(self) -> int:
        m, n, row = self.block_m, self.block_n, (self.head_dim + 8) * 2
        bias = m * (n + 8) * 4 if self.has_bias else 0
        if self.kind == "bwd_dkdv":  # Q, dO (x stages), K, V; P, dS; lse, dsum (x stages);
            st = 2 if self.head_dim <= 128 else 1  # bias fp32 + raw 16-bit (x stages)
            raw = st * m * (n + 8) * 2 if self.has_bias else 0
            return (2 * m * st + 2 * n) * row + 2 * m * (n + 8) * 2 + 2 * m * 4 * st + bias + raw
        if self.kind == "bwd_dq":    # Q, dO, K, V; bias tile
            return (2 * m + 2 * n) * row + bias
        return 0

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def __str__(self) -> str:
        return self.id


def select_bwd_specs(dtype: str, head_dim: int, has_mask: bool, has_bias: bool, varlen: bool,
                     deterministic: bool, sparse: bool = False, smem_limit: int | None = None
                     ) -> tuple[BwdSpec, BwdSpec, BwdSpec | None, BwdSpec | None]:
    """(preprocess, dK/dV, dQ or None, sparse grid or None) specs for a problem. A block-sparse
    mask runs the has_mask kernels (its grid is read at run time). Without mask or bias the
    dK/dV kernel takes 128 query rows per step (half the barriers and Q/dO tile switches per
    FLOP) where its 208 KB of shared memory fit ``smem_limit`` (None: assume they do; 0: the
    64-row fallback)."""
    dt = "fp16" if dtype in ("float16", "fp16") else "bf16"
    hd = padded_head_dim(head_dim)
    pre = BwdSpec(kind="bwd_pre", dtype=dt, head_dim=128, block_m=8, block_n=32, num_warps=8,
                  varlen=varlen)
    common = dict(dtype=dt, head_dim=hd, block_m=64, block_n=64 if hd <= 128 else 32,
                  has_mask=has_mask or sparse, has_bias=has_bias, varlen=varlen)
    dkdv = BwdSpec(kind="bwd_dkdv", num_warps=8, deterministic=deterministic, **common)
    if not (has_mask or has_bias or sparse) and hd <= 128:
        tall = dataclasses.replace(dkdv, block_m=128)
        if smem_limit is None or tall.dynamic_smem <= smem_limit:
            dkdv = tall
    dq = (BwdSpec(kind="bwd_dq", num_warps=4, deterministic=True, **common) if deterministic
          else None)
    grid = (BwdSpec(kind="bwd_grid", dtype=dt, head_dim=128, block_m=8, block_n=32, num_warps=4)
            if sparse else None)
    return pre, dkdv, dq, grid


def sparse_fits_backward(block_size: tuple[int, int], dtype: str, head_dim: int) -> bool:
    """Whether a block mask of ``block_size`` tiles the backward kernels' (block_m, block_n)
    (otherwise the backward reads its dense form as ``attn_mask``)."""
    dkdv = select_bwd_specs(dtype, head_dim, True, False, False, False)[1]
    return block_size[0] % dkdv.block_m == 0 and block_size[1] % dkdv.block_n == 0


def all_bwd_specs() -> list[BwdSpec]:
    """Every backward specialization the launcher can select (for precompile)."""
    specs: list[BwdSpec] = []
    for dtype in DTYPES:
        for hd in HEAD_DIMS:
            for mask in (False, True):
                for bias in (False, True):
                    for varlen in (False, True):
                        for det in (False, True):
                            for sparse, limit in itertools.product((False, not varlen),
                                                                   (None, 0)):
                                for s in select_bwd_specs(dtype, hd, mask, bias, varlen, det,
                                                          sparse, limit):
                                    if s is not None and s not in specs:
                                        specs.append(s)
    return specs


# ---------------------------------------------------------------------------------------------
# Array helpers in the query's library (torch or CuPy), on the query's device.

def _lib_zeros(like: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if array_kind(like) == "torch":
        import torch

        return torch.zeros(shape, dtype=getattr(torch, dtype), device=like.device)
    import cupy

    with cupy.cuda.Device(like.device.id):
        return cupy.zeros(shape, dtype=dtype)


def _lib_empty(like: Any, shape: tuple[int, ...], dtype: str) -> Any:
    if array_kind(like) == "torch":
        import torch

        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.device)
    import cupy

    with cupy.cuda.Device(like.device.id):
        return cupy.empty(shape, dtype=dtype)


def _lib_cast(x: Any, dtype: str) -> Any:
    if array_kind(x) == "torch":
        import torch

        return x.to(getattr(torch, dtype))
    return x.astype(dtype)


def _lib_contiguous(x: Any, dtype: str | None = None) -> Any:
    """A fresh, contiguous (16-byte aligned) copy, optionally cast."""
    if array_kind(x) == "torch":
        import torch

        y = x.to(getattr(torch, dtype)) if dtype is not None else x
        return y.clone(memory_format=torch.contiguous_format)
    import cupy

    with cupy.cuda.Device(x.device.id):
        y = x.astype(dtype) if dtype is not None else x
        return cupy.array(y, order="C", copy=True)


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
    return x if ok else _lib_contiguous(x, "float32")


def dbias_mode(pb: Problem, strides, block_m: int, block_n: int,
               key_tiles: bool = False) -> int:
    """How the dK/dV kernel writes dbias (see cuda_src/bwd_params.cuh): 1 when every element
    gets exactly one write, 2 when all writes to an element come from one CTA (fp32 adds in a
    fixed order), 3 when several CTAs add to one element (fp32 atomics). ``key_tiles``: a
    key-broadcast dbias gets one slot per key tile (``dbias_tile_stride``)."""
    bias = pb.bias
    nh = bias.shape[1]
    batch_shared = not pb.varlen and bias.shape[0] == 1 and pb.batch > 1
    heads_cross = nh == 1 and pb.kv_heads > 1
    heads_shared = nh != pb.heads
    multi_q = strides.row == 0 and pb.seqlen_q > block_m
    multi_k = strides.col == 0 and pb.seqlen_k > block_n and not key_tiles
    if not (batch_shared or heads_shared or multi_q or multi_k):
        return 1
    return 3 if (batch_shared or heads_cross or multi_k) else 2


def run_backward(pb: Problem, dout: Any, query: Any, key: Any, value: Any, out: Any, lse: Any,
                 cu_q: Any = None, cu_k: Any = None, dlse: Any = None,
                 deterministic: bool = False, need_dbias: bool = True,
                 sparse: SparseArrays | None = None) -> tuple[Any, Any, Any, Any]:
    """Launch the backward kernels for a validated CUDA problem; returns (dq, dk, dv, dbias)
    in the query's library (dbias None unless ``need_dbias`` and the problem has a bias).
    ``sparse``: a block mask's lists on the query's device (its blocks must tile the kernels:
    ``sparse_fits_backward``); unlisted blocks are skipped like all-false mask tiles."""
    from .launch import current_stream, device_smem_limit, get_function

    dt = pb.dtype
    # The tensor-core kernels read rows with 16-byte cp.async: copy unaligned inputs.
    arrays = {"q": query, "k": key, "v": value}
    for name, arr in arrays.items():
        if not _aligned(describe(arr)):
            arrays[name] = _lib_contiguous(arr)
    if not _aligned(describe(dout)):
        dout = _lib_contiguous(dout)
    out_info = describe(out)
    if out_info.shape[-1] > 1 and out_info.strides[-1] != 1:
        out = _lib_contiguous(out)
    query, key, value = arrays["q"], arrays["k"], arrays["v"]
    pb = dataclasses.replace(pb, q=describe(query), k=describe(key), v=describe(value))
    lse = _contiguous_f32(lse)
    if dlse is not None:
        dlse = _contiguous_f32(dlse)

    want_dbias = need_dbias and pb.bias is not None
    pre, dkdv, dqs, grid_spec = select_bwd_specs(dt, pb.head_dim, pb.mask is not None,
                                                 pb.bias is not None, pb.varlen, deterministic,
                                                 sparse is not None,
                                                 device_smem_limit(pb.q.device))
    if sparse is not None and not (sparse.block_m % dkdv.block_m == 0
                                   and sparse.block_n % dkdv.block_n == 0):
        raise ValueError(f"sparse_mask block_size {(sparse.block_m, sparse.block_n)} must be a "
                         f"multiple of the backward tile {(dkdv.block_m, dkdv.block_n)}")
    mode, tile_stride = 0, 0
    dbias = None
    dbias_st = None
    expanded_axes: tuple[int, ...] = ()
    if want_dbias:
        mode = dbias_mode(pb, _probe_strides(pb), dkdv.block_m, dkdv.block_n)
        key_axis = None
        if deterministic and mode == 3:  # no cross-block atomics: widen, then reduce in order
            pb, expanded_axes, key_axis = _widen_bias(pb, dkdv.block_n)
            mode = dbias_mode(pb, _probe_strides(pb), dkdv.block_m, dkdv.block_n,
                              key_tiles=key_axis is not None)
        if deterministic and mode == 3:
            raise AssertionError(f"deterministic dbias of bias shape {pb.bias.shape} would "
                                 "need cross-block atomics")  # _widen_bias covers every case
        shape = list(pb.bias.shape)
        if key_axis is not None:  # one float32 slot per key tile
            shape[key_axis] = math.ceil(pb.seqlen_k / dkdv.block_n)
        buf_dtype = pb.bias.dtype if mode == 1 and not expanded_axes else "float32"
        # Mode 1 writes every element of every visited tile; without a mask or window (dense)
        # every tile is visited, so the buffer needs no zero fill.
        every_tile = (not pb.varlen and pb.mask is None and sparse is None
                      and pb.window == (-1, -1) and pb.seqlen_k > 0)
        alloc = _lib_empty if (mode == 1 and every_tile) else _lib_zeros
        dbias = alloc(query, tuple(shape), buf_dtype)
        dbias_st = mask_bias_strides(describe(dbias), pb.varlen)
        if key_axis is not None:
            tile_stride = describe(dbias).strides[key_axis]
            dbias_st = dataclasses.replace(dbias_st, col=0, kseq=0)

    lse_shape = (pb.heads, pb.total_q) if pb.varlen else (pb.batch, pb.heads, pb.seqlen_q)
    dsum = _lib_empty(query, lse_shape, "float32")
    dk = _lib_empty(query, pb.k.shape, dt)
    dv = _lib_empty(query, pb.v.shape, dt)
    if deterministic:
        dq = _lib_empty(query, pb.q.shape, dt)
        dq_accum = None
    else:
        dq_accum = _lib_zeros(query, pb.q.shape, "float32")
        dq = None

    def ptr(a: Any) -> int:
        return describe(a).ptr if a is not None else 0

    fwd = build_fwd_params(pb, describe(out), ptr(lse), ptr(cu_q), ptr(cu_k))
    rec = np.zeros(1, dtype=bwd_dtype_flat())
    r = rec[0]
    for name in FWD_DTYPE.names:
        r[name] = fwd[0][name]
    r["dout"], r["dlse"], r["dsum"] = ptr(dout), ptr(dlse), ptr(dsum)
    r["dq_accum"], r["dq"], r["dk"], r["dv"] = ptr(dq_accum), ptr(dq), ptr(dk), ptr(dv)
    r["dbias"] = ptr(dbias)
    for name, arr in (("do", dout), ("dq", dq), ("dk", dk), ("dv", dv), ("dqa", dq_accum)):
        if arr is None:
            continue
        bs, rs, hs = qkv_strides(describe(arr), pb.varlen)
        r[f"{name}_batch_stride"], r[f"{name}_row_stride"], r[f"{name}_head_stride"] = bs, rs, hs
    if dbias_st is not None:
        for field in ("batch", "head", "row", "col", "qseq", "kseq"):
            r[f"dbias_{field}_stride"] = getattr(dbias_st, field)
    r["dbias_tile_stride"] = tile_stride
    r["dbias_mode"] = mode
    r["dbias_is_fp32"] = int(dbias is not None and describe(dbias).dtype == "float32")
    r["scale"] = pb.scale
    sp_grid = None
    if sparse is not None:
        for field in ("full_count", "full_idx", "partial_count", "partial_idx", "partial_slot",
                      "partial_bits"):
            r[f"sp_{field}"] = ptr(getattr(sparse, field))
        for name, value in sparse_fields(sparse).items():
            r[name] = value
        grid_shape = tuple(int(n) for n in describe(sparse.full_count).shape) + (
            math.ceil(pb.seqlen_k / sparse.block_n),)
        sp_grid = _lib_empty(query, grid_shape, "int32")
        r["sp_grid"], r["sp_grid_cols"] = ptr(sp_grid), grid_shape[-1]

    empty = pb.batch == 0 or (pb.varlen and pb.total_q == 0) or (not pb.varlen and
                                                                  pb.seqlen_q == 0)
    if not empty:
        import cupy

        stream = current_stream(pb.kind, pb.q.device)
        dev = pb.q.device
        with cupy.cuda.Device(dev):
            fn = get_function(pre, dev)
            fn((max(1, math.ceil(pb.seqlen_q / pre.num_warps)), pb.heads, pb.batch),
               (pre.threads, 1, 1), (r,), shared_mem=0, stream=stream)
            if sp_grid is not None and pb.seqlen_k > 0:
                fn = get_function(grid_spec, dev)
                bm, hm, nrb = sp_grid.shape[:3]
                fn((nrb, hm, bm), (grid_spec.threads, 1, 1), (r,), shared_mem=0, stream=stream)
            if pb.seqlen_k > 0:
                fn = get_function(dkdv, dev)
                fn((math.ceil(pb.seqlen_k / dkdv.block_n), pb.kv_heads, pb.batch),
                   (dkdv.threads, 1, 1), (r,), shared_mem=dkdv.dynamic_smem, stream=stream)
            if dqs is not None:
                fn = get_function(dqs, dev)
                fn((max(1, math.ceil(pb.seqlen_q / dqs.block_m)), pb.heads, pb.batch),
                   (dqs.threads, 1, 1), (r,), shared_mem=dqs.dynamic_smem, stream=stream)
    elif pb.seqlen_k > 0:  # no query rows: dK = dV = 0
        dk = _lib_zeros(query, pb.k.shape, dt)
        dv = _lib_zeros(query, pb.v.shape, dt)
    if pb.seqlen_k == 0 or (pb.varlen and pb.total_k == 0):
        dk = _lib_zeros(query, pb.k.shape, dt)
        dv = _lib_zeros(query, pb.v.shape, dt)
    if dq is None:
        dq = _lib_cast(dq_accum, dt)
    if expanded_axes:  # a fixed-order reduction over the widened dims (float32)
        dbias = dbias.sum(expanded_axes, keepdims=True) if array_kind(dbias) != "torch" else \
            dbias.sum(dim=expanded_axes, keepdim=True)
    if dbias is not None and describe(dbias).dtype != pb.bias.dtype:
        dbias = _lib_cast(dbias, pb.bias.dtype)
    return dq, dk, dv, dbias


def _probe_strides(pb: Problem):
    """The bias's strides as a contiguous dbias of its shape would have them."""
    return mask_bias_strides(
        dataclasses.replace(pb.bias, strides=_contig_strides(pb.bias.shape)), pb.varlen)


def _widen_bias(pb: Problem, block_n: int) -> tuple[Problem, tuple[int, ...], int | None]:
    """For deterministic dbias, the dims whose gradient several CTAs would add into. Batch
    (B > 1) and a single head with several kv heads: the bias is seen as widened (stride 0)
    there, so every CTA writes its own slice of a float32 buffer of the widened shape. Keys
    (a key-broadcast bias longer than one key tile): the buffer gets one slot per key tile on
    the returned key axis. Returns (problem, axes to sum over afterwards, key axis or None)."""
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
    # (a varlen mask/bias always has a key dim: validate.check_varlen)
    key_axis = 3 if not pb.varlen and shape[3] == 1 and pb.seqlen_k > block_n else None
    widened = dataclasses.replace(bias, shape=tuple(shape), strides=tuple(strides))
    axes = tuple(sorted(wide)) + ((key_axis,) if key_axis is not None else ())
    return dataclasses.replace(pb, bias=widened), tuple(sorted(axes)), key_axis


def _contig_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
