"""fwd_sm90's ``_lfold`` specs (DM_SM90_LIST_FOLD, the default): block lists beside a full bias
tile, the lists' element bits folded into the bias tiles by the producer's spare warps. Against
the float64 reference, bit for bit against the unfolded bias spec (``DM_SM90_LIST_FOLD=0``: the
consumers exclude the listed bits themselves; -inf either way), and where values are not
finite: a NaN key or a NaN/inf bias at a masked position changes nothing (the consumers' NaN
path re-reads the row's bits), a NaN at a kept one makes its row NaN."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy import fastpath, runtime

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]

B, H, HK = 2, 4, 2


def _launched_ids(monkeypatch) -> list[str]:
    """The spec id of every forward kernel launched from now on."""
    seen: list[str] = []
    real = runtime.launch

    def spy(kernel, *a, **kw):
        seen.append(kernel.spec.id)
        return real(kernel, *a, **kw)

    monkeypatch.setattr(runtime, "launch", spy)
    return seen


def _dense(sq: int, sk: int, seed: int) -> np.ndarray:
    """90% kept at random, one 128 x 128 block whole, one empty, a fully masked row."""
    rng = np.random.default_rng(seed)
    d = rng.random((B, H, sq, sk)) < 0.9
    d[0, 1, :128, :128] = True
    d[1, 2, 128:256, :128] = False
    d[0, 0, 5] = False
    return d


def _run(q, k, v, bias, mixed, causal, monkeypatch, fold: bool):
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", f"DM_SM90_LIST_FOLD={int(fold)}")
    fastpath.clear()  # a cached plan would keep the other define's spec
    ids = _launched_ids(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=causal,
                                    sparse_mask=mixed, return_lse=True)
    torch.cuda.synchronize()
    fwd = [i for i in ids if i.startswith("fwd_sm90_")]
    assert len(fwd) == 1 and fwd[0].endswith("_lfold") == fold, ids
    return out, lse


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("block", [(128, 128), (256, 384)], ids=["128x128", "256x384"])
def test_fold_equals_the_consumers_bits_and_the_reference(dtype, head_dim, causal, block,
                                                         monkeypatch):
    sq, sk = 333, 700
    g = torch.Generator().manual_seed(sq + head_dim + block[1] + causal)
    dt = getattr(torch, dtype)
    q = torch.randn(B, sq, H, head_dim, generator=g).to("cuda", dt)
    k = torch.randn(B, sk, HK, head_dim, generator=g).to("cuda", dt)
    v = torch.randn(B, sk, HK, head_dim, generator=g).to("cuda", dt)
    bias = (2 * torch.randn(B, H, sq, sk, generator=g)).to("cuda", dt)
    dense = _dense(sq, sk, seed=head_dim + block[0])
    mixed = dm.MixedMask.from_dense_mask(cupy.asarray(dense), block)
    assert (mixed.block_class == 1).any()  # partial blocks: the tiles the fold works on
    out, lse = _run(q, k, v, bias, mixed, causal, monkeypatch, fold=True)
    out0, lse0 = _run(q, k, v, bias, mixed, causal, monkeypatch, fold=False)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=dense, bias=f64(bias),
                                   scale=head_dim ** -0.5,
                                   window=(-1, 0) if causal else (-1, -1)), dtype)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["nocap", "softcap"])
def test_non_finite_values_at_masked_keys_are_dropped(head_dim, softcap, monkeypatch):
    sq, sk = 200, 320
    g = torch.Generator().manual_seed(head_dim + int(softcap))
    q, k, v = (torch.randn(B, sq if i == 0 else sk, H, head_dim, generator=g).to(torch.bfloat16)
               for i in range(3))
    mask = torch.rand(B, H, sq, sk, generator=g) > 0.3
    mask[:, :, :, 150] = False               # key 150 masked for every row but 10..19
    mask[:, :, 10:20, 150] = True
    k[1, 150, 0, 7] = float("nan")           # NaN key: NaN rows 10..19 of batch 1, head 0
    bias = torch.randn(B, H, sq, sk, generator=g).to(torch.bfloat16)
    pick = torch.randint(0, 3, (B, H, sq, sk), generator=g)
    poison = torch.tensor([float("nan"), float("inf"), float("-inf")]).to(torch.bfloat16)[pick]
    bias = torch.where(~mask, poison, bias)  # anything at a masked position is dropped
    mask[0, 1, 30, 40] = True
    bias[0, 1, 30, 40] = float("nan")        # NaN bias at a kept key: row 30 of (0, 1) NaN
    mixed = dm.MixedMask.from_dense_mask(cupy.asarray(mask.numpy()), (128, 128))
    qc, kc, vc, bc = (x.cuda() for x in (q, k, v, bias))
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_LIST_FOLD=1")
    ids = _launched_ids(monkeypatch)
    out, lse = dm.flash_dmattn_func(qc, kc, vc, attn_bias=bc, sparse_mask=mixed, softcap=softcap,
                                    return_lse=True)
    torch.cuda.synchronize()
    assert any(i.endswith("_lfold") for i in ids), ids
    ref, ref_lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, softcap=softcap,
                                        return_lse=True, backend="reference")
    o, r = f64(out), f64(ref)
    nan_got, nan_ref = np.isnan(o).any(axis=-1), np.isnan(r).any(axis=-1)
    np.testing.assert_array_equal(nan_got, nan_ref)
    assert nan_ref[1, 10:20, 0].all() and nan_ref[0, 30, 1] and nan_ref.sum() == 11
    fine = ~nan_ref
    assert np.isfinite(o[fine]).all() and np.abs(o[fine] - r[fine]).max() < 5e-2
    lf, lr = f64(lse), f64(ref_lse)
    np.testing.assert_array_equal(np.isnan(lf), np.isnan(lr))
    ok = np.isfinite(lr)
    assert np.abs(lf[ok] - lr[ok]).max() < 2e-2
