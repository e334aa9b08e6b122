"""Kernel selection, module loading and launches on the caller's current stream.

This is the only module besides ``arrays`` that touches CuPy/torch objects. Loaded modules are
cached per (spec, device); launches take the params record by value and never synchronize.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np

from .arrays import array_kind, describe
from .compile import compile_spec
from .layout import build_fwd_params, num_m_blocks
from .masks import DynamicMask, SparseMask
from .sparse_plan import SparseArrays, check_block_fits, host_arrays, sparse_fields
from .spec import KernelSpec, padded_head_dim
from .validate import Problem, check_cu_seqlens_values

_functions: dict[tuple[KernelSpec, int], Any] = {}
_lock = threading.Lock()


def device_arch(device: int) -> str:
    import cupy

    return f"sm_{cupy.cuda.Device(device).compute_capability}"


def rows_aligned(pb: Problem, out_strides: tuple[int, ...] | None = None) -> bool:
    """q/k/v (and out) pointers 16-byte aligned and every non-last stride a multiple of 8."""
    infos = (pb.q, pb.k, pb.v)
    ok = all(i.ptr % 16 == 0 and all(st % 8 == 0 for st in i.strides[:-1]) for i in infos)
    return ok and (out_strides is None or all(st % 8 == 0 for st in out_strides[:-1]))


def fwd_tile(head_dim: int, has_mask: bool, has_bias: bool, sparse: bool,
             varlen: bool = False) -> tuple[int, int, int]:
    """(block_m, block_n, num_warps) of the tensor-core kernel. 4 warps x 128 rows means two
    m16 slabs per warp (each K/V fragment read from shared memory feeds two mma), the fastest
    shape measured (BENCHMARKS.md) but register-hungry: it is used where it compiles without
    spills on sm_80 and sm_90 (precompile --check-spills); elsewhere 8 warps x one slab.
    Block-sparse masks use 64-row tiles so that 64-row mask blocks fit.
    ``DMATTN_FWD_TILE=MxNxW`` overrides (tuning)."""
    env = os.environ.get("DMATTN_FWD_TILE")
    if env:
        try:
            bm, bn, w = (int(x) for x in env.lower().split("x"))
        except ValueError:
            raise ValueError(f"DMATTN_FWD_TILE must look like 128x64x8, got {env!r}") from None
        return bm, bn, w
    if sparse:
        small_n = head_dim == 256 or (head_dim == 192 and has_mask and has_bias)
        return 64, 16 if small_n else (64 if head_dim <= 128 else 32), 4
    if head_dim <= 64:
        return 128, 64 if head_dim == 32 else 32, 4
    if (head_dim == 96 and not has_mask) or (head_dim == 128 and not (has_mask or has_bias or
                                                                        varlen)):
        return 128, 32, 4
    if head_dim <= 128:
        return 128, 64, 8
    return 128, 16 if (head_dim == 256 and (has_mask or has_bias)) else 32, 8


def sparse_supported(head_dim: int, has_mask: bool, has_bias: bool) -> bool:
    """Block lists + attn_mask at head dim 256 spill registers (ptxas, NVRTC 12 and 13)."""
    return not (head_dim > 192 and has_mask)


_smem_limits: dict[int, int | None] = {}


def device_smem_limit(device: int) -> int | None:
    """Opt-in shared memory per block of a CUDA device (None when it cannot be read)."""
    if device not in _smem_limits:
        try:
            import cupy

            rt = cupy.cuda.runtime
            _smem_limits[device] = int(rt.deviceGetAttribute(
                rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, device))
        except Exception:  # no CUDA device here (precompile, CPU-only tests)
            _smem_limits[device] = None
    return _smem_limits[device]


def select_fwd_spec(pb: Problem, debug_counters: bool = False, sparse: bool = False,
                    smem_limit: int | None = None) -> KernelSpec:
    """The forward specialization for a problem: fwd_tile's shape, or smaller 64-row tiles
    where that needs more shared memory than the device offers per block (``smem_limit``;
    None: read off the problem's device)."""
    hd = padded_head_dim(pb.head_dim)
    has_mask, has_bias = pb.mask is not None, pb.bias is not None
    bm, bn, warps = fwd_tile(hd, has_mask, has_bias, sparse, pb.varlen)
    if smem_limit is None:
        smem_limit = device_smem_limit(pb.q.device) if pb.q.device >= 0 else None
    spec = None
    for bm_, bn_, w_ in [(bm, bn, warps)] + [(64, n, 4) for n in (64, 32, 16) if n <= bn]:
        spec = KernelSpec(kind="fwd_mma", dtype="fp16" if pb.dtype == "float16" else "bf16",
                          head_dim=hd, block_m=bm_, block_n=bn_, num_warps=w_,
                          has_mask=has_mask, has_bias=has_bias, varlen=pb.varlen,
                          sparse=sparse, debug_counters=debug_counters)
        if smem_limit is None or spec.dynamic_smem <= smem_limit:
            break
    return spec


def _aligned_copies(pb: Problem, query: Any) -> tuple[Problem, list[Any]]:
    """q/k/v copied to fresh contiguous buffers (16-byte aligned rows) on the launch stream;
    returns the updated problem and the buffers to keep alive until after the launch."""
    import cupy

    keep: list[Any] = []
    infos = {}
    with cupy.cuda.Device(pb.q.device), current_stream(pb.kind, pb.q.device):
        for name in ("q", "k", "v"):
            info = getattr(pb, name)
            item = 2  # fp16 / bf16, copied as raw 16-bit words
            lo = sum((n - 1) * st for n, st in zip(info.shape, info.strides, strict=True) if st < 0)
            hi = sum((n - 1) * st for n, st in zip(info.shape, info.strides, strict=True) if st > 0)
            mem = cupy.cuda.UnownedMemory(info.ptr + lo * item, (hi - lo + 1) * item, owner=None,
                                          device_id=info.device)
            src = cupy.ndarray(info.shape, cupy.uint16, cupy.cuda.MemoryPointer(mem, -lo * item),
                               strides=tuple(st * item for st in info.strides))
            dst = src.copy(order="C")
            keep.append(dst)
            infos[name] = dataclasses.replace(info, ptr=dst.data.ptr,
                                              strides=tuple(st // item for st in dst.strides))
    return dataclasses.replace(pb, **infos), keep


def get_function(spec: Any, device: int) -> Any:
    """The loaded kernel of ``spec`` on ``device`` (compiled on first use, then cached)."""
    key = (spec, device)
    with _lock:
        fn = _functions.get(key)
    if fn is not None:
        return fn
    limit = device_smem_limit(device)
    if limit is not None and spec.dynamic_smem > limit:
        raise NotImplementedError(
            f"kernel {spec.id} needs {spec.dynamic_smem} bytes of shared memory per block; this "
            f"GPU allows {limit}. Smaller tiles for such GPUs exist for the forward kernel only; "
            "use backend='reference' here")
    import cupy

    with cupy.cuda.Device(device):
        ck = compile_spec(spec, device_arch(device))
        mod = cupy.cuda.function.Module()
        mod.load(ck.cubin)
        fn = mod.get_function(ck.lowered_name)  # fn.module keeps the module loaded
        if spec.dynamic_smem > 48 * 1024:
            from cupy_backends.cuda.api import driver

            driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    spec.dynamic_smem)
    with _lock:
        _functions[key] = fn
    return fn


class _StreamHandle:
    """A raw stream pointer exposed through the CUDA stream protocol."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def current_stream(kind: str, device: int) -> Any:
    import cupy

    if kind == "torch":
        import torch

        ptr = torch.cuda.current_stream(device).cuda_stream
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14; ExternalStream deprecated
            return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
        return cupy.cuda.ExternalStream(ptr, device)
    return cupy.cuda.get_current_stream(device)


def _empty_like_query(query: Any, shape: tuple[int, ...], dtype: str | None = None) -> Any:
    """Uninitialized output in the array library, device and (default) dtype of ``query``."""
    if array_kind(query) == "torch":
        import torch

        dt = query.dtype if dtype is None else getattr(torch, dtype)
        return torch.empty(shape, dtype=dt, device=query.device)
    import cupy

    with cupy.cuda.Device(query.device.id):
        return cupy.empty(shape, dtype=query.dtype if dtype is None else dtype)


def _check_enabled() -> bool:
    return os.environ.get("DMATTN_CHECK", "") not in ("", "0")


def _to_host(x: Any) -> np.ndarray:
    if array_kind(x) == "torch":
        return x.detach().cpu().numpy()
    import cupy

    return cupy.asnumpy(x)


def _device_array(arr: Any, query: Any, dtype: str) -> Any:
    """``arr`` as a contiguous device array on the query's device (GPU arrays in place)."""
    if arr is None:
        return None
    if isinstance(arr, np.ndarray):
        host = np.ascontiguousarray(arr, dtype=dtype)
        if array_kind(query) == "torch":
            import torch

            return torch.from_numpy(host).to(query.device)
        import cupy

        with cupy.cuda.Device(query.device.id):
            return cupy.asarray(host)
    info = describe(arr)
    contiguous = all(st == int(np.prod(info.shape[i + 1:])) for i, st in enumerate(info.strides)
                     if info.shape[i] > 1)
    if info.dtype != dtype or not contiguous:
        raise ValueError(f"sparse-mask buffers must be contiguous {dtype}, got {info.dtype} "
                         f"with strides {info.strides}")
    return arr


def sparse_buffers(mask: SparseMask, query: Any) -> SparseArrays:
    """The mask's lists on the query's device; uploads of immutable masks are cached on the
    mask, a DynamicMask's live buffers are read in place at every call."""
    dev = describe(query).device
    cache = mask.__dict__.setdefault("_dmattn_device_lists", {})
    key = (array_kind(query), dev)
    if not isinstance(mask, DynamicMask) and key in cache:
        return cache[key]
    host = host_arrays(mask)
    arrs = SparseArrays(
        *(_device_array(getattr(host, f), query, "int32")
          for f in ("full_count", "full_idx", "partial_count", "partial_idx", "partial_slot")),
        partial_bits=_device_array(host.partial_bits, query, "uint32"),
        block_m=host.block_m, block_n=host.block_n)
    if not isinstance(mask, DynamicMask):
        cache[key] = arrs
    return arrs


def run_forward(pb: Problem, query: Any, cu_q: Any = None, cu_k: Any = None,
                return_lse: bool = True, tile_counters: Any = None,
                sparse: SparseMask | SparseArrays | None = None) -> tuple[Any, Any]:
    """Launch the forward kernel; returns (out, lse) in the query's library and device.
    ``sparse``: a block mask, or its lists already on the query's device."""
    if pb.varlen and _check_enabled():
        check_cu_seqlens_values(_to_host(cu_q), _to_host(cu_k), pb.total_q, pb.total_k,
                                pb.seqlen_q, pb.seqlen_k)
    out = _empty_like_query(query, pb.q.shape)
    lse_shape = (pb.heads, pb.total_q) if pb.varlen else (pb.batch, pb.heads, pb.seqlen_q)
    lse = _empty_like_query(query, lse_shape, "float32") if return_lse else None
    if out.size == 0 or (not pb.varlen and pb.seqlen_q == 0):
        return out, lse
    if sparse is not None and not sparse_supported(padded_head_dim(pb.head_dim),
                                                   pb.mask is not None, pb.bias is not None):
        raise NotImplementedError(
            "block-sparse masks together with attn_mask need head dim <= 192 on the CUDA "
            "backend; use backend='reference' or pass sparse_mask.to_dense() & attn_mask as "
            "attn_mask")
    keep_alive: list[Any] = []  # buffers the launch reads: alive until this function returns
    if not rows_aligned(pb, describe(out).strides):  # kernels read 16-byte rows: copy once
        pb, keep_alive = _aligned_copies(pb, query)
    if sparse is None and tile_counters is None and pb.batch > 0:
        from .decode import run_decode, use_decode  # short queries: GQA packing + split-KV

        if use_decode(pb):
            run_decode(pb, query, out, lse, cu_q, cu_k)
            return out, lse
    spec = select_fwd_spec(pb, debug_counters=tile_counters is not None, sparse=sparse is not None)

    def ptr(a: Any) -> int:
        return describe(a).ptr if a is not None else 0

    rec = build_fwd_params(pb, describe(out), ptr(lse), ptr(cu_q), ptr(cu_k), ptr(tile_counters))
    if sparse is not None:
        arrs = sparse if isinstance(sparse, SparseArrays) else sparse_buffers(sparse, query)
        check_block_fits((arrs.block_m, arrs.block_n), spec)
        for field in ("full_count", "full_idx", "partial_count", "partial_idx", "partial_slot",
                      "partial_bits"):
            rec[0][f"sp_{field}"] = ptr(getattr(arrs, field))
        for name, value in sparse_fields(arrs).items():
            rec[0][name] = value
    fn = get_function(spec, pb.q.device)
    grid = (num_m_blocks(pb.seqlen_q, spec.block_m), pb.heads, pb.batch)
    if pb.batch == 0:
        return out, lse

    import cupy

    with cupy.cuda.Device(pb.q.device):
        fn(grid, (spec.threads, 1, 1), (rec[0],), shared_mem=spec.dynamic_smem,
           stream=current_stream(pb.kind, pb.q.device))
    return out, lse
