"""fwd_sm90's gather of a block list's element bits (listed_keep_fields in sm90/fwd.cu): one
multiply per row word places quad lane t's keys 8j + 2t + e at bits 24 + 2j + e. Checked
against a bit-by-bit model in Python and, by static_asserts, in the kernel's own header."""

from __future__ import annotations

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts


def keep_fields(w: int, t: int) -> int:
    """The kernel's expression in 32-bit arithmetic."""
    return ((((w >> (2 * t)) & 0x03030303) * 0x01041040) & 0xFFFFFFFF) >> 24


def model(w: int, t: int) -> int:
    """Bit 2j + e = bit 8j + 2t + e of w (j = 0..3, e = 0..1)."""
    return sum(((w >> (8 * j + 2 * t + e)) & 1) << (2 * j + e) for j in range(4) for e in (0, 1))


def test_multiply_gather_matches_the_bit_model():
    rng = np.random.default_rng(0)
    words = [int(x) for x in rng.integers(0, 1 << 32, size=4096, dtype=np.uint64)]
    words += [0, 0xFFFFFFFF, 0x55555555, 0xAAAAAAAA, 0x03030303, 0xC0C0C0C0]
    words += [1 << i for i in range(32)]
    for t in range(4):
        for w in words:
            assert keep_fields(w, t) == model(w, t), (hex(w), t)


def test_kernel_helper_matches_the_bit_model():
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
    compile_static_asserts(src, "listed_bits.cu")


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
        return SparseArrays(None, None, None, None, None, bits, 128, 128)

    sm90, mma = SimpleNamespace(family="fwd_sm90"), SimpleNamespace(family="fwd_mma")
    check_partial_words(arrays(MAX_SM90_PARTIAL_WORDS), sm90)
    check_partial_words(arrays(MAX_SM90_PARTIAL_WORDS + 1), mma)
    with pytest.raises(ValueError, match="sparse_mask: a MixedMask"):
        check_partial_words(arrays(MAX_SM90_PARTIAL_WORDS + 1), sm90)


def test_listed_bias_keep_mask_matches_the_bit_model():
    """DM_SM90_LISTED_BIAS's keep mask of a bias word (listed_keep_halves: two shifts and a
    sign-replicating prmt) against the bit model, through prmt_model (PTX's byte permute in
    plain arithmetic), for every byte value at every byte position, lane and fragment; and
    prmt_model itself on plain and sign-replicating selectors."""
    src = r'''
#include "sm90/fwd.cu"
constexpr bool check_prmt() {
  const uint32_t a = 0x80417f02u, b = 0x00ff8001u;
  return dm::prmt_model(a, b, 0x3210u) == a && dm::prmt_model(a, b, 0x7654u) == b &&
         dm::prmt_model(a, b, 0x5410u) == 0x80017f02u &&
         dm::prmt_model(a, b, 0xba98u) == 0xff000000u &&   // signs of 02 7f 41 80
         dm::prmt_model(a, b, 0xfedcu) == 0x00ffff00u;     // signs of 01 80 ff 00
}
constexpr bool check() {
  for (int t = 0; t < 4; ++t)
    for (int jj = 0; jj < 4; ++jj)
      for (uint32_t x = 0; x < 256; ++x)
        for (int byte = 0; byte < 4; ++byte) {
          const uint32_t w = (x << (8 * byte)) | (0xa5u << (8 * ((byte + 2) % 4)));
          const uint32_t got = dm::prmt_model(dm::listed_keep_u(w, t), dm::listed_keep_v(w, t),
                                              dm::listed_keep_selector(jj));
          if (got != dm::listed_keep_halves_model(w, t, jj)) return false;
        }
  return true;
}
static_assert(check_prmt(), "prmt_model: a byte lands wrong");
static_assert(check(), "listed_keep_halves: a key's half lands wrong");
'''
    compile_static_asserts(src, "listed_bias_bits.cu")


def keep_halves(w: int, t: int, jj: int) -> int:
    return (0xFFFF if (w >> (8 * jj + 2 * t)) & 1 else 0) | (
        0xFFFF0000 if (w >> (8 * jj + 2 * t + 1)) & 1 else 0)


def test_keep_halves_model_is_keys_8jj_plus_2t():
    """The model's halves are keys 8jj + 2t (low) and 8jj + 2t + 1 (high): the bias word's two
    keys for quad lane t (fragment j = 4q + jj of word q)."""
    for t in range(4):
        for jj in range(4):
            for key in range(32):
                w = 1 << key
                want = (0xFFFF if key == 8 * jj + 2 * t else 0) | (
                    0xFFFF0000 if key == 8 * jj + 2 * t + 1 else 0)
                assert keep_halves(w, t, jj) == want


@pytest.mark.parametrize("spec_id", [
    "fwd_sm90_bf16_d128_m128n128w12_mask0_bias1_varlen0_st2",
    "fwd_sm90_fp16_d64_m128n128w12_mask0_bias1_varlen0_st2",
])
def test_listed_bias_build_has_no_spills(monkeypatch, spec_id):
    """DM_SM90_LISTED_BIAS=1 (not the default) builds the block lists' bias specs without
    spills or slow-wgmma advisories on DM_SM90_ITEM_REMAT=1's registers (CI compiles the
    default build only; this keeps the dormant one buildable)."""
    from dmattn_cupy.compile import compile_spec
    from dmattn_cupy.precompile import all_specs

    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_ITEM_REMAT=1 DM_SM90_LISTED_BIAS=1")
    spec = next(s for s in all_specs("sm_90") if s.id == spec_id)
    ck = compile_spec(spec, use_disk_cache=False)
    assert not ck.spills and not ck.advisories, (ck.spill_stores, ck.stack_frame, ck.advisories)
