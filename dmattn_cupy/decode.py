"""Fast decoding: GQA-packed forward kernel with split-KV and an lse-based combine.

When queries are short (``seqlen_q`` / ``max_seqlen_q`` <= ``DECODE_MAX_Q``) the general
forward kernels would spend a 64-row query tile on a handful of rows. ``fwd_decode.cu`` packs
the query heads that share a kv head into one m16 slab (rows = (query, head-in-group) pairs),
and when (sequences x kv heads x slabs) CTAs are too few to fill the GPU it splits each key
range over ``num_splits`` CTAs whose fp32 partials are merged by their lse: by the decode grid
itself (the last CTA of each group, ``split_combine.cuh``) where a group's partials are few
(``fused_combine``), else by ``fwd_combine.cu``'s launch.

Environment (developers and tests; read by ``env``):
- ``DMATTN_DECODE``: ``auto`` (default: short queries take this path), ``0`` (never), ``1``
  (every supported problem, whatever its query length).
- ``DMATTN_NUM_SPLITS``: unset/``auto`` = the heuristic below; an integer >= 1 forces it
  (capped at the number of key tiles and ``MAX_SPLITS``).
- ``DMATTN_DECODE_STAGES``: unset/``auto`` = ``choose_stages``; ``2`` or ``3`` forces the
  cp.async kernel's depth where a spec of that depth exists (``DEEP_HEAD_DIMS``).
- ``DMATTN_SPLIT_COMBINE``: ``auto`` = ``fused_combine``; ``grid`` / ``kernel`` force who merges.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from . import arrays, env, runtime
from .arrays import ArrayInfo, describe
from .device import DeviceProps
from .families import DECODE_MAX_SLOTS, decode_smem
from .launch_plan import Alloc, Launch, Plan
from .layout import build_fwd_params, fwd_pointer_fields
from .spec import DTYPES, HEAD_DIMS, KernelSpec, padded_head_dim
from .validate import Problem

DECODE_MAX_Q = 8        # queries per sequence up to which the decode kernel is used
BLOCK_M = 16            # packed (query, head) rows per CTA
NUM_WARPS = 4
BLOCK_N = 16 * NUM_WARPS  # keys per tile: 16 per warp
MAX_SPLITS = 128
COMBINE_WARPS = 8       # warps per combine CTA (each pair merged by combine_warps_per_pair)
COMBINE_BATCH = 4       # fwd_combine.cu's kCombineBatch: splits one warp loads at once
# The most bytes of partials (a group's packed rows x splits x head dim, fp32) the decode grid
# merges itself, in the last CTA of the group (one CTA reading them all from L2). At this size
# (B1 H32/Hk8 d128, 32 splits: 4 x 32 x 128 x 4) the merge costs the GPU what the combine
# launch does (H100: 17.0 against 16.8-16.9 us at 4096 keys, 22.5 against 22.1-22.4 at 8192)
# and saves its launch on the host (16.3-16.9 against 19.6-22.4 us per call; BENCHMARKS.md,
# fifty-first session).
FUSED_COMBINE_MAX_BYTES = 64 << 10
RESERVED_SMEM_PER_CTA = 1024  # shared memory the driver reserves per resident CTA
DEEP_STAGES = 3         # fwd_decode.cu's deeper pipeline, specialized at DEEP_HEAD_DIMS only
DEEP_HEAD_DIMS = (128,)
DEEP_MIN_TILES = 32     # key tiles per CTA from which the deeper pipeline pays (see choose_stages)
# The DRAM bandwidth one unsplit d128 decode CTA per SM draws (H100: 96 CTAs 2570 GB/s, 26.8 GB/s
# each; 128 CTAs 3042 GB/s, the copy rate): num_splits_heuristic's unsplit clause, used where
# it was measured (compute capability 9.0, d128), takes grids whose CTAs draw at least
# UNSPLIT_DRAM_SHARE of the peak (H100: unsplit faster at 104, 120 and 128 CTAs, slower at 96).
UNSPLIT_CTA_BYTES_PER_S = 26.8e9
UNSPLIT_DRAM_SHARE = 0.8
UNSPLIT_RATE_WHERE = ((9, 0), 128)   # (compute capability, head dim)


def use_decode(pb: Problem) -> bool:
    """The decode path takes short-query problems (q/k/v rows are 16-byte aligned by then)."""
    mode = env.decode_mode()
    if mode == "0":
        return False
    return mode == "1" or pb.seqlen_q <= DECODE_MAX_Q


def _common(pb: Problem, arch: str) -> dict[str, Any]:
    return dict(dtype="fp16" if pb.dtype == "float16" else "bf16",
                head_dim=padded_head_dim(pb.head_dim), arch=arch)


def decode_spec(pb: Problem, arch: str = "sm_80", stages: int = 1) -> KernelSpec:
    """The cp.async decode specialization of ``pb``; ``stages`` 1: the default depth (2)."""
    return KernelSpec(family="fwd_decode", block_m=BLOCK_M, block_n=BLOCK_N,
                      num_warps=NUM_WARPS, has_mask=pb.mask is not None,
                      has_bias=pb.bias is not None, varlen=pb.varlen, stages=stages,
                      **_common(pb, arch))


def combine_warps_per_pair(num_splits: int, num_warps: int = COMBINE_WARPS) -> int:
    """fwd_combine.cu's warps per (row, head) pair: the fewest (a power of two up to the
    CTA's) whose splits fit one load batch each."""
    w = 1
    while w < num_warps and w * COMBINE_BATCH < num_splits:
        w *= 2
    return w


def combine_grid(n_pairs: int, num_splits: int) -> tuple[int, int, int]:
    return math.ceil(n_pairs * combine_warps_per_pair(num_splits) / COMBINE_WARPS), 1, 1


def combine_spec(pb: Problem, arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="fwd_combine", block_m=1, block_n=1, num_warps=COMBINE_WARPS,
                      **_common(pb, arch))


def all_decode_specs(arch: str = "sm_80") -> list[KernelSpec]:
    """Every decode and combine specialization for a portable target ``arch``."""
    specs = []
    for dtype in DTYPES:
        for hd in HEAD_DIMS:
            for mask in (False, True):
                for bias in (False, True):
                    for varlen in (False, True):
                        for st in (1, DEEP_STAGES) if hd in DEEP_HEAD_DIMS else (1,):
                            specs.append(KernelSpec(family="fwd_decode", dtype=dtype,
                                                    head_dim=hd, block_m=BLOCK_M,
                                                    block_n=BLOCK_N, num_warps=NUM_WARPS,
                                                    has_mask=mask, has_bias=bias,
                                                    varlen=varlen, stages=st, arch=arch))
            specs.append(KernelSpec(family="fwd_combine", dtype=dtype, head_dim=hd, block_m=1,
                                    block_n=1, num_warps=COMBINE_WARPS, arch=arch))
    return specs


def num_m_blocks(pb: Problem) -> int:
    """Packed-row slabs per (sequence, kv head): ceil(max queries * q_per_kv / 16)."""
    return max(1, math.ceil(pb.seqlen_q * (pb.heads // pb.kv_heads) / BLOCK_M))


def num_splits_heuristic(ctas: int, slots: int, n_tiles: int, max_splits: int = MAX_SPLITS,
                         sms: int | None = None, dram_bytes_per_s: float = 0.0) -> int:
    """The split count of a grid of ``ctas`` CTAs of ``n_tiles`` key tiles each, ``slots`` of
    them resident at once on ``sms`` SMs (None: not known); ``dram_bytes_per_s``: the device's
    peak DRAM bandwidth where UNSPLIT_CTA_BYTES_PER_S holds for the kernel (0: not used).

    At most one CTA per SM and enough of them to draw most of the DRAM bandwidth unsplit
    (``ctas * UNSPLIT_CTA_BYTES_PER_S >= UNSPLIT_DRAM_SHARE * dram_bytes_per_s``: 100-132 CTAs
    on an H100 SXM, none on an H200): no split, as a split only adds the combine and the fp32
    partials. H100, d128, 8 KV heads, forced counts: 16 x 2048 keys (128 CTAs) unsplit 51.8 us
    against 55.4 at the rule's 2 splits, 16 x 8192 177.5 against 184.1; 15 and 13 x 2048 (120,
    104 CTAs) unsplit 2614 / 2372 GB/s against 2379 / 2227 split; at 96 CTAs (12 sequences)
    splitting stays faster, 46.1 / 157.6 unsplit against 44.6 / 142.3 (BENCHMARKS.md,
    forty-second and forty-third sessions).

    At most one CTA per SM (``ctas <= sms``, given): one wave, the split count with the fewest
    key tiles on the busiest SM (CTAs round-robin over the SMs: ceil(ctas * s / sms) *
    ceil(n_tiles / s)) among counts that shorten the per-split tile count and fit the slots,
    counting only counts that put a second CTA on some SM where one exists, ties to more
    splits (more CTAs per SM hide more latency). At d128 that is ~2 CTAs per SM where the 95%
    rule below took ~3 (8 KV heads, 1 sequence x 8192 keys: 32 splits of 4 tiles, 8 tiles on
    the busiest SM, against 43 of 3, 9 tiles): H200 graph-replayed, 1.5-5% faster at 1 x 8192
    up to 16 x 2048 keys, even at 4 x 2048 (BENCHMARKS.md, twenty-fifth session).

    Else no split when the CTAs fill 80% of the slots, unless the last wave is under 80% full
    (512 CTAs on 396 slots, 1.29 waves); otherwise FlashAttention-2's rule, the fewest splits
    whose wave efficiency (CTAs / slots over its ceiling) is within 95% of the best
    (FlashAttention-2: 85%; H200 decode case at 2 stages: 3 splits, 3.88 waves, 3771 GB/s
    against 2887 unsplit, 2 splits 3528, 4 splits 3744; at d64 with 4 CTAs per SM, B8 Sk32768
    took 7 splits, 0.85 waves, under 85% and lost 5.6% to 3 CTAs per SM)."""
    if n_tiles <= 1:
        return 1
    max_splits = min(max_splits, n_tiles, max(1, slots))

    def eligible(s: int) -> bool:
        return s == 1 or math.ceil(n_tiles / s) != math.ceil(n_tiles / (s - 1))

    if sms is not None and ctas <= sms and ctas < 0.8 * slots:
        if (dram_bytes_per_s
                and ctas * UNSPLIT_CTA_BYTES_PER_S >= UNSPLIT_DRAM_SHARE * dram_bytes_per_s):
            return 1
        one_wave = [s for s in range(1, max_splits + 1) if eligible(s) and ctas * s <= slots]
        doubled = [s for s in one_wave if ctas * s > sms] or one_wave
        return min(doubled, key=lambda s: (math.ceil(ctas * s / sms) * math.ceil(n_tiles / s),
                                           -s))
    if ctas >= 0.8 * slots and ctas / slots / math.ceil(ctas / slots) >= 0.8:
        return 1
    effs = {}
    for s in range(1, max_splits + 1):
        if eligible(s):
            waves = ctas * s / slots
            effs[s] = waves / math.ceil(waves)
    best = max(effs.values())
    return min(s for s, e in effs.items() if e >= 0.95 * best)


def choose_stages(pb: Problem, spec: KernelSpec, registers: int, dev: DeviceProps,
                  deep_smem: int, splits_given: bool = False) -> int:
    """The depth of the cp.async decode kernel for ``pb`` (``spec``: its default-depth spec,
    ``registers`` that kernel's; ``deep_smem``: the launch's shared memory at DEEP_STAGES):
    DEEP_STAGES where its grid, at the residency that depth leaves (2 CTAs per SM at d128
    against 3), runs unsplit with at least DEEP_MIN_TILES key tiles per CTA, else 1 (the
    default 2). H200, d128, 64 x 4096 keys: 3 stages unsplit 3967-4053 GB/s against 3771-3871
    at 2 stages with the best split count; 256 x 1024 keys (16 tiles, unsplit either way) 3754
    against 3981; split problems even (BENCHMARKS.md, twenty-third session).
    ``DMATTN_DECODE_STAGES`` forces 2 or 3 where that depth is specialized; a split count
    given by the caller or ``DMATTN_NUM_SPLITS`` keeps the default depth otherwise."""
    forced = env.decode_stages()
    if spec.head_dim not in DEEP_HEAD_DIMS:
        return 1
    if forced is not None:
        return DEEP_STAGES if forced == DEEP_STAGES else 1
    n_tiles = math.ceil(pb.seqlen_k / spec.block_n)
    if splits_given or env.forced_splits() is not None or n_tiles < DEEP_MIN_TILES:
        return 1
    ctas = num_m_blocks(pb) * pb.kv_heads * pb.batch
    slots = dev.sm_count * resident_ctas(spec, registers, dev, deep_smem)
    # Only a grid that fills the deeper depth's slots: an under-filled one that cannot split
    # into one wave at 2 CTAs per SM (132-211 CTAs at d128) splits at 2 stages instead.
    return DEEP_STAGES if ctas >= 0.8 * slots and num_splits_heuristic(
        ctas, slots, n_tiles, sms=dev.sm_count) == 1 else 1


def slot_mode(row_stride: int, qseq_stride: int, head_ratio: int, q_per_kv: int) -> int:
    """How fwd_decode.cu stages a mask/bias (FwdParams.mask_slot_mode / bias_slot_mode): 0 = one
    row serves the CTA's 16 packed rows (key-based: stride 0 over queries, and one mask head per
    kv head), 1 = one row per query head of the kv group (key-based, per-head, q_per_kv <= 16),
    2 = one row per packed row (query-based, or q_per_kv > 16)."""
    if row_stride != 0 or qseq_stride != 0:
        return 2
    if head_ratio % q_per_kv == 0:
        return 0
    return 1 if head_ratio == 1 and q_per_kv <= DECODE_MAX_SLOTS else 2


def staged_rows(mode: int, q_per_kv: int) -> int:
    """Rows a CTA stages per tile for a slot mode (fwd_decode.cu decode_slots)."""
    return 1 if mode == 0 else q_per_kv if mode == 1 else DECODE_MAX_SLOTS


def set_slot_modes(rec: Any) -> tuple[int, int]:
    """Set a filled record's mask/bias slot modes from its strides; returns the staged rows
    of each (whether or not the tensor is present)."""
    qpk = int(rec["q_per_kv"])
    rows = []
    for name in ("mask", "bias"):
        mode = slot_mode(int(rec[f"{name}_row_stride"]), int(rec[f"{name}_qseq_stride"]),
                         int(rec[f"{name}_head_ratio"]), qpk)
        rec[f"{name}_slot_mode"] = mode
        rows.append(staged_rows(mode, qpk))
    return rows[0], rows[1]


def launch_smem(spec: KernelSpec, rec: Any) -> int:
    """The dynamic shared memory of a decode launch whose record ``rec`` is filled (its slot
    modes are set here from its mask/bias strides)."""
    return decode_smem(spec, *set_slot_modes(rec))


def resident_ctas(spec: KernelSpec, registers: int, dev: DeviceProps,
                  smem: int | None = None) -> int:
    """CTAs of ``spec`` one SM of ``dev`` holds: the least of its shared-memory, register,
    thread and CTA limits (register allocation granularity ignored); ``smem``: the launch's
    dynamic shared memory (default: the spec's most)."""
    smem = spec.dynamic_smem if smem is None else smem
    by_smem = dev.smem_per_sm // (smem + RESERVED_SMEM_PER_CTA)
    by_regs = dev.regs_per_sm // max(1, registers * spec.threads)
    by_threads = dev.threads_per_sm // spec.threads
    return max(1, min(by_smem, by_regs, by_threads, dev.ctas_per_sm))


def choose_num_splits(pb: Problem, spec: KernelSpec, registers: int, dev: DeviceProps,
                      smem: int | None = None) -> int:
    n_tiles = math.ceil(pb.seqlen_k / spec.block_n)
    forced = env.forced_splits()
    if forced is not None:
        return max(1, min(forced, n_tiles, MAX_SPLITS))
    ctas = num_m_blocks(pb) * pb.kv_heads * pb.batch
    slots = dev.sm_count * resident_ctas(spec, registers, dev, smem)
    dram = dev.dram_bytes_per_s if (dev.cc, spec.head_dim) == UNSPLIT_RATE_WHERE else 0.0
    return num_splits_heuristic(ctas, slots, n_tiles, sms=dev.sm_count, dram_bytes_per_s=dram)


def fused_combine(pb: Problem, num_splits: int, head_dim: int) -> bool:
    """Whether the decode grid merges its own ``num_splits`` partials (its last CTA per group:
    no combine launch, no PDL overlap needed): where a group's partials take at most
    FUSED_COMBINE_MAX_BYTES (``head_dim``: the spec's), or as ``DMATTN_SPLIT_COMBINE`` says."""
    mode = env.split_combine()
    if num_splits <= 1 or mode == "kernel":
        return False
    rows = min(BLOCK_M, pb.seqlen_q * (pb.heads // pb.kv_heads))
    return mode == "grid" or rows * num_splits * head_dim * 4 <= FUSED_COMBINE_MAX_BYTES


_carveout_set: set[tuple[KernelSpec, int]] = set()


def plan_decode(pb: Problem, plan: Plan, query: Any, out: ArrayInfo, lse_ptr: int,
                cu_q_ptr: int, cu_k_ptr: int, stream: Any, fields: dict[str, int] | None = None,
                num_splits: int = 0) -> list[Any]:
    """Add the decode launches (and the combine's when split and not fused) to ``plan``, with
    the split-KV partials (and the fused merge's counters) as allocations of the plan; returns
    those buffers (alive until launched). ``stream``: the call's (the counters are kept per
    stream). ``fields``: FwdParams fields set after the problem's (the KV-cache API's lengths
    and block table; one that names a source of ``plan``, cache_seqlens or block_table, is
    also a pointer slot); ``num_splits`` > 0 forces the split count (capped like
    DMATTN_NUM_SPLITS)."""
    dev = pb.q.device
    props = runtime.device_props(dev)
    rec = build_fwd_params(pb, out, lse_ptr, cu_q_ptr, cu_k_ptr)
    sources = plan.sources
    for name, value in (fields or {}).items():
        rec[0][name] = value
        if name in sources:   # a pointer field the plan's caller supplies (KV_INPUTS)
            plan.slot(name, rec, name)
    spec = decode_spec(pb, props.arch)
    kernel = runtime.get_kernel(spec, dev)
    if spec.head_dim in DEEP_HEAD_DIMS:
        deep = dataclasses.replace(spec, stages=DEEP_STAGES)
        if choose_stages(pb, spec, kernel.registers, props, launch_smem(deep, rec[0]),
                         num_splits > 0) == DEEP_STAGES:
            spec = deep
            kernel = runtime.get_kernel(spec, dev)
    if (spec, dev) not in _carveout_set:  # several decode CTAs per SM
        runtime.prefer_shared_memory(kernel)
        _carveout_set.add((spec, dev))
    n_tiles = math.ceil(pb.seqlen_k / spec.block_n)
    smem = launch_smem(spec, rec[0])
    if num_splits > 0:
        ns = max(1, min(num_splits, n_tiles, MAX_SPLITS))
    else:
        ns = choose_num_splits(pb, spec, kernel.registers, props, smem)
    grid = (num_m_blocks(pb) * ns, pb.kv_heads, pb.batch)
    total_rows = pb.total_q if pb.varlen else pb.batch * pb.seqlen_q
    r = rec[0]
    r["num_splits"] = ns
    r["total_rows"] = total_rows
    keep: list[Any] = []
    for name, field in fwd_pointer_fields(pb, tuple(a.name for a in plan.allocs)):
        plan.slot(name, rec, field)
    if ns > 1:  # one float32 workspace: the partial outputs, then their lse
        rows = total_rows * pb.heads * ns
        lse_at = rows * spec.head_dim * 4   # a multiple of 128 bytes (head_dim % 32 == 0)
        plan.allocs.append(Alloc("o_acc", (rows * (spec.head_dim + 1),), "float32",
                                 scratch=True))   # written by the decode, read by the combine
        keep = [arrays.empty(query, plan.allocs[-1].shape, "float32")]
        base = describe(keep[0]).ptr
        r["o_accum"], r["lse_accum"] = base, base + lse_at
        plan.slot("o_acc", rec, "o_accum")
        plan.slot("o_acc", rec, "lse_accum", add=lse_at)
    fused = fused_combine(pb, ns, spec.head_dim)
    if fused:  # one zero int32 per group, counted up by its splits and wound back by the last
        groups = grid[0] // ns * grid[1] * grid[2]
        keep.append(plan.add_counter("split_counters", groups, pb.kind, stream.ptr, query))
        r["split_counters"] = describe(keep[-1]).ptr
        plan.slot("split_counters", rec, "split_counters")
    # Never a programmatic launch itself: launched during the KV-cache append, its CTAs were
    # placed around the append's and the split grid ran unbalanced (+5-14% at 8 x 4096 and
    # 8 x 8192 keys, H200, BENCHMARKS.md).
    plan.launches.append(Launch(kernel, grid, (rec,), shared_mem=smem))
    if ns > 1 and not fused:
        combine = runtime.get_kernel(combine_spec(pb, props.arch), dev)
        n_pairs = total_rows * pb.heads
        plan.launches.append(Launch(combine, combine_grid(n_pairs, ns), (rec,),
                                    programmatic=props.cc[0] >= 9
                                    and env.programmatic_launches()))
    return keep
