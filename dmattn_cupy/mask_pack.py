"""The mask packing kernels (cuda_src/mask_pack.cu): a GPU bool mask ``(B, H, Sq, Sk)`` at any
strides into per-block bit words and kept-element counts in one pass, and those counts into
block lists. Two users:

- ``MixedMask.from_dense_mask`` (``DMATTN_MASK_PACK``, registered in ``masks.DENSE_PACKERS``
  at import): the packing, launched on CuPy's current stream like the array operations it
  replaces;
- the forward's route for ``attn_mask`` (``DMATTN_MASK_ROUTE``, ``routes_mask`` and
  ``plan_lists``): both kernels in the call's plan, so the Hopper forward reads the mask as a
  MixedMask's lists (128-key tiles beside any bias, empty blocks never visited, no
  per-element work on full ones) at the cost of one read of the mask per call."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from . import arrays, env, forward_sm90, masks, runtime
from .arrays import ArrayInfo
from .device import DeviceProps
from .launch_plan import Alloc, Launch, Plan
from .params import MASK_LISTS_DTYPE, MASK_PACK_DTYPE
from .select import forward as select_forward
from .sparse_plan import MAX_SM90_PARTIAL_WORDS, SparseArrays
from .spec import KernelSpec
from .validate import Problem

PACK_WARPS = 8          # one CTA per block: 8 warps take its rows in turn
ROWS_WARPS = 32         # the overlapped packing: a thread per row and 16 keys of a 128-key block
MAX_ROWS_COL_BLOCKS = 8192  # its per-block counts in shared memory (4 bytes each)
MAX_GRID_YZ = 65535     # row blocks (y) and batch x heads (z) per launch
ROUTE_BLOCK = 128       # the attn_mask route's blocks: 128 x 128 (fwd_sm90's 128-key tile)
# auto routes a mask of its own per (batch, head) where its bytes would go to the portable
# family (beside a bias at d192/d256), and on HBM at least this fast (bytes/s) where its
# bytes would take a smaller key tile than the lists (64 keys beside a bias at d <= 128): its
# packing pass then costs less than the bytes cost the forward. A full random (2, 16, 4096,
# 4096) mask beside a full bias, routed against bytes: d256 on an H200 1.21 against 4.84 ms;
# d128 on an H200 (4.81 TB/s) 0.764 against 0.814 ms and on an H100 SXM (3.35 TB/s) 0.842
# against 0.820; d64 on an H200 0.662 against 0.709. The break-even: the lists' forward saves
# 0.18-0.19 ms at d128 on either card (0.642 against 0.820 ms on an H100, 0.618 against 0.814
# on an H200), in which the packing pass moves 604 MB at ~85% of peak when the peak is ~4 TB/s.
# A mask shared by several pairs is packed once for all, and routed on any Hopper card.
ROUTE_OWN_MASK_DRAM = 4.0e12


def pack_spec(arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="mask_pack", block_m=1, block_n=1, num_warps=PACK_WARPS, arch=arch)


def lists_spec(arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="mask_lists", block_m=1, block_n=1, num_warps=PACK_WARPS, arch=arch)


def rows_spec(arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="mask_rows", block_m=1, block_n=1, num_warps=ROWS_WARPS, arch=arch)


def all_mask_pack_specs(arch: str = "sm_80") -> list[KernelSpec]:
    return [pack_spec(arch), lists_spec(arch), rows_spec(arch)]


def fits_grid(shape: tuple[int, ...], bm: int, bn: int) -> bool:
    """Whether the kernel packs a (B, H, Sq, Sk) mask at block size (bm, bn): block_n a
    multiple of 32 and the grid within CUDA's y/z limits."""
    b, h, sq, _ = shape
    return bn % 32 == 0 and -(-sq // bm) <= MAX_GRID_YZ and b * h <= MAX_GRID_YZ


def takes(dense4: Any, bm: int, bn: int) -> bool:
    """``fits_grid`` of a 4-D CuPy bool array."""
    return fits_grid(tuple(dense4.shape), bm, bn)


def vectorized(ptr: int, strides: tuple[int, ...], bn: int) -> int:
    """The kernel's loads (MaskPackParams.vec): with a unit key stride and 128-key chunks, 2
    (16-byte loads) where every row start is 16-byte aligned, 1 (4-byte loads) where 4-byte
    aligned; else 0 (byte loads)."""
    if strides[3] != 1 or bn % 128:
        return 0
    for width, vec in ((16, 2), (4, 1)):
        if ptr % width == 0 and all(s % width == 0 for s in strides[:3]):
            return vec
    return 0


def record(ptr: int, shape: tuple[int, ...], strides: tuple[int, ...], words: int, kept: int,
           bm: int, bn: int) -> np.ndarray:
    """The kernels' MaskPackParams for the mask at ``ptr`` of ``shape`` (B, H, Sq, Sk) and byte
    ``strides`` (bool: one byte per element) packed into the device buffers at ``words`` and
    ``kept`` (one entry/row per block)."""
    b, h, sq, sk = shape
    rec = np.zeros(1, dtype=MASK_PACK_DTYPE)
    r = rec[0]
    r["mask"], r["words"], r["kept"] = ptr, words, kept
    r["batch_stride"], r["head_stride"], r["row_stride"], r["col_stride"] = strides
    r["seqlen_q"], r["seqlen_k"], r["block_m"], r["block_n"] = sq, sk, bm, bn
    r["row_blocks"], r["col_blocks"] = -(-sq // bm), -(-sk // bn)
    r["heads"] = h
    r["vec"] = vectorized(ptr, strides, bn)
    return rec


def lists_record(shape: tuple[int, ...], bm: int, bn: int) -> np.ndarray:
    """The lists kernel's MaskListsParams for a (B, H, Sq, Sk) mask packed at (bm, bn); its
    pointers are 0 (``plan_lists`` sets them)."""
    b, h, sq, sk = shape
    rec = np.zeros(1, dtype=MASK_LISTS_DTYPE)
    r = rec[0]
    r["seqlen_q"], r["seqlen_k"], r["block_m"], r["block_n"] = sq, sk, bm, bn
    r["row_blocks"], r["col_blocks"] = -(-sq // bm), -(-sk // bn)
    r["rows"] = b * h * -(-sq // bm)
    return rec


def pack_blocks(dense4: Any, bm: int, bn: int) -> tuple[Any, Any]:
    """(kept (B, H, nrb, ncb) int32, words (B*H*nrb*ncb, bm*bn/32) uint32) of a 4-D CuPy bool
    array, blocks in row-major (b, h, rb, cb) order; element (r, c) of a block is bit
    ``r*bn + c`` of its words (bit k % 32 of word k / 32), out-of-range elements 0 and not
    counted. Requires ``takes(dense4, bm, bn)``."""
    import cupy

    b, h, sq, sk = dense4.shape
    nrb, ncb = -(-sq // bm), -(-sk // bn)
    dev = int(dense4.device.id)
    with cupy.cuda.Device(dev):   # the outputs and the launch on the mask's device
        words = cupy.empty((b * h * nrb * ncb, bm * bn // 32), dtype=cupy.uint32)
        kept = cupy.empty((b, h, nrb, ncb), dtype=cupy.int32)
        rec = record(int(dense4.data.ptr), tuple(dense4.shape),
                     tuple(int(s) for s in dense4.strides), int(words.data.ptr),
                     int(kept.data.ptr), bm, bn)
        runtime.launch_record(dev, pack_spec(runtime.device_props(dev).arch), (ncb, nrb, b * h),
                              rec, cupy.cuda.get_current_stream().ptr)
    return kept, words


def pack_if_enabled(dense4: Any, bm: int, bn: int) -> tuple[Any, Any] | None:
    """``masks.DENSE_PACKERS`` entry: ``pack_blocks`` under ``DMATTN_MASK_PACK=1`` where the
    kernel takes the array, else None."""
    if not env.mask_pack_kernel() or not takes(dense4, bm, bn):
        return None
    return pack_blocks(dense4, bm, bn)


if pack_if_enabled not in masks.DENSE_PACKERS:
    masks.DENSE_PACKERS.append(pack_if_enabled)


# --- the forward's route for attn_mask --------------------------------------------------------


def _covers_every_pair(pb: Problem) -> bool:
    """A dense batch whose mask spans every (query, key) pair, its batch and head dims 1 or
    full: the layouts both in-call routes below take."""
    m = pb.mask
    if m is None or pb.varlen:
        return False
    mb, mh, sq, sk = m.shape
    return (sq, sk) == (pb.seqlen_q, pb.seqlen_k) and mb in (1, pb.batch) and mh in (1, pb.heads)


def routes_mask(pb: Problem, dev: DeviceProps) -> bool:
    """Whether the forward of ``pb`` (broadcasts collapsed: ``forward.collapsed_broadcasts``)
    reads its ``attn_mask`` as block lists packed per call: ``DMATTN_MASK_ROUTE`` (auto: a
    mask shared by several (batch, head) pairs, or one of its own per pair where the bytes
    would take the portable family or, on fast HBM, smaller key tiles
    (``ROUTE_OWN_MASK_DRAM``); 1: any), a dense batch, a mask over every
    (query, key) pair with batch/head dims 1 or full, the Hopper forward chosen for the
    problem with lists of 128 x 128 blocks (without a mask beside them, every head dim takes
    lists), their bits addressable, and the packing grid within limits."""
    m = pb.mask
    mode = env.mask_route()
    mode = {"warps": "auto", "overlap": "1"}.get(mode, mode)  # warps: where packs_in_forward
    if mode == "0" or not _covers_every_pair(pb):                # declined
        return False
    mb, mh, sq, sk = m.shape
    nblk = mb * mh * -(-sq // ROUTE_BLOCK) * -(-sk // ROUTE_BLOCK)
    if nblk * ROUTE_BLOCK * ROUTE_BLOCK // 32 > MAX_SM90_PARTIAL_WORDS \
            or not fits_grid(m.shape, ROUTE_BLOCK, ROUTE_BLOCK):
        return False
    spec = select_forward(dataclasses.replace(pb, mask=None), dev,
                          sparse=(ROUTE_BLOCK, ROUTE_BLOCK))
    if spec.family != "fwd_sm90" or ROUTE_BLOCK % spec.block_m or ROUTE_BLOCK % spec.block_n:
        return False
    if mode == "auto" and mb * mh == pb.batch * pb.heads:   # a mask of its own per pair
        by_bytes = select_forward(pb, dev)
        return by_bytes.family != "fwd_sm90" or (dev.dram_bytes_per_s >= ROUTE_OWN_MASK_DRAM
                                                 and by_bytes.block_n < spec.block_n)
    return True


def _route_strides(mask: ArrayInfo) -> tuple[int, ...]:
    """The mask's byte strides as the packing reads them: 0 for a dim of size 1 (whatever
    stride it has, it is never stepped)."""
    return tuple(0 if n == 1 else st for n, st in zip(mask.shape, mask.strides, strict=True))


def overlaps(pb: Problem, dev: DeviceProps) -> bool:
    """Whether the route's packing of ``pb``'s mask (``routes_mask`` holds) runs beside the
    forward (mask_pack.cu: mask_rows_kernel, a few CTAs; the forward launched behind it
    programmatically waits per work item): ``DMATTN_MASK_ROUTE=overlap``, compute capability
    9.0+, a mask of its own per (batch, head) (each block row's lists then serve one work item
    of the forward, which resets its ready word), 16-byte aligned rows at a unit key stride
    (``vectorized`` 2) and at most MAX_ROWS_COL_BLOCKS column blocks."""
    m = pb.mask
    if env.mask_route() != "overlap" or dev.cc < (9, 0) or m is None:
        return False
    mb, mh, _, sk = m.shape
    return (mb, mh) == (pb.batch, pb.heads) and -(-sk // ROUTE_BLOCK) <= MAX_ROWS_COL_BLOCKS \
        and vectorized(m.ptr, _route_strides(m), ROUTE_BLOCK) == 2


def overlap_ctas(dev: DeviceProps, rows: int) -> int:
    """The overlapped packing's grid: ``DMATTN_MASK_OVERLAP_CTAS`` or a sixth of the SMs, at
    most one CTA per block row."""
    return max(1, min(rows, env.mask_overlap_ctas() or dev.sm_count // 6))


def packs_in_forward(pb: Problem, dev: DeviceProps) -> bool:
    """Whether the Hopper forward of ``pb`` (broadcasts collapsed) reads its ``attn_mask`` by
    the pack warps of its bias spec (sm90/fwd.cu: pack_mask_warps; no packing launch, no
    lists: every tile is loaded, one whose mask bytes are all true does no per-element work):
    ``DMATTN_MASK_ROUTE=warps``, a dense batch, a mask over every (query, key) pair with
    batch/head dims 1 or full in a layout ``forward_sm90.packs_mask`` takes, and a bias whose
    spec without the mask is a Hopper one with pack warps (a tile bias)."""
    if pb.bias is None or env.mask_route() != "warps" or not _covers_every_pair(pb) \
            or not forward_sm90.packs_mask(pb.mask, pb.seqlen_k):
        return False
    spec = select_forward(dataclasses.replace(pb, mask=None), dev)
    return spec.family == "fwd_sm90" and forward_sm90.pack_warps(False, True, spec.bias_key_row)


def pack_scratch_words(ctas: int, stages: int, block_n: int) -> int:
    """uint32 words of the pack warps' scratch (``p.sp_partial_bits``): per CTA and K/V stage
    one tile of bits (forward_sm90.BLOCK_M rows of block_n / 32 words)."""
    return ctas * stages * forward_sm90.BLOCK_M * block_n // 32


# the route's buffers: (plan allocation name, MaskPackParams field, MaskListsParams field).
# The sp_ names are the forward record's fields (layout.SPARSE_INPUTS), so the forward slots
# them as it slots a block mask's lists.
_ROUTE_BUFFERS = (("sp_full_count", None, "full_count"), ("sp_full_idx", None, "full_idx"),
                  ("sp_partial_count", None, "partial_count"),
                  ("sp_partial_idx", None, "partial_idx"),
                  ("sp_partial_slot", None, "partial_slot"), ("sp_partial_bits", "words", None),
                  ("mask_kept", "kept", "kept"))


def plan_lists(plan: Plan, mask: ArrayInfo, query: Any, keep_alive: list[Any],
               overlap_stream: int | None = None) -> tuple[SparseArrays, Any]:
    """Adds the packing and the lists launches of ``mask`` (``routes_mask`` holds) to
    ``plan``, their buffers as allocations (first call: allocated here, kept in
    ``keep_alive``) and the mask as the plan's ``mask`` input; returns the lists, which the
    forward launch then reads like a MixedMask's (a partial block's bits at its own index),
    and None. ``overlap_stream`` (``overlaps`` holds; the call's raw stream): one overlapped
    packing launch (mask_rows_kernel, which writes no kept counts) replaces both, and the
    second result is the plan's ``mask_ready`` counter of one zero int32 word per block row
    (= the forward's work item), on which the forward must wait (Sm90FwdArgs::row_ready)."""
    bm = bn = ROUTE_BLOCK
    mb, mh, sq, sk = mask.shape
    nrb, ncb = -(-sq // bm), -(-sk // bn)
    nblk = mb * mh * nrb * ncb
    shapes = {"sp_full_count": (mb, mh, nrb), "sp_full_idx": (mb, mh, nrb, ncb),
              "sp_partial_count": (mb, mh, nrb), "sp_partial_idx": (mb, mh, nrb, ncb),
              "sp_partial_slot": (mb, mh, nrb, ncb), "sp_partial_bits": (nblk, bm * bn // 32),
              "mask_kept": (nblk,)}
    overlap = overlap_stream is not None
    buffers = _ROUTE_BUFFERS[:6] if overlap else _ROUTE_BUFFERS
    bufs = {}
    for name, _, _ in buffers:
        dtype = "uint32" if name == "sp_partial_bits" else "int32"
        bufs[name] = arrays.empty(query, shapes[name], dtype)
        keep_alive.append(bufs[name])
        plan.allocs.append(Alloc(name, shapes[name], dtype))
    pack = record(mask.ptr, mask.shape, _route_strides(mask), 0, 0, bm, bn)
    lists = lists_record(mask.shape, bm, bn)
    plan.slot("mask", pack, "mask")
    for name, pack_field, lists_field in buffers:
        ptr = arrays.describe(bufs[name]).ptr
        for rec, field in ((pack, pack_field), (lists, lists_field)):
            if field is not None:
                rec[0][field] = ptr
                plan.slot(name, rec, field)
    arrs = SparseArrays(*(bufs[n] for n, _, _ in _ROUTE_BUFFERS[:6]), block_m=bm, block_n=bn)
    dev = runtime.device_props(mask.device)
    rows = int(lists[0]["rows"])
    if overlap:
        ready = plan.add_counter("mask_ready", rows, mask.kind, overlap_stream, query)
        keep_alive.append(ready)
        lists[0]["ready"] = arrays.describe(ready).ptr
        plan.slot("mask_ready", lists, "ready")
        plan.launches.append(Launch(runtime.get_kernel(rows_spec(dev.arch), mask.device),
                                    (overlap_ctas(dev, rows), 1, 1), (pack, lists),
                                    shared_mem=4 * ncb))
        return arrs, ready
    plan.launches.append(Launch(runtime.get_kernel(pack_spec(dev.arch), mask.device),
                                (ncb, nrb, mb * mh), (pack,)))
    plan.launches.append(Launch(runtime.get_kernel(lists_spec(dev.arch), mask.device),
                                (-(-rows // PACK_WARPS), 1, 1), (lists,)))
    return arrs, None
