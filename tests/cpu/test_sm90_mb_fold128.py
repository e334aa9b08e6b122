"""DM_SM90_MB_FOLD128's arithmetic (cuda_src/sm90/fwd.cu: the producer warpgroup's fold-loads
warps, fold_chunk, chunk_all_kept; forward_sm90.fold_loads / _foldable), on the CPU:

- a NumPy model of the fold: 96 threads take the 1024 16-key chunks of a 128 x 128 tile
  (chunk c: row c / 8, keys 16 (c % 8) ..), read the chunk's 16 mask bytes from the mask's rows
  in global memory and write -inf into the two 16-byte chunks of the TMA bias tile (two
  64-key boxes, 128B swizzle) that hold those keys; every bias value then reads back as
  where(mask, bias, -inf), and only rows/keys inside the problem are read;
- the kernel's tile_offset of each chunk and chunk_all_kept equal that model (NVRTC
  static_asserts);
- the host's tiles and shared memory follow the define as the kernel's kAlloc does, and
  tile_for sends a fold-loads spec only what its loads can read.
"""

from __future__ import annotations

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import forward_sm90 as f90
from dmattn_cupy.arrays import ArrayInfo

ROWS, KEYS, THREADS, CHUNKS = 128, 128, 96, 128 * 128 // 16
DEFINE = "DM_SM90_MB_FOLD128=1"


def bias_address(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """TMA's place of bias element (r, c) in a 128 x 128 tile of 16-bit values: two boxes of
    64 keys (128-byte rows, 128B swizzle), box 1 after box 0's 16 KB."""
    off = r * 128 + (c % 64) * 2
    return (c // 64) * (ROWS * 128) + (off ^ (((off >> 7) & 7) << 4))


def kept(m: int) -> int:
    """common.cuh kept_bits: bit 7 of each byte where that byte is nonzero."""
    return (((m & 0x7F7F7F7F) + 0x7F7F7F7F) | m) & 0x80808080


def test_fold_model_covers_each_chunk_once_and_folds_in_place():
    rng = np.random.default_rng(11)
    bias = rng.integers(0, 1 << 16, size=(ROWS, KEYS), dtype=np.uint32)
    mask = rng.choice(np.array([0, 1, 2, 0x80, 0xFF], dtype=np.uint8), size=(ROWS, KEYS),
                      p=[0.2, 0.5, 0.1, 0.1, 0.1])
    rows, keys = 100, 96   # a partial tile: rows and keys past these are never read
    r, c = np.meshgrid(np.arange(ROWS), np.arange(KEYS), indexing="ij")
    tile = np.zeros(ROWS * KEYS * 2, dtype=np.uint8)
    tile[bias_address(r, c)] = bias & 0xFF
    tile[bias_address(r, c) + 1] = bias >> 8
    seen = np.zeros(CHUNKS, dtype=int)
    read = np.zeros((ROWS, KEYS), dtype=bool)
    per = -(-CHUNKS // THREADS)
    for f in range(THREADS):
        for i in range(per):
            ch = f + THREADS * i
            if ch >= CHUNKS:
                continue
            seen[ch] += 1
            row, k0 = ch >> 3, 16 * (ch & 7)
            if row >= rows or k0 >= keys:
                continue
            read[row, k0:k0 + 16] = True
            m = mask[row, k0:k0 + 16]
            for h in range(2):
                base = int(bias_address(np.array(row), np.array(k0 + 8 * h)))
                # the chunk's 8 values are contiguous in the tile (a 16-byte swizzle unit)
                addrs = bias_address(np.full(8, row), np.arange(k0 + 8 * h, k0 + 8 * h + 8))
                assert list(addrs) == list(range(base, base + 16, 2))
                words = tile[base:base + 16].view("<u2")
                words[m[8 * h:8 * h + 8] == 0] = 0xFF80
    assert (seen == 1).all()
    assert not read[rows:].any() and not read[:, keys:].any()
    got = tile.view("<u2")[bias_address(r, c) // 2]
    inside = (r < rows) & (c < keys)
    want = np.where(inside & (mask == 0), 0xFF80, bias)
    np.testing.assert_array_equal(got, want)


def _static_asserts() -> str:
    lines = ['#include "sm90/fwd.cu"', "using dm::sm90::tile_offset;"]
    for ch in range(0, CHUNKS, 7):
        row, k0 = ch >> 3, 16 * (ch & 7)
        for h in range(2):
            want = int(bias_address(np.array(row), np.array(k0 + 8 * h)))
            lines.append(f"static_assert(tile_offset<2, 64, 128>({row}, {k0 + 8 * h}) == {want}u);")
    rng = np.random.default_rng(5)
    vals = [0, 1, 2, 0x7F, 0x80, 0xFF]
    for _ in range(64):
        w = [int.from_bytes(bytes(int(rng.choice(vals)) if rng.random() < 0.3 else 1
                                  for _ in range(4)), "little") for _ in range(4)]
        all_kept = all(kept(x) == 0x80808080 for x in w)
        lines.append(f"static_assert(dm::chunk_all_kept({w[0]}u, {w[1]}u, {w[2]}u, {w[3]}u) "
                     f"== {str(all_kept).lower()});")
    return "\n".join(lines) + "\n"


def test_fold_helpers_equal_the_model():
    compile_static_asserts(_static_asserts(), "sm90_mb_fold128_check.cu")


@pytest.mark.parametrize("on", [False, True], ids=["default", "fold128"])
def test_tiles_and_shared_memory_agree_with_the_kernel(monkeypatch, on):
    """Under the define the mask + bias specs at head dim <= 128 take the bias spec's (128, 2)
    tiles with no mask slots and one fold barrier per stage; every other spec keeps its tile.
    The host's shared memory equals the kernel's kAlloc for every tile."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "")
    plain = {key: f90.tile(*key) for key in f90.TILES}
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", DEFINE if on else "")
    lines = ['#include "sm90/fwd.cu"']
    for (hd, mask, bias) in f90.TILES:
        bn, st = f90.tile(hd, mask, bias)
        folds = on and mask and bias and hd <= 128
        assert f90.fold_loads(hd, mask, bias) == folds
        if folds:
            assert (bn, st) == f90.TILES[(hd, False, True)] == (128, 2)
            assert f90.mask_slots(hd, bn, mask, bias) == 0
        else:
            assert (bn, st) == plain[(hd, mask, bias)]
        smem = f90.smem_bytes(hd, bn, st, mask, bias)
        assert smem <= f90.SMEM_LIMIT
        spec = f"dm::Sm90FwdSmem<{hd}, {bn}, {st}, {str(mask).lower()}, {str(bias).lower()}>"
        lines.append(f"static_assert({spec}::kFoldLoads == {str(folds).lower()} && "
                     f"{spec}::kAlloc == {smem});")
    compile_static_asserts("\n".join(lines) + "\n", "sm90_mb_fold128_smem.cu",
                           (DEFINE,) if on else ())


def _info(shape, strides, dtype="bool", ptr=1 << 20) -> ArrayInfo:
    return ArrayInfo("torch", dtype, shape, strides, 0, ptr)


def test_tile_for_sends_a_fold_spec_only_what_its_loads_read(monkeypatch):
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", DEFINE)
    B, H, S, D = 2, 4, 512, 128
    q = _info((B, S, H, D), (S * H * D, H * D, D, 1), "bfloat16")
    k = v = q
    bias = _info((B, H, S, S), (H * S * S, S * S, S, 1), "bfloat16")
    mask = _info((B, H, S, S), (H * S * S, S * S, S, 1))

    def served(m, b, sk=S, **kw):
        return f90.tile_for(D, q, k, v, m, b, S, sk, **kw)

    assert served(mask, bias) == (128, 128, 2)
    assert served(_info((B, 1, S, S), (S * S, 0, S, 1)), bias) == (128, 128, 2)  # broadcast
    assert served(_info((B, H, S, S), (H * S * S, S * S, S, 1), ptr=(1 << 20) + 8), bias) is None
    padded = _info((B, H, S, S), (H * S * (S + 8), S * (S + 8), S + 8, 1))  # rows 8-aligned
    assert served(padded, bias) is None
    key_row = _info((B, H, 1, S), (H * S, S, 0, 1))
    assert served(key_row, bias) is None                      # a key row needs mask slots
    f32 = _info((B, H, S, S), (H * S * S, S * S, S, 1), "float32")
    assert served(mask, f32) is None
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "")
    assert served(mask, bias) == (128, 64, 3)                 # the default's 64-key spec
