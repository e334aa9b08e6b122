"""Debug builds count the key tiles each CTA loads: empty tiles must never be loaded."""

from __future__ import annotations

import math

import pytest

from dmattn_cupy.forward import run_forward, select_fwd_spec
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("both_forward_families")]


def _loaded_tiles(sq, sk, mask=None, with_masked=False, **kw):
    q = torch.randn(1, sq, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, sk, 1, 64, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    pb = check_dense(q, k, v, mask, None, None, kw.get("is_causal", False),
                     kw.get("window_size", (-1, -1)), 0.0, "cuda")
    spec = select_fwd_spec(pb)
    n_cta = math.ceil(sq / spec.block_m)
    counters = torch.zeros(n_cta, 2, dtype=torch.int32, device="cuda")
    run_forward(pb, q, tile_counters=counters)
    torch.cuda.synchronize()
    loaded, masked = counters[:, 0].cpu().tolist(), counters[:, 1].cpu().tolist()
    return ((loaded, masked) if with_masked else loaded), spec


def _expected(sq, sk, spec, lo_fn, hi_fn):
    """Tiles intersecting each CTA's allowed key range [lo, hi]."""
    res = []
    for m in range(math.ceil(sq / spec.block_m)):
        r0, r1 = m * spec.block_m, min(sq, (m + 1) * spec.block_m) - 1
        lo, hi = max(0, lo_fn(r0)), min(sk - 1, hi_fn(r1))
        res.append(0 if hi < lo else hi // spec.block_n - lo // spec.block_n + 1)
    return res


@pytest.mark.parametrize("sq,sk", [(256, 256), (100, 300), (300, 100), (65, 1000)], ids=str)
def test_causal_skips_future_tiles(sq, sk):
    (got, masked), spec = _loaded_tiles(sq, sk, is_causal=True, with_masked=True)
    off = sk - sq
    assert got == _expected(sq, sk, spec, lambda r: 0, lambda r: r + off)
    want = []  # only tiles crossing the diagonal or the key end are masked
    for m, n_tiles in enumerate(got):
        m0 = m * spec.block_m
        want.append(sum(1 for nb in range(n_tiles)
                        if (nb + 1) * spec.block_n - 1 > min(m0 + off, sk - 1)))
    assert masked == want


def test_window_skips_tiles_outside():
    sq = sk = 512
    got, spec = _loaded_tiles(sq, sk, window_size=(64, 16))
    assert got == _expected(sq, sk, spec, lambda r: r - 64, lambda r: r + 16)


def test_all_false_mask_tiles_are_skipped():
    sq, sk = 64, 256
    mask = torch.zeros(1, 1, sq, sk, dtype=torch.bool, device="cuda")
    mask[..., 40:50] = True      # only key tile 1 (keys 32..63) has anything kept
    got, spec = _loaded_tiles(sq, sk, mask=mask)
    assert got == [1] * math.ceil(sq / spec.block_m)
