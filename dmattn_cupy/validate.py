"""Host-side validation of every API rule: shapes, dtypes, kinds, devices, options.

Nothing here syncs the device or reads device memory. Each error names the argument, what was
given and what is accepted. The result is a frozen ``Problem`` the later stages consume.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import ArrayInfo, common_kind, describe
from .masks import SparseMask

BACKENDS = ("auto", "cuda", "reference")
INT32_MAX = 2**31 - 1  # lengths and window bounds travel to the kernels in int32 fields
F32_TINY = float(np.finfo(np.float32).tiny)  # a softcap below this is no float32 normal
F32_MAX = float(np.finfo(np.float32).max)
CUDA_QKV_DTYPES = ("float16", "bfloat16")
REF_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y / gridDim.z: heads and batch (forward_sm90
                     # declines problems whose query tiles would exceed its grid's z)


@dataclass(frozen=True)
class Problem:
    """A validated attention call (dense or varlen), independent of the array library."""
    kind: str                  # numpy | cupy | torch
    backend: str               # cuda | reference
    varlen: bool
    batch: int
    seqlen_q: int              # dense: Sq; varlen: max_seqlen_q
    seqlen_k: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    scale: float
    softcap: float
    window: tuple[int, int]    # causal folded in: right = min(right, 0) (or 0 if unbounded)
    q: ArrayInfo
    k: ArrayInfo
    v: ArrayInfo
    mask: ArrayInfo | None
    bias: ArrayInfo | None
    total_q: int = 0           # varlen only
    total_k: int = 0


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_flag(name: str, val: Any, default: bool | None = False) -> bool:
    """A bool flag: ``bool`` or ``numpy.bool_``; ``None`` means ``default`` (flash-dmattn's
    ``Optional[bool]`` flags), unless ``default`` is None (then None is rejected)."""
    if val is None and default is not None:
        return default
    if isinstance(val, (bool, np.bool_)):
        return bool(val)
    accepted = "a bool" if default is None else f"a bool or None (= {default})"
    raise TypeError(f"{name} must be {accepted}, got {type(val).__name__} {val!r}")


def check_int32(name: str, n: int) -> None:
    """A length the kernels keep in an int32 field."""
    if n > INT32_MAX:
        raise ValueError(f"{name} must be <= {INT32_MAX} (2**31 - 1, the kernels' int32 "
                         f"fields), got {n}")


def normalize_call(is_causal: Any, softcap: Any, deterministic: Any, return_lse: Any,
                   softmax_scale: Any = None, scale: Any = None,
                   return_attn_probs: Any = None) -> tuple[bool, Any, bool, bool, Any, bool]:
    """The public functions' flags, with flash-dmattn 1.x spellings folded in: ``None`` for
    ``is_causal``/``softcap``/``deterministic`` (their defaults), ``numpy.bool_`` for flags,
    ``scale=`` for ``softmax_scale=`` and ``return_attn_probs=``. Returns (is_causal, softcap,
    deterministic, return_lse, softmax_scale, return_attn_probs)."""
    if scale is not None:
        if softmax_scale is not None and softmax_scale != scale:
            raise TypeError(f"pass the scale once: softmax_scale={softmax_scale!r} and its "
                            f"alias scale={scale!r} differ")
        softmax_scale = scale
    return (check_flag("is_causal", is_causal), 0.0 if softcap is None else softcap,
            check_flag("deterministic", deterministic), check_flag("return_lse", return_lse, None),
            softmax_scale, check_flag("return_attn_probs", return_attn_probs))


def resolve_backend(backend: Any, kind: str, on_host: bool = False) -> str:
    """auto -> cuda for GPU arrays, reference for host arrays (NumPy, CPU torch tensors)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    host = on_host or kind == "numpy"
    if backend == "auto":
        return "reference" if host else "cuda"
    if backend == "cuda" and host:
        what = "numpy arrays" if kind == "numpy" else f"host (CPU) {kind} arrays"
        raise TypeError(f"backend='cuda' needs GPU arrays (cupy.ndarray or CUDA torch.Tensor), "
                        f"got {what}; move them with cupy.asarray(...) / .cuda(), or use "
                        "backend='reference'")
    return backend


def check_options(softmax_scale: Any, softcap: Any, window_size: Any, is_causal: Any,
                  head_dim: int) -> tuple[float, float, tuple[int, int]]:
    is_causal = check_flag("is_causal", is_causal)
    if softcap is None:  # flash-dmattn's Optional[float]: None = off
        softcap = 0.0
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
            raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
        scale = float(softmax_scale)
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a float >= 0, got {softcap!r}")
    if not (math.isfinite(float(softcap)) and softcap >= 0):
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables it), got {softcap!r}")
    if softcap > 0 and not F32_TINY <= float(softcap) <= F32_MAX:
        raise ValueError(f"softcap={softcap!r} does not survive float32 (the kernels' type: it "
                         f"would round to 0 or overflow); use 0 to disable it or a value in "
                         f"[{F32_TINY:.3g}, {F32_MAX:.3g}]")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(_is_int(w) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size!r}")
    for side, w in (("window_size[0] (left)", left), ("window_size[1] (right)", right)):
        check_int32(side, w)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return scale, float(softcap), (left, right)


def _check_float_dtype(name: str, info: ArrayInfo, backend: str, allowed: tuple[str, ...]) -> None:
    if info.dtype not in allowed:
        raise TypeError(f"{name} dtype must be one of {allowed} on the {backend} backend, "
                        f"got {info.dtype}")


def _check_qkv(infos: dict[str, ArrayInfo], backend: str, ndim: int, layout: str) -> None:
    for name, info in infos.items():
        if info.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {info.shape}")
    allowed = CUDA_QKV_DTYPES if backend == "cuda" else REF_FLOAT_DTYPES
    for name, info in infos.items():
        _check_float_dtype(name, info, backend, allowed)
    dts = {info.dtype for info in infos.values()}
    if len(dts) > 1:
        got = ", ".join(f"{n}={i.dtype}" for n, i in infos.items())
        raise TypeError(f"query, key and value must share one dtype, got {got}")
    if backend == "cuda":
        for name, info in infos.items():
            if info.shape[-1] > 1 and info.strides[-1] != 1:
                raise ValueError(f"{name} must have stride 1 in its last (head) dimension, got "
                                 f"strides {info.strides}; call .contiguous() on it")


def _check_heads_dim(h: int, hk: int, d: int, dv: int) -> None:
    if hk < 1 or h % hk != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    if d != dv:
        raise ValueError(f"head dims of query/key/value must match, got {d} and {dv}")
    if d % 8 != 0 or not 8 <= d <= 256:
        raise ValueError(f"head dim must be a multiple of 8 in [8, 256], got {d}")


def _check_cuda_grid(backend: str, batch: int, heads: int) -> None:
    if backend != "cuda":
        return
    for name, n in (("query heads", heads), ("batch", batch)):
        if n > MAX_GRID_YZ:
            raise ValueError(f"{name} must be <= {MAX_GRID_YZ} on the CUDA backend, got {n}")


def _check_devices(infos: dict[str, ArrayInfo | None]) -> None:
    devs = {n: i.device for n, i in infos.items() if i is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all arrays must be on one device, got {devs}")
    if any(d < 0 for d in devs.values()) and any(d >= 0 for d in devs.values()):
        raise ValueError(f"all arrays must be on one device (host vs CUDA), got {devs}")


def _check_mask_bias_dtypes(mask: ArrayInfo | None, bias: ArrayInfo | None, qdtype: str,
                            backend: str) -> None:
    if mask is not None and mask.dtype != "bool":
        raise TypeError(f"attn_mask dtype must be bool, got {mask.dtype}")
    if bias is not None:
        allowed = (qdtype, "float32") if backend == "cuda" else REF_FLOAT_DTYPES
        _check_float_dtype("attn_bias", bias, backend, tuple(dict.fromkeys(allowed)))


def _check_broadcast4(name: str, info: ArrayInfo, b: int, h: int, hk: int, sq: int,
                      sk: int) -> None:
    want = f"({{{b}|1}}, {{{h}|{hk}|1}}, {{{sq}|1}}, {{{sk}|1}})"
    if info.ndim != 4:
        raise ValueError(f"{name} must be 4-D {want}, got shape {info.shape}")
    ob, oh, oq, ok = info.shape
    if ob not in (b, 1) or oh not in (h, hk, 1) or oq not in (sq, 1) or ok not in (sk, 1):
        raise ValueError(f"{name} shape must be {want} (each dim full or 1), got {info.shape}")


def _prologue(query: Any, key: Any, value: Any, others: dict[str, Any], backend: Any,
              ndim: int, layout: str) -> tuple[str, str, ArrayInfo, ArrayInfo, ArrayInfo]:
    """Required q/k/v, one array kind for all, the backend, and the q/k/v rules."""
    named = {"query": query, "key": key, "value": value}
    for n, x in named.items():
        if x is None:
            raise TypeError(f"{n} is required, got None")
    kind = common_kind({**named, **others})
    q, k, v = describe(query), describe(key), describe(value)
    be = resolve_backend(backend, kind, on_host=q.device < 0)
    _check_qkv({"query": q, "key": k, "value": v}, be, ndim, layout)
    return kind, be, q, k, v


def check_dense(query: Any, key: Any, value: Any, attn_mask: Any, attn_bias: Any,
                softmax_scale: Any, is_causal: Any, window_size: Any, softcap: Any,
                backend: Any) -> Problem:
    kind, be, q, k, v = _prologue(query, key, value, {"attn_mask": attn_mask,
                                  "attn_bias": attn_bias}, backend, 4,
                                  "(batch, seqlen, heads, head_dim)")
    b, sq, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"key and value shapes must match, got {k.shape} and {v.shape}")
    bk, sk, hk, dk = k.shape
    if bk != b:
        raise ValueError(f"key batch ({bk}) must equal query batch ({b})")
    check_int32("query seqlen (query.shape[1])", sq)
    check_int32("key seqlen (key.shape[1])", sk)
    _check_heads_dim(h, hk, d, dk)
    _check_cuda_grid(be, b, h)
    mask = describe(attn_mask) if attn_mask is not None else None
    bias = describe(attn_bias) if attn_bias is not None else None
    _check_mask_bias_dtypes(mask, bias, q.dtype, be)
    if mask is not None:
        _check_broadcast4("attn_mask", mask, b, h, hk, sq, sk)
    if bias is not None:
        _check_broadcast4("attn_bias", bias, b, h, hk, sq, sk)
    _check_devices({"query": q, "key": k, "value": v, "attn_mask": mask, "attn_bias": bias})
    scale, cap, window = check_options(softmax_scale, softcap, window_size, is_causal, d)
    return Problem(kind=kind, backend=be, varlen=False, batch=b, seqlen_q=sq, seqlen_k=sk,
                   heads=h, kv_heads=hk, head_dim=d, dtype=q.dtype, scale=scale, softcap=cap,
                   window=window, q=q, k=k, v=v, mask=mask, bias=bias)


def _check_cu_seqlens(name: str, x: Any, kind: str) -> ArrayInfo:
    if x is None:
        raise TypeError(f"{name} is required, got None")
    info = describe(x)
    if info.kind != kind:
        raise TypeError(f"{name} must be a {kind} array like query, got {info.kind}")
    if info.dtype != "int32":
        raise TypeError(f"{name} dtype must be int32, got {info.dtype}")
    if info.ndim != 1 or info.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {info.shape}")
    return info


def _check_varlen_tensor(name: str, info: ArrayInfo, total_q: int, total_k: int, h: int,
                         hk: int, max_k: int) -> None:
    heads = f"{{{h}|{hk}|1}}"
    shapes = (f"query-based 3-D ({total_q}, {heads}, {max_k}) or key-based 2-D "
              f"({total_k}, {heads})")
    ok = False
    if info.ndim == 3:
        ok = info.shape[0] == total_q and info.shape[1] in (h, hk, 1) and info.shape[2] == max_k
    elif info.ndim == 2:
        ok = info.shape[0] == total_k and info.shape[1] in (h, hk, 1)
    if not ok:
        raise ValueError(f"{name} must be {shapes}; got shape {info.shape}")


def check_varlen(query: Any, key: Any, value: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
                 max_seqlen_q: Any, max_seqlen_k: Any, attn_mask: Any, attn_bias: Any,
                 softmax_scale: Any, is_causal: Any, window_size: Any, softcap: Any,
                 backend: Any) -> Problem:
    kind, be, q, k, v = _prologue(query, key, value, {"attn_mask": attn_mask,
                                  "attn_bias": attn_bias, "cu_seqlens_q": cu_seqlens_q,
                                  "cu_seqlens_k": cu_seqlens_k}, backend, 3,
                                  "(total, heads, head_dim)")
    if k.shape != v.shape:
        raise ValueError(f"key and value shapes must match, got {k.shape} and {v.shape}")
    total_q, h, d = q.shape
    total_k, hk, dk = k.shape
    _check_heads_dim(h, hk, d, dk)
    check_int32("total_q (query.shape[0])", total_q)
    check_int32("total_k (key.shape[0])", total_k)
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, kind)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, kind)
    if cq.shape != ck.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one shape (batch + 1,), got "
                         f"{cq.shape} and {ck.shape}")
    for n, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not _is_int(m):
            raise TypeError(f"{n} must be an int >= 0, got {type(m).__name__} {m!r}")
        if m < 0:
            raise ValueError(f"{n} must be an int >= 0, got {m!r}")
        check_int32(n, int(m))
    _check_cuda_grid(be, cq.shape[0] - 1, h)
    mask = describe(attn_mask) if attn_mask is not None else None
    bias = describe(attn_bias) if attn_bias is not None else None
    _check_mask_bias_dtypes(mask, bias, q.dtype, be)
    for n, info in (("attn_mask", mask), ("attn_bias", bias)):
        if info is not None:
            _check_varlen_tensor(n, info, total_q, total_k, h, hk, int(max_seqlen_k))
    _check_devices({"query": q, "key": k, "value": v, "attn_mask": mask, "attn_bias": bias,
                    "cu_seqlens_q": cq, "cu_seqlens_k": ck})
    scale, cap, window = check_options(softmax_scale, softcap, window_size, is_causal, d)
    return Problem(kind=kind, backend=be, varlen=True, batch=cq.shape[0] - 1,
                   seqlen_q=int(max_seqlen_q), seqlen_k=int(max_seqlen_k), heads=h, kv_heads=hk,
                   head_dim=d, dtype=q.dtype, scale=scale, softcap=cap, window=window, q=q, k=k,
                   v=v, mask=mask, bias=bias, total_q=total_q, total_k=total_k)


def check_cu_seqlens_values(cu_q: Any, cu_k: Any, total_q: int, total_k: int, max_q: int,
                            max_k: int) -> None:
    """Contents of host copies of cu_seqlens: first 0, non-decreasing, last = total, max fits."""
    for name, cu, total, mx, mxname in (("cu_seqlens_q", cu_q, total_q, max_q, "max_seqlen_q"),
                                        ("cu_seqlens_k", cu_k, total_k, max_k, "max_seqlen_k")):
        cu = np.asarray(cu)
        if cu[0] != 0:
            raise ValueError(f"{name}[0] must be 0, got {int(cu[0])}")
        lens = np.diff(cu)
        if (lens < 0).any():
            raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()[:16]}")
        if cu[-1] != total:
            raise ValueError(f"{name}[-1] must equal the packed total {total}, got {int(cu[-1])}")
        if lens.size and int(lens.max()) > mx:
            raise ValueError(f"{mxname}={mx} is smaller than the longest sequence "
                             f"({int(lens.max())}) in {name}")


def check_sparse(sparse_mask: Any, pb: Problem) -> None:
    """``sparse_mask``: a mask object for (seqlen_q, seqlen_k), batch/head dims 1 or full."""
    if sparse_mask is None:
        return
    if not isinstance(sparse_mask, SparseMask):
        raise TypeError(f"sparse_mask must be a dmattn_cupy mask object (CausalMask, "
                        f"BlockBitsetMask, ...), got {type(sparse_mask).__name__}")
    check_sparse_dims(sparse_mask, pb.batch, pb.heads, pb.seqlen_q, pb.seqlen_k)


def check_sparse_dims(sparse_mask: SparseMask, batch: int, heads: int, seqlen_q: int,
                      seqlen_k: int) -> None:
    """A mask's (seqlen_q, seqlen_k) equal the inputs', its batch/head dims are 1 or full."""
    if (sparse_mask.seqlen_q, sparse_mask.seqlen_k) != (seqlen_q, seqlen_k):
        raise ValueError(f"sparse_mask is for (seqlen_q, seqlen_k) = "
                         f"({sparse_mask.seqlen_q}, {sparse_mask.seqlen_k}), but the inputs have "
                         f"({seqlen_q}, {seqlen_k})")
    bm, hm = sparse_mask.batch_heads
    if bm not in (1, batch) or hm not in (1, heads):
        raise ValueError(f"sparse_mask batch/head dims must be 1 or ({batch}, {heads}), "
                         f"got ({bm}, {hm})")


def check_flags(return_lse: Any, deterministic: Any) -> None:
    for name, val in (("return_lse", return_lse), ("deterministic", deterministic)):
        if not isinstance(val, bool):
            raise TypeError(f"{name} must be a bool, got {type(val).__name__}")
