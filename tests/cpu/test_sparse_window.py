"""Parametric sparse masks fold into the kernel's (left, right) window exactly."""

from __future__ import annotations

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy.api import diagonal_window
from dmattn_cupy.reference import allowed_positions

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
