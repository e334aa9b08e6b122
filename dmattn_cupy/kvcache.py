"""The KV-cache API: ``flash_dmattn_with_kvcache``, as FlashAttention's ``flash_attn_with_kvcache``.

Validation -> (optional) one append kernel writing k/v into the cache in place -> the decode
kernel (``decode.plan_decode``) over each sequence's ``cache_seqlens[b] + S_new`` keys, with the
block table, the lengths and the key-based mask/bias strides as extra ``FwdParams`` fields. The
decode kernel takes any query length (GQA-packed 16-row slabs; tuned for a few queries).
The launches of a call form one ``Plan`` (inputs ``layout.KV_INPUTS``); ``fastpath.kvcache``
keeps it, so a later call with the same signature (an int ``cache_seqlens`` by value) only
allocates its outputs and patches its pointers.
A key-based cache mask/bias ``(B|1, S_max, h')`` or paged ``(num_pages, page_size, h')`` is seen
by the kernel as the 4-D ``(B, h', 1, S)`` view the dense path already reads (row stride 0).
Inference only: no gradient flows through it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import arrays, decode, edge, env, fastpath, reference_kvcache, runtime
from .arrays import ArrayInfo, describe
from .launch_plan import Alloc, Launch, Plan
from .layout import KV_INPUTS
from .params import new_kv_append_params
from .spec import KernelSpec
from .validate import (
    Problem,
    check_flag,
    check_int32,
    check_options,
    common_kind,
    resolve_backend,
)

PAGE_MULTIPLE = 16   # page sizes: positive multiples of this (the decode kernel's 16-key groups)
APPEND_WARPS = 4     # (row, kv head) pairs per append CTA


@dataclass(frozen=True)
class KvProblem:
    """A validated KV-cache call. ``pb`` is the attention problem the decode kernel runs
    (k/v = the caches; mask/bias = their 4-D views; seqlen_k = the keys it may read)."""
    pb: Problem
    capacity: int                 # keys a sequence can hold: S_max or max_pages * page_size
    page_size: int                # 0 = not paged
    s_new: int                    # appended keys per sequence (0 = none)
    seqlens_int: int | None       # cache_seqlens given as an int (or None = the capacity)
    seqlens: ArrayInfo | None     # cache_seqlens given as an int32 array
    block_table: ArrayInfo | None
    k_new: ArrayInfo | None
    v_new: ArrayInfo | None


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _aligned_rows(info: ArrayInfo) -> bool:
    """16-byte aligned base and rows (the kernels copy 16-byte chunks of 16-bit elements)."""
    return info.ptr % 16 == 0 and all(st % 8 == 0 for st in info.strides[:-1])


def _keyed_view(name: str, info: ArrayInfo, first: tuple[int, ...], keys: int, h: int,
                hk: int, paged: bool) -> ArrayInfo:
    """A cache mask/bias (first, keys, h') as the 4-D (first, h', 1, keys) view the kernels
    read (row stride 0: every query of the sequence shares it)."""
    lead = "num_pages" if paged else "batch"
    want = f"({'|'.join(str(f) for f in first)}, {keys}, {{1|{hk}|{h}}})"
    if info.ndim != 3 or info.shape[0] not in first or info.shape[1] != keys or \
            info.shape[2] not in (1, hk, h):
        raise ValueError(f"{name} over the cache must be key-based 3-D {want} ({lead}, "
                         f"{'page_size' if paged else 'S_max'}, heads), like the cache's first "
                         f"two dims; got shape {info.shape}")
    s0, s1, s2 = info.strides
    return dataclasses.replace(info, shape=(info.shape[0], info.shape[2], 1, info.shape[1]),
                               strides=(s0, s2, 0, s1))


def check_kvcache(query: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, cache_seqlens: Any,
                  block_table: Any, attn_mask: Any, attn_bias: Any, softmax_scale: Any,
                  is_causal: Any, window_size: Any, softcap: Any, num_splits: Any,
                  return_lse: Any, backend: Any) -> KvProblem:
    """Every host-side rule of the KV-cache API; errors name the argument."""
    named = {"query": query, "k_cache": k_cache, "v_cache": v_cache}
    for n, x in named.items():
        if x is None:
            raise TypeError(f"{n} is required, got None")
    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys/values to append) must be given together, got "
                         f"k={'None' if k is None else 'an array'}, "
                         f"v={'None' if v is None else 'an array'}")
    seq_arr = None if cache_seqlens is None or _is_int(cache_seqlens) else cache_seqlens
    kind = common_kind({**named, "k": k, "v": v, "cache_seqlens": seq_arr,
                        "block_table": block_table, "attn_mask": attn_mask,
                        "attn_bias": attn_bias})
    q, kc, vc = describe(query), describe(k_cache), describe(v_cache)
    be = resolve_backend(backend, kind, on_host=q.device < 0)
    check_flag("return_lse", return_lse, None)
    if not _is_int(num_splits) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = chosen from the shapes), got "
                         f"{num_splits!r}")
    if q.ndim != 4:
        raise ValueError(f"query must be 4-D (batch, seqlen_q, heads, head_dim), got shape "
                         f"{q.shape}")
    for n, info in (("k_cache", kc), ("v_cache", vc)):
        if info.ndim != 4:
            raise ValueError(f"{n} must be 4-D (batch, S_max, kv_heads, head_dim) or paged "
                             f"(num_pages, page_size, kv_heads, head_dim), got {info.shape}")
    if kc.shape != vc.shape:
        raise ValueError(f"k_cache and v_cache shapes must match, got {kc.shape} and "
                         f"{vc.shape}")
    b, sq, h, d = q.shape
    _, s1, hk, dk = kc.shape
    allowed = ("float16", "bfloat16") if be == "cuda" else \
        ("float16", "bfloat16", "float32", "float64")
    for n, info in (("query", q), ("k_cache", kc), ("v_cache", vc)):
        if info.dtype not in allowed:
            raise TypeError(f"{n} dtype must be one of {allowed} on the {be} backend, got "
                            f"{info.dtype}")
    if be == "cuda" and len({q.dtype, kc.dtype, vc.dtype}) > 1:
        raise TypeError(f"query, k_cache and v_cache must share one dtype, got {q.dtype}, "
                        f"{kc.dtype}, {vc.dtype}")
    if hk < 1 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of the cache's kv heads ({hk})")
    if d != dk:
        raise ValueError(f"head dims of query and cache must match, got {d} and {dk}")
    if d % 8 or not 8 <= d <= 256:
        raise ValueError(f"head dim must be a multiple of 8 in [8, 256], got {d}")
    check_int32("query seqlen (query.shape[1])", sq)

    # Dense or paged, and the capacity of one sequence.
    bt = None
    if block_table is None:
        if kc.shape[0] != b:
            raise ValueError(f"k_cache batch ({kc.shape[0]}) must equal query batch ({b}) "
                             "(a paged cache needs block_table)")
        page_size, capacity = 0, s1
    else:
        bt = describe(block_table)
        if bt.dtype != "int32":
            raise TypeError(f"block_table dtype must be int32, got {bt.dtype}")
        if bt.ndim != 2 or bt.shape[0] != b:
            raise ValueError(f"block_table must be 2-D (batch={b}, max_pages), got shape "
                             f"{bt.shape}")
        page_size = s1
        if page_size < PAGE_MULTIPLE or page_size % PAGE_MULTIPLE:
            raise ValueError(f"page_size (k_cache.shape[1] of a paged cache) must be a positive "
                             f"multiple of {PAGE_MULTIPLE}, got {page_size}")
        capacity = bt.shape[1] * page_size
        if bt.shape[1] > 0 and be == "cuda" and bt.strides[1] != 1:
            raise ValueError(f"block_table must have stride 1 over pages, got strides "
                             f"{bt.strides}")
    check_int32("cache capacity (S_max or max_pages * page_size)", capacity)

    # New keys/values.
    kn = vn = None
    s_new = 0
    if k is not None:
        kn, vn = describe(k), describe(v)
        for n, info in (("k", kn), ("v", vn)):
            if info.ndim != 4 or info.shape[0] != b or info.shape[2:] != (hk, d):
                raise ValueError(f"{n} (new keys/values) must be 4-D (batch={b}, S_new, "
                                 f"kv_heads={hk}, head_dim={d}), got shape {info.shape}")
            if be == "cuda" and info.dtype != kc.dtype:
                raise TypeError(f"{n} dtype must be the cache's ({kc.dtype}), got {info.dtype}")
            if be != "cuda" and info.dtype not in allowed:
                raise TypeError(f"{n} dtype must be one of {allowed}, got {info.dtype}")
        if kn.shape != vn.shape:
            raise ValueError(f"k and v shapes must match, got {kn.shape} and {vn.shape}")
        s_new = kn.shape[1]

    # Lengths.
    seqlens = None
    seqlens_int: int | None = None
    if cache_seqlens is None:
        if s_new:
            raise ValueError("cache_seqlens is required when appending k/v (where to write "
                             "them); got None")
        seqlens_int = capacity
    elif _is_int(cache_seqlens):
        seqlens_int = int(cache_seqlens)
        if seqlens_int < 0 or seqlens_int + s_new > capacity:
            raise ValueError(f"cache_seqlens ({seqlens_int}) + S_new ({s_new}) must lie in "
                             f"[0, capacity={capacity}] (the cache's S_max or max_pages * "
                             f"page_size)")
    else:
        seqlens = describe(cache_seqlens)
        if seqlens.dtype != "int32":
            raise TypeError(f"cache_seqlens must be an int or an int32 array, got dtype "
                            f"{seqlens.dtype}")
        if seqlens.shape != (b,):
            raise ValueError(f"cache_seqlens must be 1-D (batch={b},), got shape "
                             f"{seqlens.shape}")
    # Key-based mask/bias over the cache.
    first = (b, 1) if bt is None else (kc.shape[0],)
    mask = bias = None
    if attn_mask is not None:
        m = describe(attn_mask)
        if m.dtype != "bool":
            raise TypeError(f"attn_mask dtype must be bool, got {m.dtype}")
        mask = _keyed_view("attn_mask", m, first, s1, h, hk, bt is not None)
    if attn_bias is not None:
        bi = describe(attn_bias)
        ok = (q.dtype, "float32") if be == "cuda" else allowed
        if bi.dtype not in ok:
            raise TypeError(f"attn_bias dtype must be one of {tuple(dict.fromkeys(ok))} on the "
                            f"{be} backend, got {bi.dtype}")
        bias = _keyed_view("attn_bias", bi, first, s1, h, hk, bt is not None)

    devs = {n: i.device for n, i in (("query", q), ("k_cache", kc), ("v_cache", vc),
                                     ("k", kn), ("v", vn), ("cache_seqlens", seqlens),
                                     ("block_table", bt), ("attn_mask", mask),
                                     ("attn_bias", bias)) if i is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all arrays must be on one device, got {devs}")
    if be == "cuda":
        for n, info in (("k_cache", kc), ("v_cache", vc)):
            if info.strides[-1] != 1 or not _aligned_rows(info):
                raise ValueError(f"{n} rows must be 16-byte aligned with stride 1 over head_dim "
                                 f"(base pointer % 16 == 0, other strides multiples of 8 "
                                 f"elements), got strides {info.strides}; the cache is written "
                                 "in place, so it is never copied")
        for n, info in (("attn_mask", mask), ("attn_bias", bias)):
            if info is not None and bt is not None and info.shape[0] > 1:
                es = 1 if info.dtype == "bool" else 4 if info.dtype == "float32" else 2
                if (info.strides[0] * es) % 4:
                    raise ValueError(f"{n}: a paged mask/bias needs a page stride that is a "
                                     f"multiple of 4 bytes, got {info.strides[0] * es}")
        if b > 65535:
            raise ValueError(f"batch must be <= 65535 on the CUDA backend, got {b}")
    scale, cap, window = check_options(softmax_scale, softcap, window_size, is_causal, d)
    # The kernel reads min(cache_seqlens[b] + S_new, seqlen_k) keys of an array's sequences.
    fixed = seqlens is None and cache_seqlens is not None
    seqlen_k = int(seqlens_int) + s_new if fixed else capacity
    pb = Problem(kind=kind, backend=be, varlen=False, batch=b, seqlen_q=sq, seqlen_k=seqlen_k,
                 heads=h, kv_heads=hk, head_dim=d, dtype=q.dtype, scale=scale, softcap=cap,
                 window=window, q=q, k=kc, v=vc, mask=mask, bias=bias)
    return KvProblem(pb=pb, capacity=capacity, page_size=page_size, s_new=s_new,
                     seqlens_int=seqlens_int, seqlens=seqlens, block_table=bt, k_new=kn,
                     v_new=vn)


def check_seqlens_values(seqlens: np.ndarray, s_new: int, capacity: int,
                         block_table: np.ndarray | None, num_pages: int,
                         page_size: int) -> None:
    """Host copies of the device-side inputs (``DMATTN_CHECK=1`` and the reference backend):
    every cache_seqlens[b] + S_new within the capacity, and every page a sequence uses in
    [0, num_pages)."""
    seqlens = np.asarray(seqlens, dtype=np.int64)
    bad = np.nonzero((seqlens < 0) | (seqlens + s_new > capacity))[0]
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"cache_seqlens[{b}] = {int(seqlens[b])} (+ S_new = {s_new}) must lie in "
                         f"[0, capacity={capacity}]")
    if block_table is None:
        return
    for b, n in enumerate(seqlens + s_new):
        used = np.asarray(block_table)[b, :math.ceil(int(n) / page_size)]
        if used.size and (used.min() < 0 or used.max() >= num_pages):
            raise ValueError(f"block_table[{b}] names pages outside [0, num_pages={num_pages}) "
                             f"among the {used.size} its {int(n)} keys use")


def append_spec(arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="kv_append", block_m=1, block_n=1, num_warps=APPEND_WARPS,
                      arch=arch)


def all_kvcache_specs(arch: str = "sm_80") -> list[KernelSpec]:
    """The append kernel (the attention itself runs the decode specs)."""
    return [append_spec(arch)]


def _ptr(info: ArrayInfo | None) -> int:
    return 0 if info is None else info.ptr


def run_append(kp: KvProblem, stream: Any) -> None:
    """The one append kernel: k/v rows into the cache at cache_seqlens (+ i), in place."""
    if kp.s_new and kp.pb.batch:
        kernel, grid, rec = _append_launch(kp)
        runtime.launch(kernel, grid, (rec[0],), stream)


def plan_append(kp: KvProblem, plan: Plan) -> None:
    """``run_append``'s launch as the first of ``plan`` (its pointers slots of ``KV_INPUTS``)."""
    if kp.s_new and kp.pb.batch:
        kernel, grid, rec = _append_launch(kp)
        for name, field in (("k_new", "k_new"), ("v_new", "v_new"), ("k", "k_cache"),
                            ("v", "v_cache"), ("block_table", "block_table"),
                            ("cache_seqlens", "cache_seqlens")):
            plan.slot(name, rec, field)
        plan.launches.append(Launch(kernel, grid, (rec,)))


def _append_launch(kp: KvProblem) -> tuple[Any, tuple[int, int, int], np.ndarray]:
    """(kernel, grid, KvAppendParams record) of the append kernel for ``kp``."""
    pb = kp.pb
    rec = new_kv_append_params()
    r = rec[0]
    r["k_new"], r["v_new"] = kp.k_new.ptr, kp.v_new.ptr
    r["k_cache"], r["v_cache"] = pb.k.ptr, pb.v.ptr
    r["block_table"], r["cache_seqlens"] = _ptr(kp.block_table), _ptr(kp.seqlens)
    for name, info in (("knew", kp.k_new), ("vnew", kp.v_new), ("kc", pb.k), ("vc", pb.v)):
        r[f"{name}_batch_stride"], r[f"{name}_row_stride"], r[f"{name}_head_stride"] = \
            info.strides[:3]
    r["block_table_batch_stride"] = kp.block_table.strides[0] if kp.block_table else 0
    r["batch"], r["seqlen_new"], r["kv_heads"] = pb.batch, kp.s_new, pb.kv_heads
    r["head_dim"], r["page_size"], r["capacity"] = pb.head_dim, kp.page_size, kp.capacity
    r["seqlen_base"] = kp.seqlens_int or 0
    props = runtime.device_props(pb.q.device)
    kernel = runtime.get_kernel(append_spec(props.arch), pb.q.device)
    return kernel, (math.ceil(kp.s_new * pb.kv_heads / APPEND_WARPS), pb.batch, 1), rec


def decode_fields(kp: KvProblem) -> dict[str, int]:
    """The FwdParams fields the KV-cache call adds to the decode launch."""
    return {"cache_seqlens": _ptr(kp.seqlens), "block_table": _ptr(kp.block_table),
            "block_table_batch_stride": kp.block_table.strides[0] if kp.block_table else 0,
            "page_size": kp.page_size, "seqlen_k_new": kp.s_new}


def _run_reference(kp: KvProblem, query: Any, k_cache: Any, v_cache: Any, k: Any, v: Any,
                   cache_seqlens: Any, block_table: Any, attn_mask: Any,
                   attn_bias: Any) -> tuple[Any, Any]:
    pb = kp.pb
    f64 = arrays.to_numpy_f64
    seqlens = (np.full(pb.batch, kp.seqlens_int, np.int64) if kp.seqlens is None
               else arrays.to_host(cache_seqlens).astype(np.int64))
    bt = None if block_table is None else arrays.to_host(block_table)
    check_seqlens_values(seqlens, kp.s_new, kp.capacity, bt, pb.k.shape[0], kp.page_size)
    out, lse = reference_kvcache.kvcache_forward(
        f64(query), f64(k_cache), f64(v_cache), seqlens, f64(k), f64(v), bt, f64(attn_mask),
        f64(attn_bias), pb.scale, pb.softcap, pb.window)
    if k is not None:  # the append, in place (host or device arrays alike)
        reference_kvcache.append(k_cache, v_cache, k, v, seqlens, bt)
    return arrays.from_numpy_like(out, query), arrays.lse_like(lse, query)


def flash_dmattn_with_kvcache(query: Any, k_cache: Any, v_cache: Any, k: Any = None,
                              v: Any = None, cache_seqlens: Any = None, block_table: Any = None,
                              attn_mask: Any = None, attn_bias: Any = None,
                              softmax_scale: float | None = None, is_causal: bool = False,
                              window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              num_splits: int = 0, return_lse: bool = False,
                              backend: str = "auto") -> Any:
    """Attention of ``query`` over a KV cache, after appending ``k``/``v`` to it in place; see
    docs/kvcache.md for the contract. Returns ``out`` or ``(out, lse)``."""
    args = (query, k_cache, v_cache, k, v, cache_seqlens, block_table, attn_mask, attn_bias,
            softmax_scale, is_causal, window_size, softcap, num_splits, return_lse, backend)
    res = fastpath.kvcache(*args, kvcache_call)
    return kvcache_call(*args)[0] if res is fastpath.MISS else res


def kvcache_call(query: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, cache_seqlens: Any,
                 block_table: Any, attn_mask: Any, attn_bias: Any, softmax_scale: Any,
                 is_causal: Any, window_size: Any, softcap: Any, num_splits: Any,
                 return_lse: Any, backend: Any) -> tuple[Any, Plan | None, Any]:
    """The validated call: (its result, ``out`` or ``(out, lse)``; the plan it launched, None
    when it launched none or ran the reference; its Problem). The plan is cacheable when a
    call with the same signature builds the same one: no copies, no host-side value checks."""
    kp = check_kvcache(query, k_cache, v_cache, k, v, cache_seqlens, block_table, attn_mask,
                       attn_bias, softmax_scale, is_causal, window_size, softcap, num_splits,
                       return_lse, backend)
    pb = kp.pb
    lse_shape = (pb.batch, pb.heads, pb.seqlen_q)
    if pb.backend == "reference":
        if pb.batch == 0:
            return edge.empty_forward(query, lse_shape, return_lse), None, pb
        out, lse = _run_reference(kp, query, k_cache, v_cache, k, v, cache_seqlens,
                                  block_table, attn_mask, attn_bias)
        return ((out, lse) if return_lse else out), None, pb
    stream = runtime.current_stream(pb.kind, pb.q.device)
    check = env.check_enabled()
    if check:
        bt = None if block_table is None else arrays.to_host(block_table)
        seqlens = (np.full(pb.batch, kp.seqlens_int, np.int64) if kp.seqlens is None
                   else arrays.to_host(cache_seqlens))
        check_seqlens_values(seqlens, kp.s_new, kp.capacity, bt, pb.k.shape[0], kp.page_size)
    keep_alive: list[Any] = []  # copies the launches read: alive until this function returns
    copied = False
    if kp.k_new is not None and not (_aligned_rows(kp.k_new) and _aligned_rows(kp.v_new)):
        kc, vc = arrays.contiguous_copy(k), arrays.contiguous_copy(v)
        keep_alive += [kc, vc]
        kp = dataclasses.replace(kp, k_new=describe(kc), v_new=describe(vc))
        copied = True
    if pb.batch == 0 or pb.seqlen_q == 0 or pb.heads == 0:   # the append still runs
        run_append(kp, stream)
        return edge.empty_forward(query, lse_shape, return_lse), None, pb
    if not _aligned_rows(pb.q):
        qc = arrays.contiguous_copy(query)
        keep_alive.append(qc)
        pb = dataclasses.replace(pb, q=describe(qc))
        copied = True
    out = arrays.empty(query, pb.q.shape)
    lse = arrays.empty(query, lse_shape, "float32") if return_lse else None
    allocs = [Alloc("out", pb.q.shape, None)]
    if return_lse:
        allocs.append(Alloc("lse", lse_shape, "float32"))
    plan = Plan(device=pb.q.device, inputs=KV_INPUTS, allocs=allocs,
                cacheable=not (copied or check))
    plan_append(kp, plan)
    keep_alive.append(decode.plan_decode(pb, plan, query, describe(out),
                                         0 if lse is None else describe(lse).ptr, 0, 0,
                                         stream, decode_fields(kp),
                                         num_splits=int(num_splits)))
    plan.run(stream)
    return ((out, lse) if return_lse else out), plan, pb
