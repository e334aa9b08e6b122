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


def test_the_dense_fallback_of_an_immutable_mask_is_uploaded_once(monkeypatch):
    """``dense_block_mask``: an immutable mask's device form is made once per (library, device)
    and kept on the mask, ANDed with attn_mask per call; a DynamicMask's is made per call (its
    buffers change in place); a form past DENSE_CACHE_BYTES is made per call too."""
    import numpy as np

    like = torch.empty(1)
    bits = np.array([[True, False], [True, True]])
    uploads = []
    real = sparse_plan.arrays.upload

    def counted(*a):
        uploads.append(a[0].shape)
        return real(*a)

    monkeypatch.setattr(sparse_plan.arrays, "upload", counted)
    m = dm.BlockBitsetMask(bits, 200, 256, block_size=(128, 128))
    want = torch.from_numpy(np.array(m.to_dense(), dtype=bool))[None, None]
    first = sparse_plan.dense_block_mask(m, None, like)
    assert sparse_plan.dense_block_mask(m, None, like) is first and len(uploads) == 1
    attn = torch.rand(2, 3, 200, 256) > 0.5
    assert torch.equal(sparse_plan.dense_block_mask(m, attn, like), want & attn)
    assert len(uploads) == 1 and torch.equal(first, want)
    dyn = dm.DynamicMask(bits, 200, 256, block_size=(128, 128))
    sparse_plan.dense_block_mask(dyn, None, like)
    dyn.update(~bits)
    again = sparse_plan.dense_block_mask(dyn, None, like)
    assert len(uploads) == 3
    assert torch.equal(again, torch.from_numpy(np.array(dyn.to_dense(), dtype=bool))[None, None])
    monkeypatch.setattr(sparse_plan, "DENSE_CACHE_BYTES", 1000)
    big = dm.BlockBitsetMask(bits, 200, 256, block_size=(128, 128))
    sparse_plan.dense_block_mask(big, None, like)
    sparse_plan.dense_block_mask(big, None, like)
    assert len(uploads) == 5
