"""Kernel selection, module loading and launches on the caller's current stream.

This is the only module besides ``arrays`` that touches CuPy/torch objects. Loaded modules are
cached per (spec, device); launches take the params record by value and never synchronize.
"""

from __future__ import annotations

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


FWD_KERNELS = ("simple", "mma")


def fwd_kernel_choice() -> str:
    """``DMATTN_FWD_KERNEL``: "simple" (default until the tensor-core kernel has passed the GPU
    suite) or "mma" (tensor cores; needs 16-byte aligned rows, else falls back to simple)."""
    choice = os.environ.get("DMATTN_FWD_KERNEL", "simple")
    if choice not in FWD_KERNELS:
        raise ValueError(f"DMATTN_FWD_KERNEL must be one of {FWD_KERNELS}, got {choice!r}")
    return choice


def rows_aligned(pb: Problem, out_strides: tuple[int, ...] | None = None) -> bool:
    """q/k/v (and out) pointers 16-byte aligned and every non-last stride a multiple of 8."""
    infos = (pb.q, pb.k, pb.v)
    ok = all(i.ptr % 16 == 0 and all(st % 8 == 0 for st in i.strides[:-1]) for i in infos)
    return ok and (out_strides is None or all(st % 8 == 0 for st in out_strides[:-1]))


def mma_supports(head_dim: int, has_mask: bool, has_bias: bool = False,
                 sparse: bool = False) -> bool:
    """Tensor-core variants that compile without spills: a bool mask's per-fragment bits do
    not fit beside the 128-float output accumulator of head dims > 128 yet, nor, with block
    lists and a bias as well, beside head dim 128's."""
    if has_mask and head_dim > 128:
        return False
    return not (sparse and has_mask and has_bias and head_dim > 96)


def select_fwd_spec(pb: Problem, debug_counters: bool = False,
                    kernel: str = "simple", sparse: bool = False) -> KernelSpec:
    """The forward specialization for a problem and kernel family."""
    common = dict(dtype="fp16" if pb.dtype == "float16" else "bf16",
                  head_dim=padded_head_dim(pb.head_dim), has_mask=pb.mask is not None,
                  has_bias=pb.bias is not None, varlen=pb.varlen, debug_counters=debug_counters)
    hd = common["head_dim"]
    if kernel == "mma" and not mma_supports(hd, pb.mask is not None):
        kernel = "simple"
    if kernel == "mma":
        return KernelSpec(kind="fwd_mma", block_m=64, block_n=64 if hd <= 128 else 32,
                          num_warps=4, sparse=sparse, **common)
    return KernelSpec(kind="fwd", block_m=8, block_n=32, num_warps=8, **common)


def get_function(spec: KernelSpec, device: int) -> Any:
    key = (spec, device)
    with _lock:
        fn = _functions.get(key)
    if fn is not None:
        return fn
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
                sparse: SparseMask | None = None) -> tuple[Any, Any]:
    """Launch the forward kernel; returns (out, lse) in the query's library and device."""
    if pb.varlen and _check_enabled():
        check_cu_seqlens_values(_to_host(cu_q), _to_host(cu_k), pb.total_q, pb.total_k,
                                pb.seqlen_q, pb.seqlen_k)
    out = _empty_like_query(query, pb.q.shape)
    lse_shape = (pb.heads, pb.total_q) if pb.varlen else (pb.batch, pb.heads, pb.seqlen_q)
    lse = _empty_like_query(query, lse_shape, "float32") if return_lse else None
    if out.size == 0 or (not pb.varlen and pb.seqlen_q == 0):
        return out, lse
    aligned = rows_aligned(pb, describe(out).strides)
    kernel = fwd_kernel_choice()
    if sparse is not None:  # block lists are read by the tensor-core kernel only
        if not aligned or not mma_supports(padded_head_dim(pb.head_dim), pb.mask is not None,
                                           pb.bias is not None, sparse=True):
            raise NotImplementedError(
                "block-sparse masks on the CUDA backend need q/k/v rows 16-byte aligned (strides "
                "multiples of 8 elements) and, with attn_mask, head dim <= 128 (<= 96 with "
                "attn_bias too); use backend='reference' or pass sparse_mask.to_dense() as "
                "attn_mask")
        kernel = "mma"
    elif kernel == "mma" and not aligned:
        kernel = "simple"
    if sparse is None and tile_counters is None and pb.batch > 0:
        from .decode import run_decode, use_decode  # short queries: GQA packing + split-KV

        if use_decode(pb, aligned):
            run_decode(pb, query, out, lse, cu_q, cu_k)
            return out, lse
    spec = select_fwd_spec(pb, debug_counters=tile_counters is not None, kernel=kernel,
                           sparse=sparse is not None)

    def ptr(a: Any) -> int:
        return describe(a).ptr if a is not None else 0

    rec = build_fwd_params(pb, describe(out), ptr(lse), ptr(cu_q), ptr(cu_k), ptr(tile_counters))
    if sparse is not None:
        check_block_fits(sparse, spec)
        arrs = sparse_buffers(sparse, query)
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
