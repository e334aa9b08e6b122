"""Fast decoding: GQA-packed forward kernel with split-KV and an lse-based combine.

When queries are short (``seqlen_q`` / ``max_seqlen_q`` <= ``DECODE_MAX_Q``) the general
forward kernels would spend a 64-row query tile on a handful of rows. ``fwd_decode.cu`` packs
the query heads that share a kv head into one m16 slab (rows = (query, head-in-group) pairs),
and when (sequences x kv heads x slabs) CTAs are too few to fill the GPU it splits each key
range over ``num_splits`` CTAs whose fp32 partials ``fwd_combine.cu`` merges by their lse.

Environment (developers and tests):
- ``DMATTN_DECODE``: ``auto`` (default: short queries take this path), ``0`` (never), ``1``
  (every supported problem, whatever its query length).
- ``DMATTN_NUM_SPLITS``: unset/``auto`` = the heuristic below; an integer >= 1 forces it
  (capped at the number of key tiles and ``MAX_SPLITS``).
"""

from __future__ import annotations

import math
import os
from functools import cache
from typing import Any

from .arrays import describe
from .spec import KernelSpec, padded_head_dim
from .validate import Problem

DECODE_MAX_Q = 8        # queries per sequence up to which the decode kernel is used
BLOCK_M = 16            # packed (query, head) rows per CTA
NUM_WARPS = 4
BLOCK_N = 16 * NUM_WARPS  # keys per tile: 16 per warp
MAX_SPLITS = 128
COMBINE_WARPS = 4       # (row, head) pairs per combine CTA


def decode_mode() -> str:
    mode = os.environ.get("DMATTN_DECODE", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"DMATTN_DECODE must be 'auto', '0' or '1', got {mode!r}")
    return mode


def forced_splits() -> int | None:
    val = os.environ.get("DMATTN_NUM_SPLITS", "auto")
    if val in ("", "auto"):
        return None
    try:
        n = int(val)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"DMATTN_NUM_SPLITS must be 'auto' or an integer >= 1, got {val!r}")
    return n


def use_decode(pb: Problem) -> bool:
    """The decode path takes short-query problems (q/k/v rows are 16-byte aligned by then)."""
    mode = decode_mode()
    if mode == "0":
        return False
    return mode == "1" or pb.seqlen_q <= DECODE_MAX_Q


def _common(pb: Problem) -> dict[str, Any]:
    return dict(dtype="fp16" if pb.dtype == "float16" else "bf16",
                head_dim=padded_head_dim(pb.head_dim))


def decode_spec(pb: Problem) -> KernelSpec:
    return KernelSpec(kind="fwd_decode", block_m=BLOCK_M, block_n=BLOCK_N, num_warps=NUM_WARPS,
                      has_mask=pb.mask is not None, has_bias=pb.bias is not None,
                      varlen=pb.varlen, **_common(pb))


def combine_spec(pb: Problem) -> KernelSpec:
    return KernelSpec(kind="fwd_combine", block_m=1, block_n=1, num_warps=COMBINE_WARPS,
                      **_common(pb))


def all_decode_specs() -> list[KernelSpec]:
    """Every decode and combine specialization (for precompile)."""
    from .spec import DTYPES, HEAD_DIMS

    specs = []
    for dtype in DTYPES:
        for hd in HEAD_DIMS:
            for mask in (False, True):
                for bias in (False, True):
                    for varlen in (False, True):
                        specs.append(KernelSpec(kind="fwd_decode", dtype=dtype, head_dim=hd,
                                                block_m=BLOCK_M, block_n=BLOCK_N,
                                                num_warps=NUM_WARPS, has_mask=mask,
                                                has_bias=bias, varlen=varlen))
            specs.append(KernelSpec(kind="fwd_combine", dtype=dtype, head_dim=hd, block_m=1,
                                    block_n=1, num_warps=COMBINE_WARPS))
    return specs


def num_m_blocks(pb: Problem) -> int:
    """Packed-row slabs per (sequence, kv head): ceil(max queries * q_per_kv / 16)."""
    return max(1, math.ceil(pb.seqlen_q * (pb.heads // pb.kv_heads) / BLOCK_M))


def num_splits_heuristic(ctas: int, slots: int, n_tiles: int, max_splits: int = MAX_SPLITS) -> int:
    """FlashAttention-2's rule: no split when the CTAs fill 80% of the resident slots; else the
    fewest splits whose wave efficiency (CTAs / slots over its ceiling) is within 85% of the best,
    among split counts that actually shorten the per-split tile count."""
    if ctas >= 0.8 * slots or n_tiles <= 1:
        return 1
    max_splits = min(max_splits, n_tiles, max(1, slots))

    def eligible(s: int) -> bool:
        return s == 1 or math.ceil(n_tiles / s) != math.ceil(n_tiles / (s - 1))

    effs = {}
    for s in range(1, max_splits + 1):
        if eligible(s):
            waves = ctas * s / slots
            effs[s] = waves / math.ceil(waves)
    best = max(effs.values())
    return min(s for s, e in effs.items() if e >= 0.85 * best)


@cache
def _device_props(device: int) -> tuple[int, int]:
    """(SM count, shared memory bytes per SM) read off the device."""
    import cupy

    attrs = cupy.cuda.Device(device).attributes
    return int(attrs["MultiProcessorCount"]), int(attrs["MaxSharedMemoryPerMultiprocessor"])


def resident_ctas(spec: KernelSpec, registers: int, smem_per_sm: int) -> int:
    """CTAs of ``spec`` one SM holds: the least of the smem, register and thread limits."""
    by_smem = smem_per_sm // (spec.dynamic_smem + 1024)
    by_regs = 65536 // max(1, registers * spec.threads)
    by_threads = 2048 // spec.threads
    return max(1, min(by_smem, by_regs, by_threads, 32))


def choose_num_splits(pb: Problem, spec: KernelSpec, registers: int, sm_count: int,
                      smem_per_sm: int) -> int:
    n_tiles = math.ceil(pb.seqlen_k / spec.block_n)
    forced = forced_splits()
    if forced is not None:
        return max(1, min(forced, n_tiles, MAX_SPLITS))
    ctas = num_m_blocks(pb) * pb.kv_heads * pb.batch
    slots = sm_count * resident_ctas(spec, registers, smem_per_sm)
    return num_splits_heuristic(ctas, slots, n_tiles)


def _set_carveout(fn: Any) -> None:
    """Ask for the largest shared-memory carveout so several decode CTAs fit one SM."""
    from cupy_backends.cuda.api import driver

    driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)


_carveout_set: set[int] = set()


def run_decode(pb: Problem, query: Any, out: Any, lse: Any, cu_q: Any = None,
               cu_k: Any = None) -> None:
    """Launch the decode kernel (and the combine kernel when split) into ``out`` / ``lse``."""
    import cupy

    from .compile import compile_spec
    from .launch import _empty_like_query, current_stream, device_arch, get_function
    from .layout import build_fwd_params

    dev = pb.q.device
    spec = decode_spec(pb)
    fn = get_function(spec, dev)
    if fn.ptr not in _carveout_set:
        with cupy.cuda.Device(dev):
            _set_carveout(fn)
        _carveout_set.add(fn.ptr)
    sm_count, smem_per_sm = _device_props(dev)
    registers = compile_spec(spec, device_arch(dev)).registers
    ns = choose_num_splits(pb, spec, registers, sm_count, smem_per_sm)

    def ptr(a: Any) -> int:
        return describe(a).ptr if a is not None else 0

    rec = build_fwd_params(pb, describe(out), ptr(lse), ptr(cu_q), ptr(cu_k))
    total_rows = pb.total_q if pb.varlen else pb.batch * pb.seqlen_q
    r = rec[0]
    r["num_splits"] = ns
    r["total_rows"] = total_rows
    o_acc = lse_acc = None
    if ns > 1:
        o_acc = _empty_like_query(query, (total_rows * pb.heads * ns, spec.head_dim), "float32")
        lse_acc = _empty_like_query(query, (total_rows * pb.heads * ns,), "float32")
        r["o_accum"], r["lse_accum"] = ptr(o_acc), ptr(lse_acc)
    stream = current_stream(pb.kind, dev)
    grid = (num_m_blocks(pb) * ns, pb.kv_heads, pb.batch)
    with cupy.cuda.Device(dev):
        fn(grid, (spec.threads, 1, 1), (r,), shared_mem=spec.dynamic_smem, stream=stream)
        if ns > 1:
            cspec = combine_spec(pb)
            cfn = get_function(cspec, dev)
            n_pairs = total_rows * pb.heads
            cfn((math.ceil(n_pairs / COMBINE_WARPS), 1, 1), (cspec.threads, 1, 1), (r,),
                stream=stream)
    # The partials were allocated on this stream, so both CuPy's pool and torch's caching
    # allocator hand their memory out again only to work ordered after these kernels.
    del o_acc, lse_acc
