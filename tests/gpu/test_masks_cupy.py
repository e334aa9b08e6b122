"""MixedMask's array operations on CuPy arrays (DMATTN_MASK_PACK=0: no packing kernel) give
NumPy's result bit for bit, for each packing path of from_dense_mask (whole words, whole
bytes and single bits per block row; a block far longer than the mask), and the
constructor's word-space check accepts and rejects CuPy parts as it does NumPy ones."""

from __future__ import annotations

import numpy as np
import pytest

from dmattn_cupy.masks import MixedMask

cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu

BLOCKS = [(8, 32), (16, 8), (4, 24), (8, 4), (32, 1), (2 ** 12, 16)]


def _dense(block):
    g = np.random.default_rng(block[0] * 1000 + block[1])
    d = g.random((2, 3, 45, 70)) < 0.5
    d[:, :, :20, :32] = True       # full blocks beside partial and empty ones
    d[:, :, 20:40, 32:64] = False
    return d


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_array_operations_on_cupy_match_numpy(block, monkeypatch):
    monkeypatch.setenv("DMATTN_MASK_PACK", "0")
    host = _dense(block)
    want = MixedMask.from_dense_mask(host, block)
    got = MixedMask.from_dense_mask(cupy.asarray(host), block)
    assert isinstance(got.partial_bits, cupy.ndarray)
    assert want.partial_bits.shape[0] > 0
    for field in ("block_class", "partial_slot", "partial_bits"):
        np.testing.assert_array_equal(cupy.asnumpy(getattr(got, field)), getattr(want, field),
                                      err_msg=field)
    np.testing.assert_array_equal(cupy.asnumpy(got.to_dense()), host)
    parts = [cupy.asarray(getattr(want, f)) for f in ("block_class", "partial_slot",
                                                      "partial_bits")]
    rebuilt = MixedMask(*parts, 45, 70, block)  # the check passes on CuPy parts
    np.testing.assert_array_equal(cupy.asnumpy(rebuilt.to_dense()), host)


@pytest.mark.parametrize("edit", ["out_of_range", "emptied", "filled"])
def test_check_rejects_bad_cupy_bits(edit):
    block = (16, 24)
    host = _dense(block)
    m = MixedMask.from_dense_mask(host, block)
    bc, slot, bits = m.block_class.copy(), m.partial_slot.copy(), m.partial_bits.copy()
    # the last partial block of the last (b, h): a block cut by both sequence ends
    last = int(slot[-1, -1, -1, -1])
    assert last == bits.shape[0] - 1
    if edit == "out_of_range":
        k = 15 * 24 + 3           # row 15 of block row 2 is row 47 >= seqlen_q 45
        bits[last, k // 32] |= np.uint32(1 << (k % 32))
    elif edit == "emptied":
        bits[last] = 0
    else:
        bits[last] = 0xFFFFFFFF   # every element, in range or not
    MixedMask(bc, slot, m.partial_bits, 45, 70, block)   # unedited: accepted on NumPy parts
    with pytest.raises(ValueError, match="some but not all in-range elements"):
        MixedMask(cupy.asarray(bc), cupy.asarray(slot), cupy.asarray(bits), 45, 70, block)
