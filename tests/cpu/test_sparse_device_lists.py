"""sparse_plan.device_lists's buffer check: the lists it hands to a launch must be contiguous
arrays of the kernel's dtype, except an empty one (a MixedMask without partial blocks: CuPy's
boolean indexing can give its (0, words) bits zero strides), which no kernel reads."""

from __future__ import annotations

import pytest

import dmattn_cupy as dm
from dmattn_cupy import sparse_plan

torch = pytest.importorskip("torch")


def test_an_empty_buffer_with_zero_strides_is_accepted():
    empty = torch.empty(0, 512, dtype=torch.uint32).as_strided((0, 512), (0, 0))
    assert sparse_plan._device_array(empty, empty, "uint32") is empty


@pytest.mark.parametrize("bad", ["strided", "dtype"])
def test_other_buffers_must_be_contiguous_and_of_the_kernel_dtype(bad):
    words = torch.zeros(4, 512, dtype=torch.uint32)
    arr = words[:, ::2] if bad == "strided" else words.view(torch.int32)
    with pytest.raises(ValueError, match="contiguous uint32"):
        sparse_plan._device_array(arr, words, "uint32")


@pytest.mark.parametrize("fill", [True, False], ids=["all_kept", "none_kept"])
def test_a_mixed_mask_without_partial_blocks_has_device_lists(fill):
    dense = torch.full((1, 1, 256, 384), fill)
    mask = dm.MixedMask.from_dense_mask(dense, block_size=(128, 128))
    arrs = sparse_plan.device_lists(mask, torch.empty(1))
    assert arrs.partial_bits.shape[0] == 0 and int(arrs.partial_count.sum()) == 0
    assert int(arrs.full_count.sum()) == (6 if fill else 0)
