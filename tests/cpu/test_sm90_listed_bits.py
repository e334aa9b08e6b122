"""fwd_sm90's reads of a block list's element bits (sm90/fwd.cu, class kListedPartial).

Row-major words (the default): ``listed_keep_fields`` gathers quad lane t's keys 8j + 2t + e of
a word by one multiply, checked against a bit model in Python and by static_asserts.

Fragment order (``DM_SM90_LISTED_FRAG=1``, ``sp_partial_frag``): ``fragment_bits.fragment_words``
lays the bits out, the kernel finds a thread's word by ``listed_tile_word +
listed_thread_word`` and tests bit ``16r + 2(j % 8) + e`` of word ``j / 8`` for key
``8j + 2t + e`` of row ``16w + g + 8r`` of its consumer's 64 rows. A Python model of those reads
must give back every element of every partial block, and the header's helpers must equal the
model's (static_asserts)."""

from __future__ import annotations

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy.fragment_bits import fragment_words, unit_keys
from dmattn_cupy.masks import MixedMask
from dmattn_cupy.sparse_plan import partial_frag


def keep_fields(w: int, t: int) -> int:
    """The kernel's expression in 32-bit arithmetic."""
    return ((((w >> (2 * t)) & 0x03030303) * 0x01041040) & 0xFFFFFFFF) >> 24


def keep_model(w: int, t: int) -> int:
    """Bit 2j + e = bit 8j + 2t + e of w (j = 0..3, e = 0..1)."""
    return sum(((w >> (8 * j + 2 * t + e)) & 1) << (2 * j + e) for j in range(4) for e in (0, 1))


def test_multiply_gather_matches_the_bit_model():
    rng = np.random.default_rng(0)
    words = [int(x) for x in rng.integers(0, 1 << 32, size=4096, dtype=np.uint64)]
    words += [0, 0xFFFFFFFF, 0x55555555, 0xAAAAAAAA, 0x03030303, 0xC0C0C0C0]
    words += [1 << i for i in range(32)]
    for t in range(4):
        for w in words:
            assert keep_fields(w, t) == keep_model(w, t), (hex(w), t)


def test_kernel_gather_matches_the_bit_model():
    """The header's constexpr helper against the model for every byte pattern a lane reads
    (each byte of the word independently: 256 values x 4 byte positions x 4 lanes)."""
    src = r'''
#include "sm90/fwd.cu"
constexpr bool check() {
  for (int t = 0; t < 4; ++t)
    for (uint32_t x = 0; x < 256; ++x)
      for (int byte = 0; byte < 4; ++byte) {
        const uint32_t w = (x << (8 * byte)) | (0x5au << (8 * ((byte + 1) % 4)));
        uint32_t want = 0;
        for (int j = 0; j < 4; ++j)
          for (int e = 0; e < 2; ++e)
            want |= ((w >> (8 * j + 2 * t + e)) & 1u) << (2 * j + e);
        if ((dm::listed_keep_fields(w, t) >> 24) != want) return false;
      }
  return true;
}
static_assert(check(), "listed_keep_fields: a key lands on the wrong bit");
'''
    compile_static_asserts(src, "listed_gather.cu")


def tile_word(slot: int, bm: int, bn: int, m: int, n: int) -> int:
    u = unit_keys(bn)
    return slot * (bm // 32) * bn + (m // 64) * 2 * bn + (n // u) * 2 * u + (n % u) // 64


def thread_word(bn: int, c: int, i: int) -> int:
    return c * 2 * bn + unit_keys(bn) // 64 * i


def kernel_view(frag: np.ndarray, bm: int, bn: int, block_n: int) -> np.ndarray:
    """``(P, bm, bn)`` bool: what the kernel's consumers read for every element, tile by tile
    (tiles of 128 rows x block_n keys; consumer c, thread i = 32w + 4g + t)."""
    flat = frag.reshape(-1)
    out = np.zeros((frag.shape[0], bm, bn), dtype=bool)
    i = np.arange(128)
    w, g, t = i // 32, i % 32 // 4, i % 4
    for slot in range(frag.shape[0]):
        for m in range(0, bm, 128):
            for n in range(0, bn, block_n):
                for c in range(2):
                    word0 = tile_word(slot, bm, bn, m, n) + thread_word(bn, c, i)
                    for j in range(block_n // 8):
                        word = flat[word0 + j // 8]
                        for r in range(2):
                            for e in range(2):
                                bit = (word >> np.uint32(16 * r + 2 * (j % 8) + e)) & 1
                                rows = m + 64 * c + 16 * w + g + 8 * r
                                out[slot, rows, n + 8 * j + 2 * t + e] = bit.astype(bool)
    return out


def _row_major_words(dense: np.ndarray) -> np.ndarray:
    """``(P, bm, bn)`` bool -> ``(P, bm*bn/32)`` uint32: element k is bit k % 32 of word k // 32."""
    flat = dense.reshape(dense.shape[0], -1, 32).astype(np.uint64)
    return (flat << np.arange(32, dtype=np.uint64)).sum(axis=-1).astype(np.uint32)


@pytest.mark.parametrize("bm,bn,block_n", [(128, 128, 128), (128, 128, 64), (128, 64, 64),
                                           (256, 256, 128), (128, 192, 64), (256, 384, 128),
                                           (384, 320, 64)])
def test_kernel_reads_give_back_every_element(bm, bn, block_n):
    rng = np.random.default_rng(bm * 1000 + bn + block_n)
    dense = rng.random((3, bm, bn)) < 0.5
    dense[1] = True
    dense[2, :, ::3] = False
    frag = fragment_words(_row_major_words(dense), bm, bn)
    assert frag.shape == (3, bm * bn // 32) and frag.dtype == np.uint32
    np.testing.assert_array_equal(kernel_view(frag, bm, bn, block_n), dense)


def test_a_misplaced_bit_is_seen():
    """The check can fail: one element flipped in the source moves one read."""
    dense = np.random.default_rng(1).random((1, 128, 128)) < 0.5
    frag = fragment_words(_row_major_words(dense), 128, 128)
    flipped = dense.copy()
    flipped[0, 77, 101] ^= True
    assert not np.array_equal(kernel_view(frag, 128, 128, 128), flipped)


def test_blocks_not_of_64_have_no_fragment_order():
    with pytest.raises(ValueError, match="multiples of 64"):
        fragment_words(np.zeros((1, 32 * 64 // 32), np.uint32), 32, 64)


def test_a_mixed_mask_caches_its_fragment_words():
    rng = np.random.default_rng(2)
    dense = rng.random((2, 3, 256, 384)) < 0.5
    dense[:, :, :128, :128] = True
    dense[:, :, 128:, 128:256] = False
    mask = MixedMask.from_dense_mask(dense, block_size=(128, 128))
    frag = partial_frag(mask)
    assert frag is partial_frag(mask)
    np.testing.assert_array_equal(frag, fragment_words(mask.partial_bits, 128, 128))
    small = MixedMask.from_dense_mask(dense, block_size=(32, 32))
    assert partial_frag(small).shape == (0, 32)


def test_kernel_helpers_match_the_model():
    rng = np.random.default_rng(3)
    checks = []
    for bm, bn in [(128, 128), (128, 64), (256, 192), (384, 1024), (1024, 320)]:
        for _ in range(6):
            slot = int(rng.integers(0, 500))
            m = 128 * int(rng.integers(0, bm // 128))
            n = 64 * int(rng.integers(0, bn // 64))
            c, i = int(rng.integers(0, 2)), int(rng.integers(0, 128))
            checks.append(f"static_assert(dm::listed_tile_word({slot}, {bm}, {bn}, {m}, {n}) == "
                          f"{tile_word(slot, bm, bn, m, n)}, \"tile word\");")
            checks.append(f"static_assert(dm::listed_thread_word({bn}, {c}, {i}) == "
                          f"{thread_word(bn, c, i)}, \"thread word\");")
    compile_static_asserts('#include "sm90/fwd.cu"\n' + "\n".join(checks) + "\n",
                           "listed_bits.cu")


def test_bits_past_the_32_bit_offsets_are_refused():
    """fwd_sm90's word offsets are 32-bit: more words raise a ValueError naming sparse_mask
    (the portable family, 64-bit offsets, still takes them)."""
    from types import SimpleNamespace

    from dmattn_cupy.sparse_plan import (
        MAX_SM90_PARTIAL_WORDS,
        SparseArrays,
        check_partial_words,
    )

    def arrays(words):
        bits = np.broadcast_to(np.uint32(0), (words,))   # no memory behind it
        return SparseArrays(None, None, None, None, None, bits, bits, 128, 128)

    sm90, mma = SimpleNamespace(family="fwd_sm90"), SimpleNamespace(family="fwd_mma")
    check_partial_words(arrays(MAX_SM90_PARTIAL_WORDS), sm90)
    check_partial_words(arrays(MAX_SM90_PARTIAL_WORDS + 1), mma)
    with pytest.raises(ValueError, match="sparse_mask: a MixedMask"):
        check_partial_words(arrays(MAX_SM90_PARTIAL_WORDS + 1), sm90)
