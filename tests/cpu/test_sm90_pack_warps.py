"""fwd_sm90's pack warps (sm90/fwd.cu: pack_mask_warps, DMATTN_MASK_ROUTE=warps): the word of
bits made from a row's 32 mask bytes (pack_word_bits, 4 bytes at a time for any bytes;
pack_word_bits01, 8 at a time for bytes of 0 or 1; the last bytes first) is the block lists'
layout (bit i: byte i nonzero), checked in Python and by static_asserts in the kernel's
header; which mask layouts the warps read (forward_sm90.packs_mask); the scratch the route
allocates."""

from __future__ import annotations

import numpy as np
from nvrtc_check import compile_static_asserts

from dmattn_cupy import forward_sm90 as f90
from dmattn_cupy import mask_pack
from dmattn_cupy.arrays import ArrayInfo


def kept_nibble(m: int) -> int:
    kept = (((m & 0x7F7F7F7F) + 0x7F7F7F7F) | m) & 0x80808080
    return ((kept * 0x00204081) & 0xFFFFFFFF) >> 28


def word_of(row: bytes) -> int:
    """The kernel's arithmetic on 32 bytes."""
    bits = 0
    for j in range(7, -1, -1):
        bits = ((bits << 4) & 0xFFFFFFFF) | kept_nibble(int.from_bytes(row[4 * j:4 * j + 4],
                                                                         "little"))
    return bits


def word_of01(row: bytes) -> int:
    """The kernel's arithmetic on 32 bytes of 0 or 1, 8 at a time."""
    bits = 0
    for j in range(3, -1, -1):
        lo = int.from_bytes(row[8 * j:8 * j + 4], "little")
        hi = int.from_bytes(row[8 * j + 4:8 * j + 8], "little")
        bits = ((bits << 8) & 0xFFFFFFFF) | ((((lo | (hi << 4)) * 0x01020408) & 0xFFFFFFFF) >> 24)
    return bits


def test_word_of_32_bytes_of_0_or_1_by_eights():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        r = rng.integers(0, 2, 32, dtype=np.uint8)
        assert word_of01(r.tobytes()) == sum(1 << i for i in range(32) if r[i]), r
    for i in range(32):
        assert word_of01(np.eye(32, dtype=np.uint8)[i].tobytes()) == 1 << i


def test_word_of_32_bytes_is_bit_i_for_byte_i():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 2, 32, dtype=np.uint8) for _ in range(500)]
    rows += [rng.integers(0, 256, 32, dtype=np.uint8) * (rng.random(32) < 0.5)
             for _ in range(500)]   # any nonzero byte is true
    rows += [np.zeros(32, np.uint8), np.full(32, 255, np.uint8), np.eye(32, dtype=np.uint8)[5]]
    rows += [np.where(np.arange(32) == i, 0x80, 0).astype(np.uint8) for i in range(32)]
    for r in rows:
        want = sum(1 << i for i in range(32) if r[i] != 0)
        assert word_of(r.tobytes()) == want, r


def test_kernel_helper_matches_the_byte_model():
    """pack_word_bits over every value of one byte at each of the 32 positions (the others
    0x00 or 0x01 alternating), in the kernel's header."""
    src = r'''
#include "sm90/fwd.cu"
constexpr bool check() {
  for (int pos = 0; pos < 32; ++pos)
    for (uint32_t x = 0; x < 256; ++x) {
      uint8_t b[32] = {};
      uint32_t want = 0;
      for (int i = 0; i < 32; ++i) {
        b[i] = i == pos ? uint8_t(x) : uint8_t((i * 7 + pos) % 3 == 0);
        want |= uint32_t(b[i] != 0) << i;
      }
      uint32_t bits = 0;
      for (int j = 7; j >= 0; --j)
        bits = dm::pack_word_bits(bits, uint32_t(b[4 * j]) | uint32_t(b[4 * j + 1]) << 8 |
                                            uint32_t(b[4 * j + 2]) << 16 |
                                            uint32_t(b[4 * j + 3]) << 24);
      if (bits != want) return false;
    }
  return true;
}
static_assert(check(), "pack_word_bits: a byte lands on the wrong bit");
constexpr bool check01() {
  for (uint32_t x = 0; x < 256; ++x)      // keys 8j .. 8j + 7 as the bits of x, for each j
    for (int j = 0; j < 4; ++j) {
      uint32_t lo = 0, hi = 0;
      for (int i = 0; i < 4; ++i) {
        lo |= ((x >> i) & 1u) << (8 * i);
        hi |= ((x >> (4 + i)) & 1u) << (8 * i);
      }
      uint32_t bits = 0;
      for (int jj = 3; jj >= 0; --jj)
        bits = jj == j ? dm::pack_word_bits01(bits, lo, hi) : dm::pack_word_bits01(bits, 0, 0);
      if (bits != x << (8 * j)) return false;
    }
  return true;
}
static_assert(check01(), "pack_word_bits01: a byte lands on the wrong bit");
'''
    compile_static_asserts(src, "pack_word_bits.cu")


def _mask(shape, strides, ptr=1 << 20, dtype="bool"):
    return ArrayInfo("torch", dtype, tuple(shape), tuple(strides), 0, ptr)


def test_packs_mask_takes_16_byte_rows_of_whole_words():
    sq, sk = 300, 544
    full = _mask((2, 4, sq, sk), (4 * sq * sk, sq * sk, sk, 1))
    assert f90.packs_mask(full, sk)
    assert f90.packs_mask(_mask((1, 1, sq, sk), (0, 0, sk, 1)), sk)         # broadcast
    assert f90.packs_mask(_mask((2, 4, sq, sk), (0, 0, sk + 16, 1)), sk)    # pitched by 16
    assert not f90.packs_mask(_mask((2, 4, sq, sk), (0, 0, sk + 3, 1)), sk)  # odd pitch
    assert not f90.packs_mask(_mask((2, 4, sq, sk), (0, 0, 1, sq)), sk)      # a key stride
    assert not f90.packs_mask(_mask((2, 4, sq, sk), (0, 0, sk, 1), ptr=(1 << 20) + 8), sk)
    assert not f90.packs_mask(_mask((2, 4, sq, 520), (0, 0, 528, 1)), 520)   # Sk % 32
    assert not f90.packs_mask(_mask((2, 4, sq, sk), (0, 0, sk, 1), dtype="uint8"), sk)
    assert not f90.packs_mask(_mask((2, 4, sq, sk), (0, 0, 2**25, 1)), sk)   # 32-bit offsets
    assert not f90.packs_mask(_mask((2, 4, sq, sk), (8, 0, sk, 1)), sk)      # batch stride


def test_pack_warps_specs_and_scratch():
    assert f90.pack_warps(False, True) and not f90.pack_warps(True, True)
    assert not f90.pack_warps(False, False) and not f90.pack_warps(False, True, key_row=True)
    assert mask_pack.pack_scratch_words(132, 2, 128) == 132 * 2 * 128 * 4
    assert mask_pack.pack_scratch_words(132, 2, 64) == 132 * 2 * 128 * 2
