"""The Hopper forward with a full bool mask and a full bias tile (the mask + bias specs, 64-key
tiles) against the float64 reference where values are not finite: NaN, +inf and -inf biases and
NaN keys at masked positions change nothing, a NaN at a kept position makes its row NaN, a -inf
bias at a kept key drops it, fully masked rows give out 0 and lse -inf; with and without a
softcap; tiles whose mask is all true beside partial ones. Written for DM_SM90_MB_FOLD (the
default: the mask folded into the bias tile by the producer's warps), whose NaN rule must equal
the mask path's; run it with DM_SM90_MB_FOLD=0 too. Each attn_mask route: the mask packed
into block lists (128-key bias spec, partial blocks by their bits), its bytes by tiles, and its
bytes packed by the 128-key bias spec's own warps (DMATTN_MASK_ROUTE=warps)."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import f64

import dmattn_cupy as dm
from dmattn_cupy.forward import select_fwd_spec
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only", "each_mask_route")]


B, H, SQ, SK = 2, 2, 200, 320   # 2 query tiles (the second partial), 5 key tiles of 64


def _case(dtype: str, d: int, full_tiles: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(B, SQ if i == 0 else SK, H, d, generator=g).to(dt) for i in range(3))
    mask = torch.rand(B, H, SQ, SK, generator=g) > 0.4
    if full_tiles:  # key tiles 0, 1, 3, 4 all true, only tile 2 (keys 128..191) partial
        mask[..., :128] = True
        mask[..., 192:] = True
    bias = torch.randn(B, H, SQ, SK, generator=g).to(dt)
    mask[:, :, 5] = False                    # fully masked row
    mask[:, :, :, 150] = False               # key 150 masked for every row but 10..19
    mask[:, :, 10:20, 150] = True
    k[1, 150, 0, 7] = float("nan")           # NaN key: NaN rows 10..19 of batch 1, head 0
    masked = ~mask
    pick = torch.randint(0, 4, (B, H, SQ, SK), generator=g)
    poison = torch.tensor([float("nan"), float("inf"), float("-inf"), 3e4]).to(dt)[pick]
    bias = torch.where(masked, poison, bias)  # anything at a masked position is dropped
    keep_neg = mask & (torch.rand(B, H, SQ, SK, generator=g) < 0.05)
    bias = torch.where(keep_neg, torch.tensor(float("-inf"), dtype=dt), bias)  # kept -inf
    mask[0, 1, 30, 40] = True
    bias[0, 1, 30, 40] = float("nan")         # NaN bias at a kept key: row 30 of (0, 1) NaN
    return q, k, v, mask, bias


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["nocap", "softcap"])
@pytest.mark.parametrize("full_tiles", [False, True], ids=["partial", "full_tiles"])
def test_non_finite_values_follow_the_reference(dtype, d, softcap, full_tiles):
    q, k, v, mask, bias = _case(dtype, d, full_tiles, seed=d + int(softcap) + 2 * full_tiles)
    qc, kc, vc, mc, bc = (x.cuda() for x in (q, k, v, mask, bias))
    pb = check_dense(qc, kc, vc, mc, bc, None, False, (-1, -1), softcap, "cuda")
    assert select_fwd_spec(pb).family == "fwd_sm90"
    out, lse = dm.flash_dmattn_func(qc, kc, vc, attn_mask=mc, attn_bias=bc, softcap=softcap,
                                    return_lse=True)
    torch.cuda.synchronize()
    ref, ref_lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias,
                                        softcap=softcap, return_lse=True, backend="reference")
    o, r = f64(out), f64(ref)                 # (B, SQ, H, D)
    nan_got, nan_ref = np.isnan(o).any(axis=-1), np.isnan(r).any(axis=-1)
    np.testing.assert_array_equal(nan_got, nan_ref)          # the same rows are NaN
    assert nan_ref[1, 10:20, 0].all() and nan_ref[0, 30, 1] and nan_ref.sum() == 11
    np.testing.assert_array_equal(np.isnan(f64(lse)), np.isnan(f64(ref_lse)))
    fine = ~nan_ref
    assert np.isfinite(o[fine]).all()
    tol = 2e-2 if dtype == "float16" else 5e-2
    assert np.abs(o[fine] - r[fine]).max() < tol
    assert np.all(o[:, 5] == 0) and np.all(np.isneginf(f64(lse)[:, :, 5]))
    lf, lr = f64(lse), f64(ref_lse)
    ok = np.isfinite(lr)
    np.testing.assert_array_equal(np.isfinite(lf), ok)
    assert np.abs(lf[ok] - lr[ok]).max() < 2e-2
