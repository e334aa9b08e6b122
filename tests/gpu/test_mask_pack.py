"""The mask packing kernel (cuda_src/mask_pack.cu) on the GPU: MixedMask.from_dense_mask with
DMATTN_MASK_PACK=1 (the kernel) gives the same block classes, slots and element bits, bit for
bit, as with the array operations, for 16-byte, 4-byte and byte loads, blocks cut by the
sequence ends, broadcast and strided views and torch tensors; the kernel ran each time; and
the result expands back to the input."""

from __future__ import annotations

import numpy as np
import pytest

from dmattn_cupy import mask_pack, runtime
from dmattn_cupy.masks import MixedMask

cupy = pytest.importorskip("cupy")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


def _dense(shape, seed, keep=0.6):
    g = np.random.default_rng(seed)
    d = g.random(shape) < keep
    d[..., : min(5, shape[-2]), :] = True           # full blocks
    d[..., 5:9, :] = False
    if shape[-1] > 300:                              # an all-false column band (empty blocks)
        d[..., 160:290] = False
    return d


def _views(name):
    """(a GPU bool array or torch tensor, the same as NumPy, block size): the layouts the kernel
    packs."""
    if name == "4d_edges":                 # 4-byte loads; blocks cut by Sq and Sk
        d = _dense((2, 3, 300, 520), 1)
        return cupy.asarray(d), d, (128, 128)
    if name == "4d_edges16":               # 16-byte loads; blocks cut by Sq and Sk (16 keys)
        d = _dense((2, 3, 300, 528), 9)
        return cupy.asarray(d), d, (128, 128)
    if name == "2d_partial_group16":       # 16-byte loads but a row's last group of 6 keys
        d = _dense((257, 400), 8)          # (rows 400 bytes apart, 390 keys), 50-row blocks
        return cupy.asarray(d)[:, :390], d[:, :390], (50, 128)
    if name == "2d_partial_group":         # 4-byte loads but a row's last group of 3 keys
        d = _dense((257, 388), 2)          # (rows 388 bytes apart, 387 keys)
        return cupy.asarray(d)[:, :387], d[:, :387], (64, 128)
    if name == "wide_blocks":              # two 128-key chunks per block row
        d = _dense((1, 2, 200, 700), 3)
        return cupy.asarray(d), d, (128, 256)
    if name == "narrow_blocks":            # byte loads: 32-key blocks
        d = _dense((1, 1, 150, 200), 4)
        return cupy.asarray(d), d, (64, 32)
    if name == "key_strided":              # byte loads: a transposed view (key stride != 1)
        d = _dense((1, 1, 333, 260), 5)
        t = cupy.ascontiguousarray(cupy.asarray(d).transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
        return t, d, (128, 128)
    if name == "misaligned_rows":          # byte loads: rows 517 bytes apart
        d = _dense((1, 1, 140, 517), 6)
        return cupy.asarray(d), d, (128, 128)
    if name == "head_broadcast":           # an expanded head dim (stride 0)
        d1 = _dense((2, 1, 260, 384), 7)
        d = np.broadcast_to(d1, (2, 4, 260, 384))
        return cupy.broadcast_to(cupy.asarray(d1), (2, 4, 260, 384)), d, (128, 128)
    if name == "torch_doc":                # a torch (B, 1, S, S) document mask
        ids = np.repeat(np.arange(5), 103)[:512]
        d = (ids[:, None] == ids[None, :])[None, None].repeat(2, axis=0)
        return torch.from_numpy(d).cuda(), d, (128, 128)
    raise ValueError(name)


NAMES = ["4d_edges", "4d_edges16", "2d_partial_group", "2d_partial_group16", "wide_blocks",
         "narrow_blocks", "key_strided", "misaligned_rows", "head_broadcast", "torch_doc"]


@pytest.mark.parametrize("name", NAMES)
def test_kernel_packs_like_the_array_operations(name, monkeypatch):
    dev, host, block = _views(name)
    monkeypatch.setenv("DMATTN_MASK_PACK", "0")
    ref = MixedMask.from_dense_mask(dev, block)
    launches = []
    get_kernel = runtime.get_kernel
    monkeypatch.setattr(runtime, "get_kernel",
                        lambda spec, d: launches.append(spec.family) or get_kernel(spec, d))
    monkeypatch.setenv("DMATTN_MASK_PACK", "1")
    got = MixedMask.from_dense_mask(dev, block)
    assert launches == ["mask_pack"]
    for field in ("block_class", "partial_slot", "partial_bits"):
        np.testing.assert_array_equal(cupy.asnumpy(getattr(got, field)),
                                      cupy.asnumpy(getattr(ref, field)), err_msg=field)
    np.testing.assert_array_equal(cupy.asnumpy(got.to_dense()).reshape(host.shape), host)


def test_vectorized_and_byte_paths_were_both_taken():
    """The cases above cover the three load paths (mask_pack.vectorized)."""
    taken = set()
    for name in NAMES:
        dev, _, (bm, bn) = _views(name)
        a = cupy.asarray(dev) if not isinstance(dev, cupy.ndarray) else dev
        a4 = a.reshape((1, 1) + a.shape) if a.ndim == 2 else a
        taken.add(mask_pack.vectorized(int(a4.data.ptr), tuple(a4.strides), bn))
    assert taken == {0, 1, 2}
    for name, vec, group in (("2d_partial_group", 1, 4), ("2d_partial_group16", 2, 16)):
        dev, _, _ = _views(name)                # the vectorized paths' byte-by-byte tails
        assert mask_pack.vectorized(int(dev.data.ptr), (0, 0, *dev.strides), 128) == vec
        assert dev.shape[-1] % group
