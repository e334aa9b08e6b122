"""How sparse masks reach the kernel: parametric ones as a window, block ones as lists."""

from __future__ import annotations

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy.reference import allowed_positions
from dmattn_cupy.sparse_plan import (
    check_block_fits,
    diagonal_window,
    host_arrays,
    sparse_fields,
    split_sparse,
)
from dmattn_cupy.spec import KernelSpec

SIZES = [(64, 64), (50, 130), (130, 50), (1, 7)]


def _masks(sq: int, sk: int) -> dict[str, dm.SparseMask]:
    return {
        "causal": dm.CausalMask(sq, sk),
        "window_int": dm.WindowMask(9, sq, sk),
        "window_pair": dm.WindowMask((12, 3), sq, sk),
        "causal_window": dm.CausalWindowMask(17, sq, sk),
        "causal&window": dm.CausalMask(sq, sk) & dm.WindowMask((5, 20), sq, sk),
    }


@pytest.mark.parametrize("sq,sk", SIZES, ids=[f"{a}x{b}" for a, b in SIZES])
@pytest.mark.parametrize("name", list(_masks(8, 8)))
def test_window_equals_to_dense(sq: int, sk: int, name: str) -> None:
    mask = _masks(sq, sk)[name]
    win = diagonal_window(mask)
    assert win is not None
    np.testing.assert_array_equal(allowed_positions(sq, sk, win), mask.to_dense())


def test_block_masks_have_no_window_form() -> None:
    dense = np.random.default_rng(0).random((64, 64)) > 0.5
    assert diagonal_window(dm.BlockBitsetMask.from_dense_mask(dense, block_size=(16, 16))) is None
    assert diagonal_window(dm.CausalMask(64, 64) & dm.MixedMask.from_dense_mask(
        dense, block_size=(16, 16))) is None


def _dense(sq: int, sk: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((sq, sk)) > 0.97


def test_split_sparse_separates_window_and_block_mask() -> None:
    block = dm.BlockBitsetMask.from_dense_mask(_dense(300, 260), block_size=(128, 128))
    win, rest = split_sparse(dm.CausalMask(300, 260) & block)
    assert win == (-1, 0) and rest is block
    win, rest = split_sparse(block & dm.WindowMask((7, 3), 300, 260))
    assert win == (7, 3) and rest is block
    win, rest = split_sparse(dm.CausalWindowMask(9, 300, 260))
    assert win == (8, 0) and rest is None


def test_split_sparse_merges_two_block_masks() -> None:
    a = dm.BlockBitsetMask.from_dense_mask(_dense(256, 256, 1))
    b = dm.MixedMask.from_dense_mask(_dense(256, 256, 2), block_size=(64, 128))
    both = dm.CausalMask(256, 256) & (a & b)
    win, block = split_sparse(both)
    assert win == (-1, 0) and isinstance(block, dm.MixedMask)
    assert block.block_size == (128, 128)
    np.testing.assert_array_equal(block.to_dense(), a.to_dense() & b.to_dense())
    assert split_sparse(both)[1] is block  # built once per intersection


def test_split_sparse_refuses_a_dynamic_mask_with_another_block_mask() -> None:
    a = dm.BlockBitsetMask.from_dense_mask(_dense(256, 256, 1))
    d = dm.DynamicMask(np.eye(2, dtype=bool), 256, 256)
    with pytest.raises(NotImplementedError, match="DynamicMask.*parametric masks only"):
        split_sparse(a & d)
    assert split_sparse(d & dm.CausalMask(256, 256)) == ((-1, 0), d)


@pytest.mark.parametrize("block,ok", [((128, 128), True), ((64, 64), True), ((64, 32), False),
                                      ((32, 64), False)], ids=str)
def test_block_size_must_be_a_multiple_of_the_kernel_tile(block, ok) -> None:
    mask = dm.BlockBitsetMask.from_dense_mask(_dense(256, 256), block_size=block)
    spec = KernelSpec(family="fwd_mma", head_dim=128, block_m=64, block_n=64, sparse=True)
    if ok:
        check_block_fits(mask.block_size, spec)
    else:
        with pytest.raises(ValueError, match=r"multiple of the kernel tile \(64, 64\)"):
            check_block_fits(mask.block_size, spec)


@pytest.mark.parametrize("kind", ["bitset", "bcsr", "mixed", "dynamic"])
def test_host_arrays_describe_the_lists(kind: str) -> None:
    dense = _dense(300, 200, 3)
    dense[:64, :64] = True  # one full block
    make = {
        "bitset": lambda: dm.BlockBitsetMask.from_dense_mask(dense, block_size=(64, 64)),
        "bcsr": lambda: dm.BCSRMask.from_dense_mask(dense, block_size=(64, 64)),
        "mixed": lambda: dm.MixedMask.from_dense_mask(dense, block_size=(64, 64)),
        "dynamic": lambda: dm.DynamicMask(
            dm.BlockBitsetMask.from_dense_mask(dense, block_size=(64, 64)).block_map() > 0,
            300, 200, block_size=(64, 64)),
    }[kind]
    mask = make()
    arrs = host_arrays(mask)
    fields = sparse_fields(arrs)
    assert (fields["sp_block_m"], fields["sp_block_n"]) == (64, 64)
    assert (fields["sp_batches"], fields["sp_heads"], fields["sp_row_blocks"]) == (1, 1, 5)
    assert fields["sp_full_width"] == arrs.full_idx.shape[-1]
    # Every listed block is kept somewhere in the mask's own dense form, and vice versa.
    dn = mask.to_dense()
    listed = np.zeros((5, 4), dtype=bool)
    for r in range(5):
        for idx, cnt in ((arrs.full_idx, arrs.full_count), (arrs.partial_idx, arrs.partial_count)):
            listed[r, np.asarray(idx)[0, 0, r, :int(np.asarray(cnt)[0, 0, r])]] = True
    kept = np.array([[dn[64 * r:64 * r + 64, 64 * c:64 * c + 64].any() for c in range(4)]
                     for r in range(5)])
    np.testing.assert_array_equal(listed, kept)
    assert (arrs.partial_slot is not None) == (kind == "mixed")
