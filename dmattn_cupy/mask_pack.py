"""The mask packing kernel (cuda_src/mask_pack.cu): a GPU bool mask ``(B, H, Sq, Sk)`` at any
strides into per-block bit words and kept-element counts in one pass, the device half of
``MixedMask.from_dense_mask`` under ``DMATTN_MASK_PACK=1`` (registered in
``masks.DENSE_PACKERS`` at import). Launched on CuPy's current stream, as the array operations
it replaces."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import env, masks, runtime
from .params import MASK_PACK_DTYPE
from .spec import KernelSpec

PACK_WARPS = 8          # one CTA per block: 8 warps take its rows in turn
MAX_GRID_YZ = 65535     # row blocks (y) and batch x heads (z) per launch


def pack_spec(arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="mask_pack", block_m=1, block_n=1, num_warps=PACK_WARPS, arch=arch)


def all_mask_pack_specs(arch: str = "sm_80") -> list[KernelSpec]:
    return [pack_spec(arch)]


def takes(dense4: Any, bm: int, bn: int) -> bool:
    """Whether the kernel packs this 4-D CuPy bool array at block size (bm, bn): block_n a
    multiple of 32 and the grid within CUDA's y/z limits."""
    b, h, sq, _ = dense4.shape
    return bn % 32 == 0 and -(-sq // bm) <= MAX_GRID_YZ and b * h <= MAX_GRID_YZ


def vectorized(ptr: int, strides: tuple[int, ...], bn: int) -> bool:
    """4-byte loads: unit key stride, every row start 4-byte aligned, 128-key chunks."""
    return strides[3] == 1 and bn % 128 == 0 and ptr % 4 == 0 and all(
        s % 4 == 0 for s in strides[:3])


def record(dense4: Any, words: Any, kept: Any, bm: int, bn: int) -> np.ndarray:
    """The kernel's MaskPackParams for ``dense4`` (B, H, Sq, Sk) packed into ``words`` and
    ``kept`` (device arrays, one entry/row per block)."""
    b, h, sq, sk = dense4.shape
    ptr = int(dense4.data.ptr)
    strides = tuple(int(s) for s in dense4.strides)   # bytes: bool elements are one byte
    rec = np.zeros(1, dtype=MASK_PACK_DTYPE)
    r = rec[0]
    r["mask"], r["words"], r["kept"] = ptr, int(words.data.ptr), int(kept.data.ptr)
    r["batch_stride"], r["head_stride"], r["row_stride"], r["col_stride"] = strides
    r["seqlen_q"], r["seqlen_k"], r["block_m"], r["block_n"] = sq, sk, bm, bn
    r["row_blocks"], r["col_blocks"] = -(-sq // bm), -(-sk // bn)
    r["heads"] = h
    r["vec"] = int(vectorized(ptr, strides, bn))
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
        runtime.launch_record(dev, pack_spec(runtime.device_props(dev).arch), (ncb, nrb, b * h),
                              record(dense4, words, kept, bm, bn),
                              cupy.cuda.get_current_stream().ptr)
    return kept, words


def pack_if_enabled(dense4: Any, bm: int, bn: int) -> tuple[Any, Any] | None:
    """``masks.DENSE_PACKERS`` entry: ``pack_blocks`` under ``DMATTN_MASK_PACK=1`` where the
    kernel takes the array, else None."""
    if not env.mask_pack_kernel() or not takes(dense4, bm, bn):
        return None
    return pack_blocks(dense4, bm, bn)


if pack_if_enabled not in masks.DENSE_PACKERS:
    masks.DENSE_PACKERS.append(pack_if_enabled)
