"""DM_SM90_MB_FOLD's layout arithmetic (cuda_src/sm90/fwd.cu: fold_warps; primitives.cuh), on
the CPU before any GPU time:

- a NumPy model of the fold: the producer's warps 1-3 read a consumer warp's 16 rows of the
  TMA bias tile (128B swizzle) and of the mask tile (64B swizzle), replace masked values by
  -inf and write the words back in fragment order inside the same 2 KB; the consumers' 16-byte
  reads then give every lane its fragments' (folded) values;
- the kernel's constexpr helpers equal that model (NVRTC static_asserts): the row/chunk split
  of the swizzled offsets, frag_order_offset, fold_word (any nonzero mask byte keeps);
- forward_sm90's shared memory follows the define as the kernel's kAlloc does.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import forward_sm90 as f90

ROWS, KEYS, WARPS = 128, 64, 8
NEG_INF = {"bf16": 0xFF80, "fp16": 0xFC00}


def bias_address(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """TMA's place of bias element (r, c) in a 128 x 64 tile of 16-bit values (128B swizzle)."""
    off = r * 128 + c * 2
    return off ^ (((off >> 7) & 7) << 4)


def mask_address(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """TMA's place of mask byte (r, c) in a 128 x 64 tile (64-byte rows, 64B swizzle)."""
    off = r * 64 + c
    return off ^ (((off >> 7) & 3) << 4)


def frag_order(w: int, lane: int, j: int, r: int) -> int:
    """Where the fold puts the word of consumer warp w, lane, fragment j, row half r."""
    return w * 2048 + (j // 2) * 512 + lane * 16 + (2 * (j % 2) + r) * 4


def fold_word(bias: int, mask2: int, neg: int) -> int:
    """Each 16-bit half of a bias word whose mask byte is zero becomes -inf."""
    lo = bias & 0xFFFF if mask2 & 0xFF else neg
    hi = bias >> 16 if (mask2 >> 8) & 0xFF else neg
    return lo | hi << 16


def test_fold_model_reorders_in_place_and_consumers_read_their_fragments():
    rng = np.random.default_rng(7)
    bias = rng.integers(0, 1 << 16, size=(ROWS, KEYS), dtype=np.uint32)
    bias[rng.random((ROWS, KEYS)) < 0.05] = 0x7FC1  # NaN bias values: dropped where masked
    mask = rng.choice(np.array([0, 0, 1, 2, 0x80, 0xFF], dtype=np.uint32), size=(ROWS, KEYS))
    r, c = np.meshgrid(np.arange(ROWS), np.arange(KEYS), indexing="ij")
    tile = np.zeros(ROWS * KEYS * 2, dtype=np.uint8)
    tile[bias_address(r, c)] = bias & 0xFF
    tile[bias_address(r, c) + 1] = bias >> 8
    mtile = np.zeros(ROWS * KEYS, dtype=np.uint8)
    mtile[mask_address(r, c)] = mask
    words = tile.view("<u4").copy()
    neg = NEG_INF["bf16"]
    for w in range(WARPS):  # one fold warp per block: all reads, then all writes
        lo, hi = w * 2048, (w + 1) * 2048
        out = {}
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for j in range(8):
                for rh in range(2):
                    row, col = 16 * w + g + 8 * rh, 8 * j + 2 * t
                    src = int(bias_address(row, col))
                    assert lo <= src < hi and src % 4 == 0  # the block's own 2 KB
                    m = (int(mtile[mask_address(row, col)])
                         | int(mtile[mask_address(row, col + 1)]) << 8)
                    dst = frag_order(w, lane, j, rh)
                    assert lo <= dst < hi
                    out[dst] = fold_word(int(words[src // 4]), m, neg)
        assert sorted(out) == list(range(lo, hi, 4))  # a permutation of the block's words
        for dst, v in out.items():
            words[dst // 4] = v
    for wg in range(2):  # consumers: warp w = 4 c + warp reads 4 x 16 bytes per lane
        for warp in range(4):
            w = 4 * wg + warp
            for lane in range(32):
                g, t = lane // 4, lane % 4
                base = frag_order(w, lane, 0, 0)
                for k in range(4):
                    got = words[(base + 512 * k) // 4:(base + 512 * k) // 4 + 4]
                    for q in range(4):
                        j, rh = 2 * k + q // 2, q % 2
                        row, col = 16 * w + g + 8 * rh, 8 * j + 2 * t
                        want = [int(bias[row, col + e]) if mask[row, col + e] else neg
                                for e in (0, 1)]
                        assert int(got[q]) == want[0] | want[1] << 16


def _static_asserts() -> str:
    lines = ['#include "sm90/fwd.cu"', "using namespace dm::sm90;"]
    for r8 in range(0, ROWS, 8):
        for g in range(8):
            for j in range(8):
                for t in range(4):
                    row, col = r8 + g, 8 * j + 2 * t
                    lines.append(f"static_assert(frag_row_b16({r8}, {g}, {t}) + frag_chunk_b16("
                                 f"{g}, {j}) == tile_offset<2, 64, 128>({row}, {col}) && "
                                 f"{int(bias_address(row, col))}u == tile_offset<2, 64, 128>("
                                 f"{row}, {col}));")
                    lines.append(f"static_assert(frag_row_b8({r8}, {g}, {t}) + frag_chunk_b8("
                                 f"{g}, {j}) == tile_offset<1, 64, 128>({row}, {col}) && "
                                 f"{int(mask_address(row, col))}u == tile_offset<1, 64, 128>("
                                 f"{row}, {col}));")
            if r8 % 16 == 0:  # the kernel reads row r8 + 8 + g at the row part + 1024 / + 512
                lines.append(f"static_assert(frag_row_b16({r8}, {g}, 1) + 1024 == "
                             f"frag_row_b16({r8 + 8}, {g}, 1) && frag_row_b8({r8}, {g}, 3) + "
                             f"512 == frag_row_b8({r8 + 8}, {g}, 3));")
    for w in (0, 3, 7):
        for lane in (0, 5, 31):
            for j in range(8):
                for rh in range(2):
                    lines.append(f"static_assert(frag_order_offset({w}, {lane}, {j}, {rh}) == "
                                 f"{frag_order(w, lane, j, rh)}u);")
    rng = np.random.default_rng(3)
    byte_vals = [0, 1, 2, 0x7F, 0x80, 0xFF]
    for _ in range(48):
        b = int(rng.integers(0, 1 << 32))
        m = int(rng.choice(byte_vals)) | int(rng.choice(byte_vals)) << 8
        for neg in NEG_INF.values():
            lines.append(f"static_assert(fold_word({b}u, {m}u, {neg * 0x10001}u) == "
                         f"{fold_word(b, m, neg)}u);")
    lines.append("static_assert(dm::neg_inf_pair(dm::BFloat16{}) == 0xff80ff80u && "
                 "dm::neg_inf_pair(dm::Half{}) == 0xfc00fc00u);")
    return "\n".join(lines) + "\n"


def test_fold_helpers_equal_the_model():
    compile_static_asserts(_static_asserts(), "sm90_mb_fold_check.cu")


@pytest.mark.parametrize("defines, fold", [((), True), (("DM_SM90_MB_FOLD=1",), True),
                                           (("DM_SM90_PERSISTENT=0",), False),
                                           (("DM_SM90_MB_FOLD=0",), False)],
                         ids=["default", "fold", "fold_static_schedule", "off"])
def test_fold_shared_memory_agrees_with_the_kernel(monkeypatch, defines, fold):
    """With DM_SM90_MB_FOLD=1 (default) the mask + bias specs (dynamic scheduler only) get one
    barrier per stage more than with 0; the host's shared memory equals the kernel's kAlloc for
    every tile."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_MB_FOLD=0")
    plain = {key: f90.smem_bytes(key[0], *f90.tile(*key), key[1], key[2]) for key in f90.TILES}
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", " ".join(defines))
    lines = ['#include "sm90/fwd.cu"']
    for (hd, mask, bias) in f90.TILES:
        bn, st = f90.tile(hd, mask, bias)
        smem = f90.smem_bytes(hd, bn, st, mask, bias)
        on = f90.fold_bias(bn, mask, bias)
        assert on == (fold and mask and bias)
        if "DM_SM90_PERSISTENT=0" not in defines:
            assert smem == plain[(hd, mask, bias)] + (8 * st if on else 0)
        assert smem <= f90.SMEM_LIMIT
        spec = f"dm::Sm90FwdSmem<{hd}, {bn}, {st}, {str(mask).lower()}, {str(bias).lower()}>"
        lines.append(f"static_assert({spec}::kFold == {str(on).lower()} && "
                     f"{spec}::kAlloc == {smem});")
    compile_static_asserts("\n".join(lines) + "\n", "sm90_mb_fold_smem.cu", defines)
