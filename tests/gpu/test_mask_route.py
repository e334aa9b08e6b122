"""The Hopper forward's route for attn_mask (DMATTN_MASK_ROUTE=1 here: every layout; the
default, auto, routes masks that several (batch, head) pairs share): the mask packed in each
call into 128 x 128 block lists (mask_pack + mask_lists) that fwd_sm90 reads like a prepared
MixedMask's. Against the float64 reference
for every mask layout the route takes (full, per-batch, shared, expanded views, rows at odd
pitches read byte by byte, a key stride), beside no bias, a full bias and a key-row bias,
with causal and window bounds, empty, full and partial blocks and fully masked rows; the
route's lists equal ``MixedMask.from_dense_mask``'s; a routed call captured in a CUDA graph
replays like eager and repacks a mask changed in place; layouts the route does not take (a
key-only mask, a kv-head mask) keep the byte tiles."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64
from test_kvcache import record_launch_families

import dmattn_cupy as dm
from dmattn_cupy import mask_pack, runtime
from dmattn_cupy.forward import collapsed_broadcasts
from dmattn_cupy.launch_plan import Plan
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]

B, H, HK, D = 2, 4, 2, 128
ROUTE = {"mask_pack", "mask_lists", "fwd_sm90"}


@pytest.fixture(autouse=True)
def route_on(monkeypatch):
    """The route for every mask layout (the default, auto, skips masks of their own per
    (batch, head))."""
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "1")


def _keep(lead: tuple[int, int], sq: int, sk: int, seed: int, p: float = 0.85) -> np.ndarray:
    """(Bm, Hm, Sq, Sk): ``p`` kept at random, a block kept whole, a block dropped whole, a
    fully masked query row and a key dropped for every row."""
    rng = np.random.default_rng(seed)
    m = rng.random((*lead, sq, sk)) < p
    m[..., :128, 128:256] = True
    m[..., 128:256, :128] = False
    m[..., 7, :] = False
    m[..., :, min(40, sk - 1)] = False
    return m


def _mask(layout: str, sq: int, sk: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(the attn_mask given, its (B|1, H|1, Sq, Sk) values for the reference)."""
    if layout in ("full", "heads1", "shared"):
        lead = {"full": (B, H), "heads1": (B, 1), "shared": (1, 1)}[layout]
        keep = _keep(lead, sq, sk, seed)
        return torch.from_numpy(keep).cuda(), keep
    if layout == "expanded":  # stride-0 batch and head dims
        keep = _keep((1, 1), sq, sk, seed)
        return torch.from_numpy(keep).cuda().expand(B, H, sq, sk), keep
    if layout == "pitched":   # rows sk + 3 bytes apart: the byte-load path
        keep = _keep((B, H), sq, sk, seed)
        big = torch.zeros(B, H, sq, sk + 3, dtype=torch.bool)
        big[..., :sk] = torch.from_numpy(keep)
        return big.cuda()[..., :sk], keep
    assert layout == "keystride"  # a key stride: (B, H, Sk, Sq) transposed
    keep = _keep((B, H), sq, sk, seed)
    t = torch.from_numpy(np.ascontiguousarray(keep.transpose(0, 1, 3, 2))).cuda()
    return t.transpose(-1, -2), keep


def _qkv(sq: int, sk: int, dtype: str, seed: int, d: int = D, b: int = B, h: int = H,
         hk: int = HK):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    return (torch.randn(b, sq, h, d, generator=g).to("cuda", dt),
            torch.randn(b, sk, hk, d, generator=g).to("cuda", dt),
            torch.randn(b, sk, hk, d, generator=g).to("cuda", dt))


def _bias(kind: str, sq: int, sk: int, dtype: str, seed: int, b: int = B, h: int = H):
    if kind == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, sq, sk) if kind == "full" else (b, h, 1, sk)
    return (2 * torch.randn(*shape, generator=g)).to("cuda", getattr(torch, dtype))


def _routed(q, k, v, mask, bias, window=(-1, -1)) -> bool:
    pb = check_dense(q, k, v, mask, bias, None, False, window, 0.0, "cuda")
    return mask_pack.routes_mask(collapsed_broadcasts(pb), runtime.device_props(0))


def _run(monkeypatch, q, k, v, mask, bias, **kw):
    """(out, lse, the families of the validated path's launches: none for a cached call,
    whose raw launches ``record_launch_families`` does not see)."""
    families = record_launch_families(monkeypatch)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True,
                                    **kw)
    torch.cuda.synchronize()
    return out, lse, set(families)


def _check(out, lse, q, k, v, keep, bias, dtype, window=(-1, -1)):
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=keep, bias=f64(bias),
                                   scale=q.shape[-1] ** -0.5, window=window), dtype)


@pytest.mark.parametrize("bias_kind", ["none", "full", "key_row"])
@pytest.mark.parametrize("layout", ["full", "heads1", "shared", "expanded", "pitched",
                                    "keystride"])
def test_route_matches_the_reference(layout, bias_kind, monkeypatch):
    sq, sk, dtype = 300, 520, "bfloat16"
    seed = len(layout) * 10 + len(bias_kind)
    q, k, v = _qkv(sq, sk, dtype, seed)
    mask, keep = _mask(layout, sq, sk, seed)
    bias = _bias(bias_kind, sq, sk, dtype, seed + 1)
    out, lse, fams = _run(monkeypatch, q, k, v, mask, bias)
    assert ROUTE <= fams, fams
    _check(out, lse, q, k, v, keep, bias, dtype)
    assert np.all(np.isneginf(f64(lse)[:, :, 7])) and np.all(f64(out)[:, 7] == 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128, 192, 256])   # 192, 256: 64-key tiles of the lists
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 30)], ids=["full", "causal",
                                                                          "window"])
@pytest.mark.parametrize("sq,sk", [(512, 512), (333, 700), (700, 333), (129, 1000)])
def test_route_shapes_and_windows(sq, sk, window, d, dtype, monkeypatch):
    seed = sq + sk + d + window[0] + window[1]
    q, k, v = _qkv(sq, sk, dtype, seed, d)
    mask, keep = _mask("full", sq, sk, seed)
    bias = _bias("full", sq, sk, dtype, seed + 1)
    routed = _routed(q, k, v, mask, bias, window)
    # the Hopper forward (every head dim, lists beside it) takes a full bias whose rows are
    # 16-byte aligned (a tensor map's rule); Sk 333 and 700 send the call to the portable
    # kernel, which reads the mask's bytes
    assert routed == (2 * sk % 16 == 0), (routed, sk)
    out, lse, fams = _run(monkeypatch, q, k, v, mask, bias, window_size=window)
    assert (ROUTE <= fams) == routed, fams
    _check(out, lse, q, k, v, keep, bias, dtype, window)


def test_route_off_and_untaken_layouts_read_bytes(monkeypatch):
    """DMATTN_MASK_ROUTE=0, a key-only (.., 1, Sk) mask and a per-kv-head mask keep the byte
    tiles (no packing launch) and agree with the reference."""
    sq, sk, dtype = 300, 520, "bfloat16"
    q, k, v = _qkv(sq, sk, dtype, 3)
    bias = _bias("full", sq, sk, dtype, 4)
    mask, keep = _mask("full", sq, sk, 5)
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "0")
    out, lse, fams = _run(monkeypatch, q, k, v, mask, bias)
    assert "fwd_sm90" in fams and not fams & {"mask_pack", "mask_lists"}, fams
    _check(out, lse, q, k, v, keep, bias, dtype)
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "1")
    keyonly = np.random.default_rng(6).random((B, H, 1, sk)) < 0.8
    kvhead = np.random.default_rng(7).random((B, HK, sq, sk)) < 0.8
    kvhead[..., 7, :] = False
    for m in (keyonly, kvhead):
        out, lse, fams = _run(monkeypatch, q, k, v, torch.from_numpy(m).cuda(), bias)
        assert not fams & {"mask_pack", "mask_lists"}, fams
        _check(out, lse, q, k, v, m, bias, dtype)


@pytest.mark.parametrize("layout", ["full", "heads1", "pitched"])
def test_route_lists_equal_from_dense_mask(layout):
    """The lists the route's plan launches write (counts, ascending indices, the partial
    blocks' bits at their slots) are the lists of ``MixedMask.from_dense_mask`` of the same
    mask, whose slots number the partial blocks compactly instead."""
    sq, sk = 300, 520
    mask, keep = _mask(layout, sq, sk, 11)
    q, k, v = _qkv(sq, sk, "bfloat16", 12)
    pb = collapsed_broadcasts(check_dense(q, k, v, mask, None, None, False, (-1, -1), 0.0,
                                          "cuda"))
    assert mask_pack.routes_mask(pb, runtime.device_props(0))
    plan, keep_alive = Plan(device=0, inputs=("mask",)), []
    arrs, ready = mask_pack.plan_lists(plan, pb.mask, q, keep_alive)
    assert ready is None
    plan.run(runtime.current_stream(pb.kind, 0))
    torch.cuda.synchronize()
    want = dm.MixedMask.from_dense_mask(keep, (128, 128))
    lists = want.block_lists(128, 128)
    host = {f: getattr(arrs, f).cpu().numpy() for f in
            ("full_count", "full_idx", "partial_count", "partial_idx", "partial_slot",
             "partial_bits")}
    lead = keep.shape[:2]
    for name in ("full", "partial"):
        count = getattr(lists, f"{name}_count")
        idx = getattr(lists, f"{name}_idx")
        np.testing.assert_array_equal(host[f"{name}_count"], count)
        for pos in np.ndindex(*count.shape):
            n = count[pos]
            np.testing.assert_array_equal(host[f"{name}_idx"][pos][:n], idx[pos][:n])
            assert (host[f"{name}_idx"][pos][n:] == 0).all()
    cls = want.block_class
    assert cls.shape == (*lead, 3, 5) and (cls == 1).any() and (cls == 0).any()
    slot = host["partial_slot"]
    assert ((slot >= 0) == (cls == 1)).all()
    bits = want.partial_bits
    for pos in zip(*np.nonzero(cls == 1), strict=True):
        np.testing.assert_array_equal(host["partial_bits"][slot[pos]],
                                      bits[want.partial_slot[pos]])


@pytest.mark.parametrize("layout", ["full", "heads1"])
def test_route_captured_in_a_cuda_graph(layout):
    """A routed call captured by torch.cuda.graph (packing, lists and forward from its cached
    plan): replay equals eager bit for bit, and after the mask, the bias and q/k/v change in
    place the replay packs the new mask (equal to a new eager call)."""
    from test_graphs import _replay_matches_eager

    sq, sk = 300, 520
    q, k, v = _qkv(sq, sk, "bfloat16", 21)
    mask, _ = _mask(layout, sq, sk, 22)
    bias = _bias("full", sq, sk, "bfloat16", 23)
    assert _routed(q, k, v, mask, bias)

    def fn():
        return dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias)

    _replay_matches_eager(fn, [q, k, v, mask, bias])
