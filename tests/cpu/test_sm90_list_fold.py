"""DM_SM90_LIST_FOLD's arithmetic (cuda_src/sm90/fwd.cu: list_fold_warps, drop_listed_nan), on
the CPU before any GPU time:

- a NumPy model of the fold: the producer's warps 1-3 take a 128-row bias tile (64-key boxes,
  128B swizzle) in row groups, one bit word per lane, and rewrite each masked 16-bit value as
  -inf; every (row, 8-key chunk) is visited exactly once, each quarter warp's 16-byte accesses
  fall in 8 different bank groups, and pass k's chunks sit pass 0's plus k * rows * 128 bytes;
- the kernel's constexpr helpers equal that model (NVRTC static_asserts);
- the consumer's NaN path reads key 8j + 2t + e of its row where the block lists put it;
- forward_sm90 sends only block lists beside a bias tile to the ``_lfold`` specs, whose shared
  memory the host computes as the kernel's kAlloc.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import forward_sm90 as f90
from dmattn_cupy.arrays import ArrayInfo

FOLD_WARPS, ROWS = 3, 128
NEG_INF = {"bf16": 0xFF80, "fp16": 0xFC00}


def bias_address(r: int, c: int) -> int:
    """TMA's place of bias element (r, c) in a 128-row tile of 64-key boxes (128B swizzle)."""
    off = r * 128 + (c % 64) * 2
    return (c // 64) * ROWS * 128 + (off ^ (((off >> 7) & 7) << 4))


def group_rows(block_n: int) -> int:
    return 32 // (block_n // 32)


def passes(block_n: int) -> int:
    return -(-(ROWS // group_rows(block_n)) // FOLD_WARPS)


def lane_row(block_n: int, fw: int, k: int, lane: int) -> int:
    return (fw + FOLD_WARPS * k) * group_rows(block_n) + lane % group_rows(block_n)


def lane_key(block_n: int, lane: int) -> int:
    return 32 * (lane // group_rows(block_n))


def keep_mask(bits8: int, k: int) -> int:
    """0xffff in each 16-bit half of word k whose key (2k low, 2k + 1 high) is kept."""
    return (0xFFFF if bits8 >> (2 * k) & 1 else 0) | (0xFFFF0000 if bits8 >> (2 * k + 1) & 1 else 0)


@pytest.mark.parametrize("block_n", [64, 128])
def test_fold_visits_every_chunk_once_without_bank_conflicts(block_n):
    seen = np.zeros((ROWS, block_n // 8), dtype=int)
    for fw in range(FOLD_WARPS):
        for k in range(passes(block_n)):
            for i in range(4):
                slots = {}
                for lane in range(32):
                    row, key = lane_row(block_n, fw, k, lane), lane_key(block_n, lane)
                    if row >= ROWS:
                        continue
                    seen[row, (key + 8 * i) // 8] += 1
                    addr = bias_address(row, key + 8 * i)
                    assert addr % 16 == 0
                    slots.setdefault(lane // 8, []).append(addr // 16 % 8)
                for quarter in slots.values():  # 8 lanes of one 16-byte access: 8 bank groups
                    assert len(set(quarter)) == len(quarter)
    assert (seen == 1).all()
    step = FOLD_WARPS * group_rows(block_n)
    assert step % 8 == 0
    for lane in range(32):
        for fw in range(FOLD_WARPS):
            row0 = lane_row(block_n, fw, 0, lane)
            for k in range(passes(block_n)):
                row = lane_row(block_n, fw, k, lane)
                if row < ROWS:
                    for i in range(4):
                        col = lane_key(block_n, lane) + 8 * i
                        assert bias_address(row, col) == bias_address(row0, col) + k * step * 128


@pytest.mark.parametrize("dtype", sorted(NEG_INF))
def test_fold_model_masks_exactly_the_cleared_bits(dtype):
    rng = np.random.default_rng(11)
    block_n, neg = 128, NEG_INF[dtype]
    bias = rng.integers(0, 1 << 16, size=(ROWS, block_n), dtype=np.int64)
    bits = rng.random((ROWS, block_n)) < 0.9
    tile = np.zeros(ROWS * block_n, dtype=np.int64)  # 16-bit values by byte address / 2
    for r in range(ROWS):
        for c in range(block_n):
            tile[bias_address(r, c) // 2] = bias[r, c]
    words = np.zeros((ROWS, block_n // 32), dtype=np.int64)
    for q in range(block_n // 32):
        words[:, q] = (bits[:, 32 * q:32 * q + 32] * (1 << np.arange(32))).sum(axis=1)
    for fw in range(FOLD_WARPS):
        for k in range(passes(block_n)):
            for lane in range(32):
                row, key = lane_row(block_n, fw, k, lane), lane_key(block_n, lane)
                if row >= ROWS:
                    continue
                w = int(words[row, key // 32])
                for i in range(4):
                    b8 = w >> (8 * i) & 0xFF
                    base = bias_address(row, key + 8 * i) // 2
                    for p in range(4):  # word p: values base + 2p (low), + 2p + 1 (high)
                        m = keep_mask(b8, p)
                        for h in range(2):
                            kept = m >> (16 * h) & 0xFFFF
                            tile[base + 2 * p + h] = tile[base + 2 * p + h] if kept else neg
    for r in range(ROWS):
        for c in range(block_n):
            want = bias[r, c] if bits[r, c] else neg
            assert tile[bias_address(r, c) // 2] == want


def _static_asserts() -> str:
    lines = ['#include "sm90/fwd.cu"', "using namespace dm;"]
    for b8 in range(256):
        for k in range(4):
            lines.append(f"static_assert(list_fold_keep({b8}u, {k}) == {keep_mask(b8, k)}u);")
    for block_n in (64, 128):
        lines.append(f"static_assert(list_fold_group_rows<{block_n}>() == {group_rows(block_n)} "
                     f"&& list_fold_passes<{block_n}>() == {passes(block_n)});")
        for lane in range(32):
            lines.append(f"static_assert(list_fold_key<{block_n}>({lane}) == "
                         f"{lane_key(block_n, lane)});")
            for fw in range(FOLD_WARPS):
                for k in range(passes(block_n)):
                    lines.append(f"static_assert(list_fold_row<{block_n}>({fw}, {k}, {lane}) == "
                                 f"{lane_row(block_n, fw, k, lane)});")
        for r, c in ((0, 0), (5, 8), (77, 64), (127, 120)):
            if c < block_n:
                lines.append(f"static_assert(sm90::tile_offset<2, 64, 128>({r}, {c}) == "
                             f"{bias_address(r, c)}u);")
    rng = np.random.default_rng(5)
    for _ in range(32):
        w, b8 = int(rng.integers(0, 1 << 32)), int(rng.integers(0, 256))
        for neg in NEG_INF.values():
            for k in range(4):
                m = keep_mask(b8, k)
                want = (w & m) | (neg * 0x10001 & ~m & 0xFFFFFFFF)
                lines.append(f"static_assert(list_fold_word({w}u, list_fold_keep({b8}u, {k}), "
                             f"{neg * 0x10001}u) == {want}u);")
    return "\n".join(lines) + "\n"


def test_fold_helpers_equal_the_model():
    compile_static_asserts(_static_asserts(), "sm90_list_fold_check.cu")


def test_nan_path_reads_each_key_of_its_row():
    """drop_listed_nan: key 8j + 2t + e of the row is bit 8 (j % 4) + e of word j / 4 shifted
    right by 2t, i.e. bit (8j + 2t + e) % 32 of word (8j + 2t + e) / 32."""
    for j in range(16):
        for t in range(4):
            for e in range(2):
                key = 8 * j + 2 * t + e
                assert (j // 4, 2 * t + 8 * (j % 4) + e) == (key // 32, key % 32)


def _info(shape: tuple[int, ...], dtype: str = "bfloat16") -> ArrayInfo:
    strides, n = [], 1
    for d in reversed(shape):
        strides.insert(0, n)
        n *= d
    return ArrayInfo("cupy", dtype, shape, tuple(strides), 0, 0)


def test_only_block_lists_beside_a_bias_tile_take_the_fold_spec(monkeypatch):
    tile_bias, key_row = _info((2, 4, 256, 256)), _info((2, 4, 1, 256))
    mask = _info((2, 4, 256, 256), "bool")
    assert f90.list_fold_spec(None, tile_bias, True, 128)
    assert f90.list_fold_spec(None, tile_bias, (128, 128), 64)
    assert not f90.list_fold_spec(None, tile_bias, False, 128)      # no lists
    assert not f90.list_fold_spec(mask, tile_bias, True, 128)       # a mask spec
    assert not f90.list_fold_spec(None, key_row, True, 128)         # a key row
    assert not f90.list_fold_spec(None, None, True, 128)
    assert not f90.list_fold_spec(None, _info((2, 4, 256, 256), "float32"), True, 128)
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_LIST_FOLD=0")
    assert not f90.list_fold_spec(None, tile_bias, True, 128)


def test_fold_spec_shared_memory_equals_the_kernel():
    lines = ['#include "sm90/fwd.cu"']
    for hd in (64, 128, 256):
        bn, st = f90.tile(hd, False, True)
        smem = f90.smem_bytes(hd, bn, st, False, True, list_fold=True)
        assert smem == f90.smem_bytes(hd, bn, st, False, True) + 16 * st
        assert smem <= f90.SMEM_LIMIT
        lines.append(f"static_assert(dm::Sm90FwdSmem<{hd}, {bn}, {st}, false, true, false, "
                     f"true>::kAlloc == {smem} && dm::Sm90FwdSmem<{hd}, {bn}, {st}, false, "
                     f"true, false, true>::kListFold);")
    compile_static_asserts("\n".join(lines) + "\n", "sm90_list_fold_smem.cu")
