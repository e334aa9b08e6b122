"""The decode kernel's K/V stage layout (cuda_src/sm80/fwd_decode.cu, ``DecodeKV``) against a
model: rows of whole 8-chunk groups are swizzled (chunk c of row r at c ^ (r & 7)), others padded
by 16 bytes. The model's properties: a bijection per row, a warp's copy of 128 global bytes in
one 128-byte line of shared memory (swizzled), ldmatrix's 8 row addresses in 8 distinct 16-byte
bank groups (both); the kernel's constexpr helpers and the host's shared-memory formula equal
it, with and without the ``DM_DECODE_SWIZZLE=0`` define."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import families

HEAD_DIMS = (32, 64, 96, 128, 192, 256)
BLOCK_M, BLOCK_N = 16, 64


def swizzled(head_dim: int, define: int = 1) -> bool:
    return define != 0 and head_dim % 64 == 0


def stride(head_dim: int, define: int = 1) -> int:
    return head_dim if swizzled(head_dim, define) else head_dim + 8


def at(head_dim: int, r: int, col: int, define: int = 1) -> int:
    """Element offset of (row r, column col) of a K/V tile; col a multiple of 8."""
    s = stride(head_dim, define)
    return r * s + (col ^ ((r & 7) << 3) if swizzled(head_dim, define) else col)


def tile_base_bytes(head_dim: int, stage: int, define: int = 1) -> int:
    """Byte offset of K stage ``stage`` (the Q slab comes first)."""
    return (BLOCK_M * (head_dim + 8) + stage * BLOCK_N * stride(head_dim, define)) * 2


@pytest.mark.parametrize("define", [1, 0])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_model_rows_are_bijections_and_ldmatrix_is_conflict_free(head_dim: int,
                                                                 define: int) -> None:
    chunks = head_dim // 8
    for r in range(BLOCK_N):
        cols = sorted(at(head_dim, r, 8 * c, define) - r * stride(head_dim, define)
                      for c in range(chunks))
        assert cols == [8 * c for c in range(chunks)], (r, cols)
    for r0 in range(0, BLOCK_N, 8):     # one 8 x 8 matrix of an ldmatrix: 8 rows, one chunk
        for c in range(chunks):
            groups = {(at(head_dim, r, 8 * c, define) * 2 // 16) % 8 for r in range(r0, r0 + 8)}
            assert len(groups) == 8, (r0, c, groups)


@pytest.mark.parametrize("head_dim", [d for d in HEAD_DIMS if d % 64 == 0])
def test_model_copies_of_128_bytes_fill_one_line(head_dim: int) -> None:
    """8 lanes copy chunks 8g..8g+7 of a row (128 contiguous global bytes): swizzled, they land
    in one 128-byte line of shared memory; padded, most rows straddle two (what the swizzle is
    for: ncu counted 1.5x the ideal L2 sectors per copy with the padded rows)."""
    for stage in range(3):
        base = tile_base_bytes(head_dim, stage)
        assert base % 128 == 0
        for r in range(BLOCK_N):
            for g in range(head_dim // 64):
                lines = {(base + 2 * at(head_dim, r, 8 * c)) // 128
                         for c in range(8 * g, 8 * g + 8)}
                assert len(lines) == 1, (stage, r, g)
    padded = {(tile_base_bytes(head_dim, 0, 0) + 2 * at(head_dim, 1, 8 * c, 0)) // 128
              for c in range(8)}
    assert len(padded) == 2


@pytest.mark.parametrize("defines, define", [((), 1), (("DM_DECODE_SWIZZLE=0",), 0)],
                         ids=["default", "padded"])
def test_kernel_layout_and_host_smem_equal_the_model(monkeypatch, defines, define) -> None:
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", " ".join(defines))
    lines = ['#include "sm80/fwd_decode.cu"']
    for hd in HEAD_DIMS:
        assert families.decode_kv_stride(hd) == stride(hd, define)
        lines.append(f"static_assert(dm::DecodeKV<{hd}>::kStride == {stride(hd, define)});")
        for r in range(16):
            for c in range(hd // 8):
                lines.append(f"static_assert(dm::DecodeKV<{hd}>::at({r}, {8 * c}) == "
                             f"{at(hd, r, 8 * c, define)});")
        for stages in (2, 3):
            spec = SimpleNamespace(head_dim=hd, block_m=BLOCK_M, block_n=BLOCK_N, num_warps=4,
                                   stages=stages, has_mask=True, has_bias=True,
                                   bias_key_row=False)
            smem = families.decode_smem(spec, 0, 0)
            assert smem == tile_base_bytes(hd, 2 * stages, define) + 8 * 16 + 256
            lines.append(f"static_assert(dm::DecodeKV<{hd}>::smem_base({BLOCK_M}, {BLOCK_N}, "
                         f"{stages}) == {smem});")
    compile_static_asserts("\n".join(lines) + "\n", "decode_layout_check.cu", defines)
