"""A full (B, H, Sq, Sk) bool mask prepared once as a MixedMask (``from_dense_mask``, on the GPU)
beside a full bias: the mask travels as block lists whose partial blocks carry element bits
(fwd_sm90's 128-key bias spec on compute capability 9.0, class bit kListedPartial). Against the
float64 reference with the same mask given as ``attn_mask``; the CuPy-built mask equals the
NumPy-built one word for word."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64
from test_kvcache import record_launch_families

import dmattn_cupy as dm

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("both_forward_families")]

B, H, HK = 2, 4, 2
BLOCK = (128, 128)


def _dense(sq: int, sk: int, seed: int) -> np.ndarray:
    """(B, H, Sq, Sk): 90% of elements kept at random, with a block kept whole, a block dropped
    whole, a fully masked query row and a key column dropped for every row of head (0, 0)."""
    rng = np.random.default_rng(seed)
    d = rng.random((B, H, sq, sk)) < 0.9
    d[0, 1, :128, :128] = True
    d[1, 2, 128:256, :128] = False
    d[0, 0, 5] = False
    d[0, 0, :, min(7, sk - 1)] = False
    return d


@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", [(512, 512), (333, 700), (700, 333)])
def test_mixed_mask_with_full_bias(sq, sk, causal, head_dim, monkeypatch):
    g = torch.Generator().manual_seed(sq + 7 * sk + head_dim)
    q = torch.randn(B, sq, H, head_dim, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(B, sk, HK, head_dim, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(B, sk, HK, head_dim, generator=g).to("cuda", torch.bfloat16)
    bias = (2 * torch.randn(B, H, sq, sk, generator=g)).to("cuda", torch.bfloat16)
    dense = _dense(sq, sk, seed=sq + sk)
    mixed = dm.MixedMask.from_dense_mask(cupy.asarray(dense), BLOCK)
    host = dm.MixedMask.from_dense_mask(dense, BLOCK)
    for name in ("block_class", "partial_slot", "partial_bits"):
        np.testing.assert_array_equal(cupy.asnumpy(getattr(mixed, name)), getattr(host, name))
    assert (mixed.block_class == 1).any() and (mixed.block_class == 0).any()
    families = record_launch_families(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=causal,
                                    sparse_mask=mixed, return_lse=True)
    torch.cuda.synchronize()
    if torch.cuda.get_device_capability() == (9, 0):  # 128x128 blocks: the Hopper family's
        want = "fwd_mma" if os.environ.get("DMATTN_FWD_FAMILY") == "fwd_mma" else "fwd_sm90"
        other = {"fwd_sm90", "fwd_mma"} - {want}
        assert want in families and not other & set(families), families
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=dense, bias=f64(bias),
                                   scale=head_dim ** -0.5,
                                   window=(-1, 0) if causal else (-1, -1)), "bfloat16")


@pytest.mark.parametrize("block,with_mask", [
    ((256, 256), False), ((128, 384), False), ((384, 128), False),
    ((128, 64), True), ((256, 192), True), ((128, 128), True)],
    ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else ("attn_mask" if x else "bias"))
def test_block_sizes_and_tiles(block, with_mask, monkeypatch):
    """Blocks of several tiles' rows and keys, read by 128-key tiles (the bias spec) and by
    64-key tiles (with an attn_mask beside: the mask spec); Sq, Sk not multiples of the
    blocks."""
    sq, sk, head_dim = 700, 833, 128
    g = torch.Generator().manual_seed(block[0] + block[1] + with_mask)
    q = torch.randn(B, sq, H, head_dim, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(B, sk, HK, head_dim, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(B, sk, HK, head_dim, generator=g).to("cuda", torch.bfloat16)
    bias = (2 * torch.randn(B, H, sq, sk, generator=g)).to("cuda", torch.bfloat16)
    dense = _dense(sq, sk, seed=block[0] * block[1])
    mixed = dm.MixedMask.from_dense_mask(cupy.asarray(dense), block)
    assert (mixed.block_class == 1).any()
    attn = np.random.default_rng(5).random((B, 1, sq, sk)) < 0.95 if with_mask else None
    families = record_launch_families(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, sparse_mask=mixed, return_lse=True,
                                    attn_mask=None if attn is None else
                                    torch.from_numpy(attn).cuda())
    torch.cuda.synchronize()
    if torch.cuda.get_device_capability() == (9, 0):
        want = "fwd_mma" if os.environ.get("DMATTN_FWD_FAMILY") == "fwd_mma" else "fwd_sm90"
        assert want in families, families
    keep = dense if attn is None else dense & attn
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=keep, bias=f64(bias),
                                   scale=head_dim ** -0.5, window=(-1, -1)), "bfloat16")


@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block", [(64, 128), (128, 256)], ids=["64x128", "128x256"])
@pytest.mark.parametrize("sq,sk", [(256, 384), (333, 700)])
def test_mixed_mask_backward_with_bias_gradient(sq, sk, block, causal, head_dim,
                                                both_backward_families):
    """The gradients (dq, dk, dv, dbias) of a prepared MixedMask beside a full bias against the
    float64 reference, on both backward families (bwd_sm90: the listed-bits specs, whose mask
    warps read the blocks' bits); the fixture asserts the family that ran."""
    from test_backward import _qkv, _run_dense

    q, k, v = _qkv(B, sq, sk, H, HK, head_dim, "bfloat16", seed=sq + block[0] + head_dim)
    bias = (2 * torch.randn(B, H, sq, sk, generator=torch.Generator().manual_seed(sk))).to(
        "cuda", torch.bfloat16)
    dense = _dense(sq, sk, seed=sq * sk + block[1])
    mixed = dm.MixedMask.from_dense_mask(dense, block)
    assert (mixed.block_class == 1).any()
    _run_dense(q, k, v, bias=bias, seed=sq + 3, sparse_mask=mixed, is_causal=causal)
