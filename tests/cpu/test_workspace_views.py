"""The backward's one-allocation workspace: ``arrays.flat_view`` gives the same values, shape
and contiguity as a separate array of that shape would (NumPy takes the branch CuPy takes;
torch its own)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dmattn_cupy import arrays

SHAPES = [(1, 128, 1, 64), (2, 40, 4, 64), (3, 1, 5, 7), (0, 4, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_flat_view(shape):
    n = math.prod(shape)
    ws = np.arange(n + 77, dtype=np.float32) * 0.37
    want = ws[:n].reshape(shape).copy()
    view = arrays.flat_view(ws, shape)
    assert view.shape == shape and view.flags.c_contiguous
    assert n == 0 or np.shares_memory(view, ws)
    np.testing.assert_array_equal(view, want)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_flat_view_matches_a_separate_buffer(shape):
    torch = pytest.importorskip("torch")
    n = math.prod(shape)
    ws = torch.randn(n + 77, dtype=torch.float32)
    sep = ws[:n].clone().reshape(shape)          # what a separate dq_accum would hold
    view = arrays.flat_view(ws, shape)
    assert tuple(view.shape) == shape and view.is_contiguous()
    assert view.stride() == sep.stride()
    assert n == 0 or view.data_ptr() == ws.data_ptr()
    assert torch.equal(view, sep)
