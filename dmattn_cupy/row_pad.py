"""The row padding copy (cuda_src/row_pad.cu): rows of a mask/bias whose layout alone keeps it
from a tensor map (forward.operands_to_pad) copied into rows that start 16 bytes apart, the
bytes past each row's width zeroed. One thread per 16-byte destination chunk; it reads the
source by aligned 4-byte words, so any source alignment runs at memory speed (a pitched
``cudaMemcpy2DAsync`` of 2-byte aligned rows ran at ~1 TB/s on the H200)."""

from __future__ import annotations

import numpy as np

from . import runtime
from .params import ROW_PAD_DTYPE
from .spec import KernelSpec

PAD_WARPS = 4       # 128 chunks (2 KB of a destination row) per CTA
MAX_GRID_Y = 65535  # rows beyond it are walked by a stride loop


def pad_spec(arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="row_pad", block_m=1, block_n=1, num_warps=PAD_WARPS, arch=arch)


def all_row_pad_specs(arch: str = "sm_80") -> list[KernelSpec]:
    return [pad_spec(arch)]


def grid(dst_pitch: int, rows: int) -> tuple[int, int, int]:
    """CTAs: the 16-byte chunks of one destination row in x, rows in y (at most 65535)."""
    return -(-dst_pitch // (16 * 32 * PAD_WARPS)), min(rows, MAX_GRID_Y), 1


def copy_rows(device: int, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int,
              rows: int, stream: int) -> None:
    """``rows`` rows of ``width`` bytes from ``src`` (rows ``src_pitch`` bytes apart, any
    alignment) into ``dst`` (16-byte aligned, rows ``dst_pitch`` apart, a multiple of 16 not
    below ``width``), zero to each row's pitch, on the raw ``stream`` handle: one launch."""
    if dst % 16 or dst_pitch % 16 or dst_pitch < width:
        raise ValueError(f"row padding needs a 16-byte aligned destination and pitch >= width, "
                         f"got dst % 16 = {dst % 16}, dst_pitch={dst_pitch}, width={width}")
    if rows <= 0 or width <= 0:
        return
    rec = np.zeros(1, dtype=ROW_PAD_DTYPE)
    rec["src"], rec["dst"] = src, dst
    rec["src_pitch"], rec["dst_pitch"], rec["rows"], rec["width"] = (src_pitch, dst_pitch, rows,
                                                                     width)
    runtime.launch_record(device, pad_spec(runtime.device_props(device).arch),
                          grid(dst_pitch, rows), rec, stream)
