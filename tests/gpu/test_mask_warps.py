"""The Hopper forward's pack warps (DMATTN_MASK_ROUTE=warps): beside a tile bias, an attn_mask
read from its bytes by the bias spec's idle producer warps (sm90/fwd.cu: pack_mask_warps) into
block-list bits per tile, with no packing launch. Against the float64 reference for every
layout the route takes (full, per-batch, shared, expanded views), head dims 64/128/256, both
dtypes, causal and window bounds, tiles all true, all false and partial, fully masked rows,
query and key ends inside a tile; layouts it does not take (rows at odd pitches, a key stride,
Sk not a multiple of 32, a key-row bias) go the other routes; a call captured in a CUDA graph
replays like eager."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import f64
from test_kvcache import record_launches
from test_mask_route import B, H, _check, _keep, _qkv, _run
from test_mask_route import _bias as _route_bias
from test_mask_route import _mask as _route_mask

import dmattn_cupy as dm
from dmattn_cupy import mask_pack, runtime
from dmattn_cupy.forward import collapsed_broadcasts
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]


@pytest.fixture(autouse=True)
def warps_on(monkeypatch):
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "warps")


def _mask(layout: str, sq: int, sk: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """test_mask_route's layouts, and rows sk + 16 bytes apart (still 16-byte rows)."""
    if layout != "pitched16":
        return _route_mask(layout, sq, sk, seed)
    keep = _keep((B, H), sq, sk, seed)
    big = torch.zeros(B, H, sq, sk + 16, dtype=torch.bool)
    big[..., :sk] = torch.from_numpy(keep)
    return big.cuda()[..., :sk], keep


def _bias(kind: str, sq: int, sk: int, dtype: str, seed: int):
    """test_mask_route's kinds, and a bias shared by the heads."""
    if kind != "heads1":
        return _route_bias(kind, sq, sk, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(B, 1, sq, sk, generator=g)).to("cuda", getattr(torch, dtype))


def _packed(q, k, v, mask, bias, window=(-1, -1)) -> bool:
    pb = check_dense(q, k, v, mask, bias, None, False, window, 0.0, "cuda")
    return mask_pack.packs_in_forward(collapsed_broadcasts(pb), runtime.device_props(0))


def _run_warps(monkeypatch, q, k, v, mask, bias, **kw):
    """``_run``, and that its one launch was the pack-warps route's: the bias spec without
    mask tiles (``packs_in_forward``: the spec of the problem without its mask), reading the
    mask's bytes (the record's mask pointer) into the pack scratch (``sp_partial_bits``). The
    bytes route launches the same family with a mask spec, so ``fams`` alone cannot tell."""
    launched = record_launches(monkeypatch, lambda kernel, args: (
        kernel.spec, int(args[0]["mask"]), int(args[0]["sp_partial_bits"]))
        if kernel.spec.family == "fwd_sm90" else kernel.spec.family)
    out, lse, fams = _run(monkeypatch, q, k, v, mask, bias, **kw)
    assert fams == {"fwd_sm90"}, fams   # no packing kernel
    assert len(launched) == 1, launched   # (spec, the record's mask, its sp_partial_bits)
    spec, mask_ptr, bits_ptr = launched[0]
    assert not spec.has_mask and spec.has_bias and not spec.sparse, spec.id
    assert mask_ptr != 0 and bits_ptr != 0, (mask_ptr, bits_ptr)
    return out, lse


@pytest.mark.parametrize("bias_kind", ["full", "heads1"])
@pytest.mark.parametrize("layout", ["full", "heads1", "shared", "expanded", "pitched16"])
def test_pack_warps_match_the_reference(layout, bias_kind, monkeypatch):
    sq, sk, dtype = 300, 544, "bfloat16"
    seed = len(layout) * 10 + len(bias_kind)
    q, k, v = _qkv(sq, sk, dtype, seed)
    mask, keep = _mask(layout, sq, sk, seed)
    bias = _bias(bias_kind, sq, sk, dtype, seed + 1)
    assert _packed(q, k, v, mask, bias)
    out, lse = _run_warps(monkeypatch, q, k, v, mask, bias)
    _check(out, lse, q, k, v, keep, bias, dtype)
    assert np.all(np.isneginf(f64(lse)[:, :, 7])) and np.all(f64(out)[:, 7] == 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128, 256])   # 256: 64-key tiles
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 30)], ids=["full", "causal",
                                                                          "window"])
@pytest.mark.parametrize("sq,sk", [(512, 512), (333, 704), (700, 352), (129, 1024),
                                   (64, 96)])
def test_pack_warps_shapes_and_windows(sq, sk, window, d, dtype, monkeypatch):
    seed = sq + sk + d + window[0] + window[1]
    q, k, v = _qkv(sq, sk, dtype, seed, d)
    mask, keep = _mask("full", sq, sk, seed)
    bias = _bias("full", sq, sk, dtype, seed + 1)
    assert _packed(q, k, v, mask, bias, window)
    out, lse = _run_warps(monkeypatch, q, k, v, mask, bias, window_size=window)
    _check(out, lse, q, k, v, keep, bias, dtype, window)


@pytest.mark.parametrize("case", ["pitched", "keystride", "odd_sk", "key_row_bias", "no_bias"])
def test_layouts_the_pack_warps_do_not_take(case, monkeypatch):
    """Rows not 16-byte aligned, a key stride, Sk not a multiple of 32, a key-row bias (its
    spec has no pack warps) and no bias go the other routes and agree with the reference."""
    sq, sk, dtype = 300, 520 if case == "odd_sk" else 544, "bfloat16"
    q, k, v = _qkv(sq, sk, dtype, 31)
    layout = case if case in ("pitched", "keystride") else "full"
    mask, keep = _mask(layout, sq, sk, 32)
    bias = None if case == "no_bias" else _bias(
        "key_row" if case == "key_row_bias" else "full", sq, sk, dtype, 33)
    assert not _packed(q, k, v, mask, bias)
    out, lse, fams = _run(monkeypatch, q, k, v, mask, bias)
    _check(out, lse, q, k, v, keep, bias, dtype)


def test_mask_all_false_and_all_true(monkeypatch):
    """Every tile of one head all false (rows out 0, lse -inf), of another all true (equal to
    no mask: the tiles do no per-element work)."""
    sq, sk, dtype = 256, 512, "bfloat16"
    q, k, v = _qkv(sq, sk, dtype, 41)
    keep = np.random.default_rng(42).random((B, H, sq, sk)) < 0.5
    keep[0, 1] = False
    keep[1, 2] = True
    bias = _bias("full", sq, sk, dtype, 43)
    mask = torch.from_numpy(keep).cuda()
    assert _packed(q, k, v, mask, bias)
    out, lse = _run_warps(monkeypatch, q, k, v, mask, bias)
    _check(out, lse, q, k, v, keep, bias, dtype)
    assert np.all(np.isneginf(f64(lse)[0, 1])) and np.all(f64(out)[0, :, 1] == 0)
    out2, lse2 = dm.flash_dmattn_func(q[1:], k[1:], v[1:], attn_bias=bias[1:], return_lse=True)
    torch.testing.assert_close(out[1:, :, 2], out2[:, :, 2], rtol=0, atol=0)


def test_pack_warps_captured_in_a_cuda_graph():
    """A call captured by torch.cuda.graph: replay equals eager bit for bit, and after the
    mask, the bias and q/k/v change in place the replay reads the new mask."""
    from test_graphs import _replay_matches_eager

    sq, sk = 300, 544
    q, k, v = _qkv(sq, sk, "bfloat16", 51)
    mask, _ = _mask("full", sq, sk, 52)
    bias = _bias("full", sq, sk, "bfloat16", 53)
    assert _packed(q, k, v, mask, bias)

    def fn():
        return dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias)

    _replay_matches_eager(fn, [q, k, v, mask, bias])
