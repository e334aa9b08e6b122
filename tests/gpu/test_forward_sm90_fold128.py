"""DM_SM90_MB_FOLD128 (an A/B build: DMATTN_NVRTC_DEFINES; kernels and plans are cached per
define): a full bool mask beside a full bias tile at head dim <= 128 on the bias spec's 128-key
tiles, the mask folded into the bias tile in place by the producer warpgroup's warps 1-3 from
global memory. Against the float64 reference with FlashAttention's rule: tile edges (Sq, Sk not
multiples of 128, Sk a multiple of 16), broadcast and GQA mask heads, causal and window, a
softcap, both dtypes; the non-finite cases of test_forward_sm90_mask_bias_values under the
define (a NaN or infinite score at a masked key is dropped, fully masked rows give out 0 and lse
-inf); and the calls the build cannot fold go to the portable family."""

from __future__ import annotations

import numpy as np
import pytest
import test_forward_sm90_mask_bias_values as values
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy.forward import select_fwd_spec
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]


@pytest.fixture(autouse=True)
def fold128(monkeypatch):
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_MB_FOLD128=1")
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "0")   # the mask's bytes, not packed lists


def _spec(q, k, v, mask, bias, **kw):
    pb = check_dense(q, k, v, mask, bias, None, kw.get("is_causal", False),
                     kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), "cuda")
    return select_fwd_spec(pb)


CASES = {   # (B, Sq, Sk, H, Hk, mask heads, options)
    "edges": (2, 200, 320, 2, 2, 2, {}),
    "sk_tail16": (1, 130, 208, 2, 2, 2, {}),
    "one_tile": (1, 64, 48, 2, 2, 2, {}),
    "broadcast_head": (2, 256, 384, 4, 4, 1, {}),
    "gqa_mask_heads": (1, 256, 256, 8, 2, 2, {}),
    "causal": (1, 300, 400, 2, 2, 2, {"is_causal": True}),
    "window": (1, 256, 512, 2, 2, 2, {"window_size": (100, 30)}),
    "softcap": (1, 256, 256, 2, 2, 2, {"softcap": 20.0}),
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_fold128_against_the_reference(case, d, dtype):
    b, sq, sk, h, hk, mh, kw = CASES[case]
    g = torch.Generator().manual_seed(sq + sk + d)
    dt = getattr(torch, dtype)
    q = torch.randn(b, sq, h, d, generator=g).to("cuda", dt)
    k, v = (torch.randn(b, sk, hk, d, generator=g).to("cuda", dt) for _ in range(2))
    mask = (torch.rand(b, mh, sq, sk, generator=g) > 0.3).cuda()
    mask[:, :, 3] = False                                   # a fully masked row
    bias = torch.randn(b, h, sq, sk, generator=g).to("cuda", dt)
    spec = _spec(q, k, v, mask, bias, **kw)
    assert (spec.family, spec.block_n, spec.has_mask, spec.has_bias) == \
        ("fwd_sm90", 128, True, True)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True,
                                    **kw)
    torch.cuda.synchronize()
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0
    scale = 1.0 / np.sqrt(d)
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias),
                                   scale=scale, window=tuple(window),
                                   softcap=kw.get("softcap", 0.0)), dtype)
    assert np.all(f64(out)[:, 3] == 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["nocap", "softcap"])
def test_fold128_non_finite_values(dtype, d, softcap):
    """test_forward_sm90_mask_bias_values' case (NaN keys and NaN/inf biases at masked keys, a
    NaN bias at a kept key, fully masked rows) on the fold-128 build."""
    q, k, v, mask, bias = values._case(dtype, d, False, seed=d + int(softcap))
    qc, kc, vc, mc, bc = (x.cuda() for x in (q, k, v, mask, bias))
    spec = _spec(qc, kc, vc, mc, bc, softcap=softcap)
    assert (spec.family, spec.block_n) == ("fwd_sm90", 128)
    out, lse = dm.flash_dmattn_func(qc, kc, vc, attn_mask=mc, attn_bias=bc, softcap=softcap,
                                    return_lse=True)
    torch.cuda.synchronize()
    ref, ref_lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias,
                                        softcap=softcap, return_lse=True, backend="reference")
    o, r = f64(out), f64(ref)
    nan_got, nan_ref = np.isnan(o).any(axis=-1), np.isnan(r).any(axis=-1)
    np.testing.assert_array_equal(nan_got, nan_ref)
    assert nan_ref.sum() == 11
    fine = ~nan_ref
    assert np.isfinite(o[fine]).all()
    tol = 2e-2 if dtype == "float16" else 5e-2
    assert np.abs(o[fine] - r[fine]).max() < tol
    assert np.all(o[:, 5] == 0) and np.all(np.isneginf(f64(lse)[:, :, 5]))


def test_fold128_declines_what_it_cannot_fold():
    """A mask key row, a mask whose rows are not 16-byte aligned and an Sk that is not a
    multiple of 16 go to the portable family under the build (and still compute right)."""
    g = torch.Generator().manual_seed(1)
    dt = torch.bfloat16
    for sk, mask_shape in ((320, (1, 2, 1, 320)), (328, (1, 2, 64, 328)), (330, (1, 2, 64, 330))):
        q = torch.randn(1, 64, 2, 64, generator=g).to("cuda", dt)
        k, v = (torch.randn(1, sk, 2, 64, generator=g).to("cuda", dt) for _ in range(2))
        mask = (torch.rand(*mask_shape, generator=g) > 0.3).cuda()
        bias = torch.randn(1, 2, 64, sk, generator=g).to("cuda", dt)
        assert _spec(q, k, v, mask, bias).family != "fwd_sm90" or \
            _spec(q, k, v, mask, bias).block_n != 128
        out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias,
                                        return_lse=True)
        torch.cuda.synchronize()
        assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask),
                                       bias=f64(bias), scale=1.0 / 8.0, window=(-1, -1),
                                       softcap=0.0), "bfloat16")
