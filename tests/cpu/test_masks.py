"""CPU tests of dmattn_cupy.masks: every mask's element semantics, block classes and kernel
block lists against brute force on the API's formulas, construction from dense masks,
intersections, DynamicMask's in-place update, estimates and argument validation."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from dmattn_cupy.masks import (
    BCSRMask,
    BlockBitsetMask,
    BlockLists,
    CausalMask,
    CausalWindowMask,
    DynamicMask,
    IntersectionMask,
    MixedMask,
    SparseMask,
    WindowMask,
    calculate_memory_savings,
    estimate_speedup,
)

MB = (16, 8)  # the masks' own block size in the matrix tests


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rng_for(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


# ----------------------------------------------------------------------------- brute force


def d_grid(sq: int, sk: int) -> np.ndarray:
    """``d = i + Sk - Sq - j`` over the (Sq, Sk) grid, written out from the API text."""
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    return i + sk - sq - j


def ref_causal(sq, sk):
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    return j <= i + sk - sq


def expand_blocks(bits4: np.ndarray, sq: int, sk: int, bm: int, bn: int) -> np.ndarray:
    """Element mask of a block-granular pattern, cropped to (Sq, Sk)."""
    return bits4.repeat(bm, axis=2).repeat(bn, axis=3)[:, :, :sq, :sk]


def ref_block_map(dense4: np.ndarray, bm: int, bn: int) -> np.ndarray:
    """0/1/2 per tile, judged over the in-range elements, by slicing each tile."""
    b, h, sq, sk = dense4.shape
    out = np.zeros((b, h, cdiv(sq, bm), cdiv(sk, bn)), dtype=np.int8)
    for r in range(out.shape[2]):
        for c in range(out.shape[3]):
            tile = dense4[:, :, r * bm : (r + 1) * bm, c * bn : (c + 1) * bn]
            out[:, :, r, c] = np.where(
                tile.all(axis=(2, 3)), 2, np.where(tile.any(axis=(2, 3)), 1, 0)
            )
    return out


def random_structured_dense(rng, lead, sq, sk, bm, bn) -> np.ndarray:
    """Random dense mask with empty, full and partial blocks of (bm, bn)."""
    kind = rng.integers(0, 3, size=(*lead, cdiv(sq, bm), cdiv(sk, bn)))
    noise = rng.random((*lead, sq, sk)) < 0.5
    kind_el = expand_blocks(kind, sq, sk, bm, bn)
    return (kind_el == 2) | ((kind_el == 1) & noise)


def bcsr_arrays(bits4: np.ndarray, pad: int):
    """Hand-built BCSR of ``bits4`` (B, H, nrb, ncb), col_idx padded by ``pad`` zeros."""
    b, h, nrb, _ = bits4.shape
    nnz = bits4.sum(axis=(2, 3))
    row_ptr = np.zeros((b, h, nrb + 1), dtype=np.int64)
    col_idx = np.zeros((b, h, int(nnz.max()) + pad), dtype=np.int64)
    for bi in range(b):
        for hi in range(h):
            cols = []
            for r in range(nrb):
                kept = [c for c in range(bits4.shape[3]) if bits4[bi, hi, r, c]]
                cols += kept
                row_ptr[bi, hi, r + 1] = row_ptr[bi, hi, r] + len(kept)
            col_idx[bi, hi, : len(cols)] = cols
    return row_ptr, col_idx


# ----------------------------------------------------------------------------- cases


def tile_fits_granular(tile):
    return all(t % m == 0 or m % t == 0 for t, m in zip(tile, MB, strict=True))


RULES = {
    "any": lambda tile: True,
    "granular": tile_fits_granular,
}


def make_case(kind: str, sq: int, sk: int):
    """(mask, reference dense (B, H, Sq, Sk), names of the tile rules it must satisfy)."""
    rng = rng_for(kind, sq, sk)
    nrb, ncb = cdiv(sq, MB[0]), cdiv(sk, MB[1])
    d = d_grid(sq, sk)[None, None]
    if kind == "causal":
        return CausalMask(sq, sk, MB), ref_causal(sq, sk)[None, None], ["any"]
    if kind == "window_int":
        return WindowMask(7, sq, sk, MB), np.abs(d) < 7, ["any"]
    if kind == "window_pair":
        return WindowMask((9, 2), sq, sk, MB), (-2 <= d) & (d <= 9), ["any"]
    if kind == "causal_window":
        return CausalWindowMask(11, sq, sk, MB), (0 <= d) & (d < 11), ["any"]
    if kind in ("bitset", "bitset_4d", "dynamic", "dynamic_4d", "bcsr", "bcsr_4d"):
        lead = (2, 3) if kind.endswith("4d") else (1, 1)
        bits4 = rng.random((*lead, nrb, ncb)) < 0.5
        bits = bits4 if kind.endswith("4d") else bits4[0, 0]
        ref = expand_blocks(bits4, sq, sk, *MB)
        if kind.startswith("bitset"):
            return BlockBitsetMask(bits, sq, sk, MB), ref, ["granular"]
        if kind.startswith("dynamic"):
            return DynamicMask(bits, sq, sk, MB), ref, ["granular"]
        row_ptr, col_idx = bcsr_arrays(bits4, pad=3 if kind.endswith("4d") else 0)
        if not kind.endswith("4d"):
            row_ptr, col_idx = row_ptr[0, 0], col_idx[0, 0]
        return BCSRMask(row_ptr, col_idx, sq, sk, MB), ref, ["granular"]
    if kind in ("mixed", "mixed_4d"):
        lead = (2, 1) if kind.endswith("4d") else (1, 1)
        dense4 = random_structured_dense(rng, lead, sq, sk, *MB)
        dense = dense4 if kind.endswith("4d") else dense4[0, 0]
        return MixedMask.from_dense_mask(dense, MB), dense4, ["any"]
    if kind.startswith("and_"):
        first, second = kind[4:].split("__")
        ma, ra, rules_a = make_case(first, sq, sk)
        mb, rb, rules_b = make_case(second, sq, sk)
        return ma & mb, ra & rb, rules_a + rules_b
    raise AssertionError(kind)


KINDS = [
    "causal", "window_int", "window_pair", "causal_window",
    "bitset", "bitset_4d", "bcsr", "bcsr_4d", "dynamic", "dynamic_4d", "mixed", "mixed_4d",
    "and_causal__bitset_4d", "and_window_pair__mixed", "and_causal__window_int",
    "and_mixed_4d__dynamic",
]
SHAPES = {"sq77_sk77": (77, 77), "sq50_sk93": (50, 93), "sq93_sk50": (93, 50),
          "sq1_sk40": (1, 40), "sq64_sk128": (64, 128)}
TILES = {"equal": (16, 8), "multiple": (32, 16), "divisor": (8, 4),
         "rows_x2_cols_div2": (32, 4), "misfit": (24, 12)}

kind_axis = pytest.mark.parametrize("kind", KINDS)
shape_axis = pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
tile_axis = pytest.mark.parametrize("tile", list(TILES.values()), ids=list(TILES))


def assert_lists(lists: BlockLists, cls4: np.ndarray, tile, exact_width: bool = True) -> None:
    b, h, nrb, ncb = cls4.shape
    assert (lists.block_m, lists.block_n) == tuple(tile)
    assert (lists.num_row_blocks, lists.num_col_blocks) == (nrb, ncb)
    for name, value in (("partial", 1), ("full", 2)):
        count = getattr(lists, f"{name}_count")
        idx = getattr(lists, f"{name}_idx")
        assert isinstance(count, np.ndarray) and isinstance(idx, np.ndarray)
        assert count.dtype == np.int32 and idx.dtype == np.int32
        assert count.shape == (b, h, nrb) and idx.shape[:3] == (b, h, nrb)
        width = max(1, int((cls4 == value).sum(axis=-1).max()))
        assert idx.shape[3] == width if exact_width else idx.shape[3] >= width
        for bi in range(b):
            for hi in range(h):
                for r in range(nrb):
                    want = np.flatnonzero(cls4[bi, hi, r] == value)
                    n = count[bi, hi, r]
                    assert n == len(want), (name, bi, hi, r)
                    np.testing.assert_array_equal(idx[bi, hi, r, :n], want)
                    assert (idx[bi, hi, r, n:] == 0).all()


# ----------------------------------------------------------------------------- matrix


@kind_axis
@shape_axis
def test_to_dense_matches_element_formula(kind, shape):
    mask, ref, _ = make_case(kind, *shape)
    dense = mask.to_dense()
    assert dense.dtype == np.bool_
    lead = mask.batch_heads
    if dense.ndim == 2:
        assert lead == (1, 1)
        np.testing.assert_array_equal(dense, ref[0, 0])
    else:
        assert dense.shape == (*lead, *shape)
        np.testing.assert_array_equal(dense, np.broadcast_to(ref, dense.shape))


@kind_axis
@shape_axis
def test_block_map_and_density_match_brute_force(kind, shape):
    mask, ref, _ = make_case(kind, *shape)
    want = ref_block_map(np.broadcast_to(ref, (*mask.batch_heads, *shape)), *MB)
    got = mask.block_map()
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want if got.ndim == 4 else want[0, 0])
    assert mask.density == pytest.approx(np.count_nonzero(want) / want.size)


@kind_axis
@shape_axis
@tile_axis
def test_block_lists_match_brute_force(kind, shape, tile):
    mask, ref, rules = make_case(kind, *shape)
    if not all(RULES[r](tile) for r in rules):
        with pytest.raises(ValueError, match=r"kernel tile .* block_size"):
            mask.block_lists(*tile)
        return
    cls4 = ref_block_map(np.broadcast_to(ref, (*mask.batch_heads, *shape)), *tile)
    lists = mask.block_lists(*tile)
    dynamic_own = isinstance(mask, DynamicMask) and tuple(tile) == MB
    assert_lists(lists, cls4, tile, exact_width=not dynamic_own)
    assert mask.visited_tiles(*tile) == np.count_nonzero(cls4)


# ----------------------------------------------------------------------------- parametric


@pytest.mark.parametrize(
    "mask, bounds",
    [
        (CausalMask(10, 20), (0, None)),
        (WindowMask(5, 10, 20), (-4, 4)),
        (WindowMask((3, 7), 10, 20), (-7, 3)),
        (CausalWindowMask(6, 10, 20), (0, 5)),
    ],
    ids=["causal", "window_int", "window_pair", "causal_window"],
)
def test_parametric_bounds_and_storage(mask, bounds):
    assert mask.diag_bounds() == bounds
    assert mask.diag_offset == 10
    assert mask.nbytes == 0
    assert mask.batch_heads == (1, 1)
    assert mask.block_size == (128, 128)
    assert calculate_memory_savings(mask) == 1.0


def test_parametric_lists_need_no_dense_materialization():
    n = 1 << 17  # a dense (n, n) mask would take 16 GiB
    lists = CausalMask(n, n).block_lists(128, 128)
    rows = np.arange(n // 128)
    np.testing.assert_array_equal(lists.full_count[0, 0], rows)
    np.testing.assert_array_equal(lists.partial_count[0, 0], 1)
    np.testing.assert_array_equal(lists.partial_idx[0, 0, :, 0], rows)
    assert estimate_speedup(CausalMask(n, n)) == pytest.approx(1024 * 1024 / (1024 * 1025 / 2))


def test_window_attributes():
    assert WindowMask(4, 8, 8).window_size == 4
    assert WindowMask([2, 3], 8, 8).window_size == (2, 3)
    assert CausalWindowMask(np.int64(4), 8, 8).window_size == 4


def test_causal_with_more_queries_than_keys_has_empty_rows():
    bmap = CausalMask(64, 16, (16, 16)).block_map()
    np.testing.assert_array_equal(bmap[:, 0], [0, 0, 0, 1])


# ----------------------------------------------------------------------------- from dense


@shape_axis
@pytest.mark.parametrize("lead", [None, (2, 3)], ids=["2d", "4d"])
def test_mixed_from_dense_is_exact(shape, lead):
    dense4 = random_structured_dense(rng_for("mixed", shape, lead), lead or (1, 1), *shape, *MB)
    dense = dense4 if lead else dense4[0, 0]
    mask = MixedMask.from_dense_mask(dense, MB)
    np.testing.assert_array_equal(mask.to_dense(), dense)
    np.testing.assert_array_equal(mask.block_map(), ref_block_map(dense4, *MB)[
        (slice(None),) * 2 if lead else (0, 0)])
    assert mask.batch_heads == (lead or (1, 1))


# each of from_dense_mask's packings: whole words per block row, whole bytes, single bits
@pytest.mark.parametrize("block", [(8, 32), (16, 8), (4, 24), (8, 4), (32, 1)],
                         ids=lambda b: f"{b[0]}x{b[1]}")
def test_mixed_partial_bits_layout(block):
    sq, sk, (bm, bn) = 45, 70, block
    dense4 = random_structured_dense(rng_for("layout", block), (1, 2), sq, sk, bm, bn)
    mask = MixedMask.from_dense_mask(dense4, (bm, bn))
    cls = ref_block_map(dense4, bm, bn)
    slot = mask.partial_slot
    assert slot.dtype == np.int32 and slot.shape == cls.shape
    assert mask.partial_bits.dtype == np.uint32
    assert mask.partial_bits.shape == ((cls == 1).sum(), bm * bn // 32)
    np.testing.assert_array_equal(slot[cls != 1], -1)
    np.testing.assert_array_equal(slot[cls == 1], np.arange((cls == 1).sum()))  # row-major
    for b, h, r, c in zip(*np.nonzero(cls == 1), strict=True):
        words = mask.partial_bits[slot[b, h, r, c]]
        for k in range(bm * bn):
            i, j = r * bm + k // bn, c * bn + k % bn
            want = bool(dense4[b, h, i, j]) if i < sq and j < sk else False
            assert bool((words[k // 32] >> (k % 32)) & 1) == want


@pytest.mark.parametrize("block", [(2 ** 16, 16), (16, 2 ** 16), (2 ** 15, 8)],
                         ids=lambda b: f"{b[0]}x{b[1]}")
def test_mixed_blocks_larger_than_the_mask_stay_in_memory(block):
    """A block far larger than the mask: from_dense_mask and the constructor's checks use
    about the words' own size in temporaries (formerly a byte per element of the padded
    blocks, and 32 bytes per word in the packing: 89x and 48x here, 24 GB in a random call)."""
    import tracemalloc

    dense = rng_for("large", block).random((2, 3, 40, 50)) < 0.5
    tracemalloc.start()
    try:
        mask = MixedMask.from_dense_mask(dense, block)
        built = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        checked = MixedMask(*_parts_of(mask), 40, 50, block)
        check = tracemalloc.get_traced_memory()[1] - tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    words = mask.partial_bits.nbytes
    assert mask.partial_bits.shape[1] == block[0] * block[1] // 32
    assert built < 4 * words and check < 3 * words, (built / words, check / words)
    np.testing.assert_array_equal(checked.to_dense(), dense)


@pytest.mark.parametrize("fill", [False, True], ids=["all_false", "all_true"])
def test_mixed_uniform_dense_has_no_partial_blocks(fill):
    dense = np.full((40, 50), fill)
    mask = MixedMask.from_dense_mask(dense, (16, 16))
    assert mask.partial_bits.shape == (0, 8)
    np.testing.assert_array_equal(mask.to_dense(), dense)
    assert mask.density == float(fill)
    assert estimate_speedup(mask) == (1.0 if fill else math.inf)


@shape_axis
@pytest.mark.parametrize("lead", [None, (2, 1)], ids=["2d", "4d"])
@pytest.mark.parametrize("cls", [BlockBitsetMask, BCSRMask], ids=["bitset", "bcsr"])
def test_block_granular_from_dense_coarsens(shape, lead, cls):
    dense4 = rng_for("coarsen", shape, lead).random((*(lead or (1, 1)), *shape)) < 0.02
    dense = dense4 if lead else dense4[0, 0]
    mask = cls.from_dense_mask(dense, MB)
    bits4 = ref_block_map(dense4, *MB) > 0
    want = expand_blocks(bits4, *shape, *MB)
    np.testing.assert_array_equal(mask.to_dense(), want if lead else want[0, 0])
    assert mask.block_size == MB and mask.batch_heads == (lead or (1, 1))
    assert (mask.to_dense() | ~dense).all()  # a coarsening keeps at least what dense keeps


@pytest.mark.parametrize("block", [(2 ** 30, 8), (16, 2 ** 30), (2 ** 30, 2 ** 30)],
                         ids=["rows", "cols", "both"])
@pytest.mark.parametrize("cls", [BlockBitsetMask, BCSRMask], ids=["bitset", "bcsr"])
def test_block_granular_from_dense_with_a_block_larger_than_the_mask(block, cls):
    """Reduced over the mask's own extent: padding the mask out to one 2**30-long block would
    take gigabytes."""
    dense4 = rng_for("large block", block).random((2, 1, 40, 50)) < 0.05
    mask = cls.from_dense_mask(dense4, block)
    within = min(block[0], 40), min(block[1], 50)
    bits4 = ref_block_map(dense4, *within) > 0
    np.testing.assert_array_equal(mask.block_map() > 0, bits4)
    np.testing.assert_array_equal(mask.to_dense(), expand_blocks(bits4, 40, 50, *within))


def test_bcsr_from_dense_arrays():
    bits = np.array([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    dense = expand_blocks(bits[None, None], 40, 30, 16, 8)[0, 0]
    mask = BCSRMask.from_dense_mask(dense, (16, 8))
    assert mask.row_ptr.dtype == np.int32 and mask.col_idx.dtype == np.int32
    np.testing.assert_array_equal(mask.row_ptr, [0, 3, 3, 4])
    np.testing.assert_array_equal(mask.col_idx, [0, 2, 3, 1])
    assert mask.nbytes == 4 * 4 + 4 * 4


def test_bcsr_from_dense_4d_pads_col_idx():
    bits = np.zeros((1, 2, 2, 3), dtype=bool)
    bits[0, 0] = [[1, 1, 0], [0, 1, 1]]
    bits[0, 1] = [[0, 0, 1], [0, 0, 0]]
    mask = BCSRMask.from_dense_mask(expand_blocks(bits, 20, 24, 16, 8), (16, 8))
    np.testing.assert_array_equal(mask.row_ptr, [[[0, 2, 4], [0, 1, 1]]])
    np.testing.assert_array_equal(mask.col_idx, [[[0, 1, 1, 2], [2, 0, 0, 0]]])


def test_bitset_is_bit_packed():
    bits = rng_for("packed").random((64, 64)) < 0.5
    mask = BlockBitsetMask(bits, 64 * 128, 64 * 128)
    assert mask.nbytes == 64 * 64 // 8
    np.testing.assert_array_equal(mask.bits, bits)
    np.testing.assert_array_equal(
        np.unpackbits(mask.packed_bits, bitorder="little").astype(bool), bits.ravel()
    )
    dense_bytes = (64 * 128) ** 2
    assert calculate_memory_savings(mask) == pytest.approx(1 - 512 / dense_bytes)


# ----------------------------------------------------------------------------- from_mask


@kind_axis
@shape_axis
@pytest.mark.parametrize("block", [MB, (32, 16), (8, 4)], ids=["own", "coarser", "finer"])
def test_mixed_from_mask_is_exact(kind, shape, block):
    mask, ref, _ = make_case(kind, *shape)
    mixed = MixedMask.from_mask(mask, block)
    assert mixed.block_size == block and mixed.batch_heads == mask.batch_heads
    ref4 = np.broadcast_to(ref, (*mask.batch_heads, *shape))
    np.testing.assert_array_equal(mixed.to_dense(), ref4 if mixed.to_dense().ndim == 4
                                  else ref4[0, 0])
    cls4 = ref_block_map(ref4, *block)
    np.testing.assert_array_equal(_as4(mixed.block_map()), cls4)
    assert mixed.partial_bits.shape == ((cls4 == 1).sum(), block[0] * block[1] // 32)


def _as4(a: np.ndarray) -> np.ndarray:
    return a if a.ndim == 4 else a[None, None]


def test_mixed_from_mask_needs_no_dense_array(monkeypatch):
    n = 1 << 16  # a dense (n, n) bool mask would take 4 GiB
    mask = CausalWindowMask(1000, n, n)
    monkeypatch.setattr(SparseMask, "to_dense", lambda self: pytest.fail("to_dense called"))
    mixed = MixedMask.from_mask(mask)
    nrb = n // 128
    # block diagonal k = R - C spans d in [128k - 127, 128k + 127]; kept is 0 <= d <= 999:
    # full for k = 1..6, partial for k = 0, 7, 8; diagonal k has nrb - k blocks
    assert mixed.partial_bits.shape == (3 * nrb - 15, 128 * 128 // 32)
    assert (mixed.block_map() == 2).sum() == 6 * nrb - 21
    assert mixed.nbytes < 10 * 2**20


def test_mixed_from_mask_rejects_other_arguments():
    with pytest.raises(TypeError, match="mask must be a SparseMask, got ndarray"):
        MixedMask.from_mask(np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match=r"multiple of 32, got block_size \(3, 5\)"):
        MixedMask.from_mask(CausalMask(10, 10), (3, 5))


# ----------------------------------------------------------------------------- torch inputs


def test_builders_accept_torch_cpu_tensors():
    torch = pytest.importorskip("torch")
    dense = random_structured_dense(rng_for("torch"), (2, 1), 50, 93, *MB)
    t = torch.from_numpy(dense)
    for cls in (BlockBitsetMask, BCSRMask, MixedMask):
        got, want = cls.from_dense_mask(t, MB), cls.from_dense_mask(dense, MB)
        np.testing.assert_array_equal(got.to_dense(), want.to_dense())
        assert got.nbytes == want.nbytes
    bits4 = ref_block_map(dense, *MB) > 0
    row_ptr, col_idx = bcsr_arrays(bits4, pad=2)
    bcsr = BCSRMask(torch.from_numpy(row_ptr), torch.from_numpy(col_idx), 50, 93, MB)
    np.testing.assert_array_equal(bcsr.to_dense(), expand_blocks(bits4, 50, 93, *MB))
    dyn = DynamicMask(torch.from_numpy(bits4), 50, 93, MB)
    ptr = dyn.device_lists().full_idx.ctypes.data
    dyn.update(torch.from_numpy(~bits4))
    np.testing.assert_array_equal(dyn.to_dense(), expand_blocks(~bits4, 50, 93, *MB))
    assert dyn.device_lists().full_idx.ctypes.data == ptr


# ----------------------------------------------------------------------------- intersection


def test_intersection_semantics_and_block_size():
    a = CausalMask(40, 60, (16, 16))
    b = WindowMask(10, 40, 60, (8, 8))
    both = a & b
    assert isinstance(both, IntersectionMask) and isinstance(both, SparseMask)
    assert both.block_size == (16, 16)
    np.testing.assert_array_equal(both.to_dense(), a.to_dense() & b.to_dense())
    assert both.nbytes == 0


def test_intersection_broadcasts_leading_dims():
    a = BlockBitsetMask(np.ones((2, 1, 3, 3), dtype=bool), 40, 40, (16, 16))
    b = BlockBitsetMask(np.ones((1, 3, 3, 3), dtype=bool), 40, 40, (16, 16))
    both = a & b
    assert both.batch_heads == (2, 3)
    assert both.to_dense().shape == (2, 3, 40, 40)
    assert both.nbytes == a.nbytes + b.nbytes


def test_intersection_of_partial_tiles_can_be_empty():
    # d == 0 and d == 2 share partial diagonal tiles but no element
    empty = WindowMask((0, 0), 32, 32, (16, 16)) & _shifted_band(32, 2)
    assert not empty.to_dense().any()
    np.testing.assert_array_equal(empty.block_map(), 0)
    assert empty.visited_tiles(16, 16) == 0
    assert empty.density == 0.0
    assert estimate_speedup(empty) == math.inf


def _shifted_band(n: int, k: int) -> MixedMask:
    """Exact mask of the band d == k (a partial tile on the diagonal, nothing on d == 0)."""
    return MixedMask.from_dense_mask(d_grid(n, n) == k, (16, 16))


def test_intersection_errors():
    with pytest.raises(ValueError, match=r"\(seqlen_q, seqlen_k\) \(10, 20\) and \(10, 21\)"):
        CausalMask(10, 20) & CausalMask(10, 21)
    a = BlockBitsetMask(np.ones((2, 1, 1, 1), dtype=bool), 10, 10)
    b = BlockBitsetMask(np.ones((3, 1, 1, 1), dtype=bool), 10, 10)
    with pytest.raises(ValueError, match=r"leading \(B, H\) dims \(2, 1\) and \(3, 1\)"):
        a & b
    with pytest.raises(TypeError):
        CausalMask(10, 10) & np.ones((10, 10), dtype=bool)
    with pytest.raises(TypeError, match="second must be a SparseMask"):
        IntersectionMask(CausalMask(10, 10), "causal")


# ----------------------------------------------------------------------------- dynamic


def _buffers(lists: BlockLists):
    return (lists.partial_count, lists.partial_idx, lists.full_count, lists.full_idx)


@pytest.mark.parametrize("lead", [None, (2, 3)], ids=["2d", "4d"])
def test_dynamic_update_in_place(lead):
    sq, sk, bs = 70, 100, (16, 16)
    shape = (*(lead or ()), cdiv(sq, 16), cdiv(sk, 16))
    rng = rng_for("dynamic", lead)
    mask = DynamicMask(rng.random(shape) < 0.5, sq, sk, bs, max_blocks_per_row=7)
    live = mask.device_lists()
    before = [(a, a.ctypes.data) for a in _buffers(live)]
    nbytes = mask.nbytes
    for step in range(3):
        pattern = rng.random(shape) < 0.3 * step
        mask.update(pattern)
        after = mask.device_lists()
        for (a, ptr), b in zip(before, _buffers(after), strict=True):
            assert a is b and b.ctypes.data == ptr
        assert after.full_idx.shape[-1] == 7
        bits4 = pattern if lead else pattern[None, None]
        ref = expand_blocks(bits4, sq, sk, *bs)
        np.testing.assert_array_equal(mask.to_dense(), ref if lead else ref[0, 0])
        cls4 = ref_block_map(ref, *bs)
        assert_lists(mask.block_lists(*bs), cls4, bs, exact_width=False)
        assert_lists(live, cls4, bs, exact_width=False)
        assert_lists(mask.block_lists(32, 8), ref_block_map(ref, 32, 8), (32, 8))
    assert mask.nbytes == nbytes


def test_dynamic_block_lists_are_copies():
    mask = DynamicMask(np.eye(4, dtype=bool), 64, 64, (16, 16))
    lists = mask.block_lists(16, 16)
    assert lists.full_idx is not mask.device_lists().full_idx
    mask.update(np.zeros((4, 4), dtype=bool))
    np.testing.assert_array_equal(lists.full_count[0, 0], 1)
    np.testing.assert_array_equal(mask.device_lists().full_count[0, 0], 0)


def test_dynamic_overflow_raises_and_keeps_buffers():
    start = np.eye(4, dtype=bool)
    mask = DynamicMask(start, 64, 64, (16, 16), max_blocks_per_row=2)
    crowded = start.copy()
    crowded[1, :3] = True
    with pytest.raises(ValueError, match=r"keeps 3 blocks in one row.*max_blocks_per_row=2"):
        mask.update(crowded)
    np.testing.assert_array_equal(mask.to_dense(), expand_blocks(start[None, None], 64, 64,
                                                                 16, 16)[0, 0])
    np.testing.assert_array_equal(mask.device_lists().full_count[0, 0], 1)


def test_dynamic_update_rejects_other_inputs():
    mask = DynamicMask(np.eye(4, dtype=bool), 64, 64, (16, 16))
    with pytest.raises(ValueError, match=r"keep the shape \(4, 4\), got \(1, 1, 4, 4\)"):
        mask.update(np.eye(4, dtype=bool)[None, None])
    with pytest.raises(TypeError, match="bool array, got dtype int64"):
        mask.update(np.eye(4, dtype=np.int64))
    with pytest.raises(TypeError, match="numpy.ndarray, cupy.ndarray or torch.Tensor, got list"):
        mask.update(np.eye(4, dtype=bool).tolist())


def test_dynamic_storage_and_estimates():
    mask = DynamicMask(np.eye(4, dtype=bool)[None].repeat(2, 0)[:, None], 64, 64, (16, 16),
                       max_blocks_per_row=3)
    # pattern (bool) + 2 counts + partial_idx (width 1) + full_idx (width 3), int32
    assert mask.nbytes == 2 * 16 + 4 * 2 * 4 * (1 + 1 + 1 + 3)
    assert mask.batch_heads == (2, 1)
    assert estimate_speedup(mask) == 4.0
    assert estimate_speedup(mask, (32, 32)) == 2.0
    assert calculate_memory_savings(mask) == pytest.approx(1 - mask.nbytes / (2 * 64 * 64))


@pytest.mark.parametrize(
    "cap, exc, match",
    [
        (0, ValueError, r"max_blocks_per_row must be a positive int, got 0"),
        (5, ValueError, r"max_blocks_per_row must be in \[1, ncb=4\], got 5"),
        (2.0, TypeError, r"max_blocks_per_row must be a positive int, got 2.0"),
    ],
    ids=["zero", "over_ncb", "float"],
)
def test_dynamic_bad_capacity(cap, exc, match):
    with pytest.raises(exc, match=match):
        DynamicMask(np.eye(4, dtype=bool), 64, 64, (16, 16), max_blocks_per_row=cap)


# ----------------------------------------------------------------------------- estimates


def test_estimate_speedup_causal():
    mask = CausalMask(512, 512)
    assert estimate_speedup(mask) == pytest.approx(16 / 10)
    assert estimate_speedup(mask, (64, 64)) == pytest.approx(64 / 36)
    assert mask.visited_tiles(128, 128) == 10


def test_estimate_speedup_counts_leading_dims():
    bits = np.zeros((2, 3, 4, 4), dtype=bool)
    bits[:, :, 0, 0] = True
    bits[1, 2] = True
    mask = BlockBitsetMask(bits, 64, 64, (16, 16))
    assert mask.visited_tiles(16, 16) == 5 + 16
    assert estimate_speedup(mask) == pytest.approx(6 * 16 / 21)
    assert mask.density == pytest.approx(21 / 96)
    assert calculate_memory_savings(mask) == pytest.approx(1 - 12 / (6 * 64 * 64))


def test_estimates_reject_non_masks():
    with pytest.raises(TypeError, match="mask must be a SparseMask"):
        estimate_speedup(np.ones((4, 4), dtype=bool))
    with pytest.raises(TypeError, match="mask must be a SparseMask"):
        calculate_memory_savings(None)


def test_mixed_storage():
    dense = d_grid(64, 64) >= 0  # causal: 4 diagonal partial blocks of (16, 16)
    mask = MixedMask.from_dense_mask(dense, (16, 16))
    assert mask.partial_bits.shape == (4, 8)
    assert mask.nbytes == 16 * 1 + 16 * 4 + 4 * 8 * 4
    # a kernel tile of two mask blocks: the diagonal tiles stay partial, the rest full/empty
    assert estimate_speedup(mask, (32, 32)) == pytest.approx(4 / 3)
    assert estimate_speedup(mask, (8, 8)) == pytest.approx(64 / 36)


def test_block_lists_is_frozen():
    lists = CausalMask(64, 64, (16, 16)).block_lists(16, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lists.block_m = 32


# ----------------------------------------------------------------------------- validation


BAD_COMMON = {
    "block_size_zero": (
        lambda: CausalMask(10, 10, (0, 64)),
        ValueError, r"block_size must be a pair of positive ints, got \(0, 64\)"),
    "block_size_triple": (
        lambda: CausalMask(10, 10, (16, 16, 16)),
        TypeError, r"block_size must be a pair of positive ints, got \(16, 16, 16\)"),
    "block_size_float": (
        lambda: CausalMask(10, 10, (16.0, 16)),
        TypeError, r"block_size must be a pair of positive ints, got \(16.0, 16\)"),
    "seqlen_q_zero": (
        lambda: CausalMask(0, 10), ValueError, r"seqlen_q must be a positive int, got 0"),
    "seqlen_k_bool": (
        lambda: CausalMask(10, True), TypeError, r"seqlen_k must be a positive int, got True"),
    "window_zero": (
        lambda: WindowMask(0, 10, 10), ValueError, r"window_size must be a positive int W or "
        r"a pair \(left, right\) of non-negative ints .*got 0"),
    "window_negative_side": (
        lambda: WindowMask((-1, 2), 10, 10), ValueError, r"non-negative ints .*got \(-1, 2\)"),
    "window_string": (
        lambda: WindowMask("4", 10, 10), TypeError, r"window_size must be .*got '4'"),
    "causal_window_zero": (
        lambda: CausalWindowMask(0, 10, 10), ValueError,
        r"window_size must be a positive int, got 0"),
    "kernel_tile_zero": (
        lambda: CausalMask(10, 10).block_lists(0, 64), ValueError,
        r"kernel tile \(block_m, block_n\) must be a pair of positive ints, got \(0, 64\)"),
    "speedup_block_size": (
        lambda: estimate_speedup(CausalMask(10, 10), (64,)), TypeError,
        r"block_size must be a pair of positive ints, got \(64,\)"),
    "bits_list": (
        lambda: BlockBitsetMask([[True]], 10, 10), TypeError,
        r"bits must be a numpy.ndarray, cupy.ndarray or torch.Tensor, got list"),
    "bits_dtype": (
        lambda: BlockBitsetMask(np.ones((1, 1), np.uint8), 10, 10), TypeError,
        r"bits must be a bool array, got dtype uint8"),
    "bits_3d": (
        lambda: BlockBitsetMask(np.ones((1, 1, 1), bool), 10, 10), ValueError,
        r"bits must be 2-D or 4-D"),
    "bits_grid": (
        lambda: BlockBitsetMask(np.ones((3, 5), bool), 40, 60, (16, 16)), ValueError,
        r"bits must have \(nrb, ncb\) = \(3, 4\) trailing dims for seqlen_q=40, "
        r"seqlen_k=60, block_size=\(16, 16\), got \(3, 5\)"),
    "bits_zero_heads": (
        lambda: BlockBitsetMask(np.ones((1, 0, 1, 1), bool), 10, 10), ValueError,
        r"bits must have no zero-sized dimension"),
    "dense_float": (
        lambda: MixedMask.from_dense_mask(np.ones((4, 4))), TypeError,
        r"dense must be a bool array, got dtype float64"),
    "mixed_block_bits": (
        lambda: MixedMask.from_dense_mask(np.ones((4, 4), bool), (3, 5)), ValueError,
        r"block_m\*block_n to be a multiple of 32, got block_size \(3, 5\)"),
    "pattern_grid": (
        lambda: DynamicMask(np.ones((3, 2), bool), 10, 10, (8, 8)), ValueError,
        r"block_pattern must have \(nrb, ncb\) = \(2, 2\) trailing dims .* got \(3, 2\)"),
}


@pytest.mark.parametrize("case", list(BAD_COMMON.values()), ids=list(BAD_COMMON))
def test_bad_arguments(case):
    build, exc, match = case
    with pytest.raises(exc, match=match):
        build()


def _bcsr(row_ptr, col_idx, sq=40, sk=30):
    return lambda: BCSRMask(np.asarray(row_ptr), np.asarray(col_idx), sq, sk, (16, 8))


BAD_BCSR = {
    "float_row_ptr": (
        lambda: BCSRMask(np.zeros(4), np.zeros(0, np.int32), 40, 30, (16, 8)), TypeError,
        r"row_ptr must be an integer array, got dtype float64"),
    "list_col_idx": (
        lambda: BCSRMask(np.zeros(4, np.int32), [], 40, 30, (16, 8)), TypeError,
        r"col_idx must be a numpy.ndarray, cupy.ndarray or torch.Tensor, got list"),
    "ndim_mismatch": (
        _bcsr(np.zeros((1, 1, 4), np.int32), np.zeros(0, np.int32)), ValueError,
        r"must both be 1-D, or both 3-D"),
    "leading_mismatch": (
        _bcsr(np.zeros((1, 2, 4), np.int32), np.zeros((1, 1, 2), np.int32)), ValueError,
        r"share non-zero leading \(B, H\) dims"),
    "row_ptr_length": (
        _bcsr([0, 1, 2], [0, 1]), ValueError,
        r"row_ptr must have nrb \+ 1 = 4 entries per \(b, h\) for seqlen_q=40"),
    "row_ptr_start": (_bcsr([1, 1, 2, 2], [0, 1]), ValueError, r"row_ptr must start at 0"),
    "row_ptr_decreasing": (
        _bcsr([0, 2, 1, 2], [0, 1]), ValueError, r"row_ptr must be non-decreasing"),
    "nnz_past_col_idx": (
        _bcsr([0, 1, 2, 3], [0, 1]), ValueError,
        r"row_ptr\[..., -1\] \(nnz, up to 3\) must be <= col_idx.shape\[-1\] = 2"),
    "col_out_of_range": (
        _bcsr([0, 1, 1, 1], [4]), ValueError, r"col_idx values must lie in \[0, 4\)"),
    "col_not_ascending": (
        _bcsr([0, 2, 2, 2], [2, 1]), ValueError, r"strictly ascending within each block row"),
    "col_repeated": (
        _bcsr([0, 2, 2, 2], [1, 1]), ValueError, r"strictly ascending within each block row"),
}


@pytest.mark.parametrize("case", list(BAD_BCSR.values()), ids=list(BAD_BCSR))
def test_bad_bcsr(case):
    build, exc, match = case
    with pytest.raises(exc, match=match):
        build()


def test_bcsr_accepts_descending_across_rows():
    mask = _bcsr([0, 1, 2, 2], [3, 0])()
    bits = np.zeros((1, 1, 3, 4), dtype=bool)
    bits[0, 0, 0, 3] = bits[0, 0, 1, 0] = True
    np.testing.assert_array_equal(mask.to_dense(), expand_blocks(bits, 40, 30, 16, 8)[0, 0])


def _mixed_parts():
    dense = d_grid(32, 32) >= 0  # (16, 16) blocks: partial diagonal, full below, empty above
    m = MixedMask.from_dense_mask(dense, (16, 16))
    return m.block_class.copy(), m.partial_slot.copy(), m.partial_bits.copy()


def _with(parts, index, edit):
    parts = list(parts)
    parts[index] = edit(parts[index].copy())
    return lambda: MixedMask(*parts, 32, 32, (16, 16))


def _set(a, where, value):
    a[where] = value
    return a


BAD_MIXED = {
    "class_value": (_with(_mixed_parts(), 0, lambda a: _set(a, (0, 1), 3)), ValueError,
                    r"block_class values must be 0 \(empty\), 1 \(partial\) or 2 \(full\)"),
    "slot_order": (_with(_mixed_parts(), 1, lambda a: a[::-1, ::-1]), ValueError,
                   r"partial_slot must number the partial blocks 0, 1, ... in row-major"),
    "slot_on_full": (_with(_mixed_parts(), 1, lambda a: _set(a, (1, 0), 0)), ValueError,
                     r"partial_slot must number"),
    "bits_shape": (_with(_mixed_parts(), 2, lambda a: a[:1]), ValueError,
                   r"partial_bits must have shape \(2, 8\), got \(1, 8\)"),
    "bits_dtype": (_with(_mixed_parts(), 2, lambda a: a.astype(np.int32)), TypeError,
                   r"partial_bits must be uint32, got dtype int32"),
    "bits_empty_block": (_with(_mixed_parts(), 2, lambda a: _set(a, 0, 0)), ValueError,
                         r"some but not all in-range elements"),
    "bits_full_block": (_with(_mixed_parts(), 2, lambda a: _set(a, 0, 0xFFFFFFFF)),
                        ValueError, r"some but not all in-range elements"),
    "class_grid": (_with(_mixed_parts(), 0, lambda a: a[:1]), ValueError,
                   r"block_class must have \(nrb, ncb\) = \(2, 2\) trailing dims"),
}


@pytest.mark.parametrize("case", list(BAD_MIXED.values()), ids=list(BAD_MIXED))
def test_bad_mixed(case):
    build, exc, match = case
    with pytest.raises(exc, match=match):
        build()


def test_mixed_rejects_bits_outside_the_sequence():
    dense = np.zeros((20, 20), dtype=bool)
    dense[17, 3] = True  # block (1, 0) keeps one in-range element of 4 * 16
    parts = list(_parts_of(MixedMask.from_dense_mask(dense, (16, 16))))
    MixedMask(*parts, 20, 20, (16, 16))  # valid as built
    k = 5 * 16 + 3  # row 5 of block row 1 is row 21 >= seqlen_q
    parts[2][0, k // 32] |= np.uint32(1 << (k % 32))
    with pytest.raises(ValueError, match="no out-of-range one"):
        MixedMask(*parts, 20, 20, (16, 16))


def _parts_of(m: MixedMask):
    return m.block_class.copy(), m.partial_slot.copy(), m.partial_bits.copy()


# ----------------------------------------------------------------------------- import


def test_module_imports_without_cupy():
    path = Path(__file__).resolve().parents[2] / "dmattn_cupy" / "masks.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['m'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "mod.MixedMask.from_dense_mask(__import__('numpy').eye(64, dtype=bool), (16, 16))\n"
        "assert 'cupy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
