"""Varlen batches and block-sparse masks on both forward families (issue 13): every test runs
once with the selector free (on compute capability 9.0 the sm_90a family wherever
forward_sm90.tile_for takes the problem) and once forced to the portable fwd_mma, and asserts
which family ran. Ragged lengths with empty sequences and len_q > len_k under causal; key-
based (total_k, h') mask/bias as key chunks (contiguous rows) or key rows (transposed) and
query-based (total_q, h', max_k) ones; every block-sparse class at 128x128 blocks (and & combos,
per-batch/per-head), 64-row blocks going to fwd_mma; debug tile counters (unlisted blocks never
loaded; NaN-poisoned keys there change nothing); DynamicMask updates replayed in a CUDA graph."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy import runtime
from dmattn_cupy.forward import run_forward, select_fwd_spec
from dmattn_cupy.sparse_plan import block_size_of, fold_window
from dmattn_cupy.validate import check_dense, check_varlen

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("both_forward_families")]

H, HK = 4, 2


def _want(sm90_takes: bool) -> str:
    """The family a test expects: fwd_mma when forced or off Hopper."""
    hopper = torch.cuda.get_device_capability() == (9, 0)
    forced = os.environ.get("DMATTN_FWD_FAMILY", "auto") == "fwd_mma"
    return "fwd_sm90" if sm90_takes and hopper and not forced else "fwd_mma"


# ----------------------------------------------------------------------------- varlen


def _packed(lens_q, lens_k, d, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lens_q)]), dtype=torch.int32)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lens_k)]), dtype=torch.int32)
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q = torch.randn(tq, H, d, generator=g).to("cuda", dtype)
    k = torch.randn(tk, HK, d, generator=g).to("cuda", dtype)
    v = torch.randn(tk, HK, d, generator=g).to("cuda", dtype)
    return q, k, v, cu_q.cuda(), cu_k.cuda(), max(lens_q), max(lens_k)


def _varlen_check(lens, d=64, mask=None, bias=None, seed=0, family=True, causal=False,
                  dtype=torch.bfloat16):
    q, k, v, cu_q, cu_k, mq, mk = _packed(*lens, d, seed, dtype)
    pb = check_varlen(q, k, v, cu_q, cu_k, mq, mk, mask, bias, None, causal, (-1, -1), 0.0,
                      "cuda")
    assert select_fwd_spec(pb).family == _want(family)
    out, lse = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, attn_mask=mask,
                                           attn_bias=bias, is_causal=causal, return_lse=True)
    torch.cuda.synchronize()
    assert lse.shape == (H, q.shape[0])
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), cu_q=cu_q.cpu().numpy(),
                    cu_k=cu_k.cpu().numpy(), mask=f64(mask), bias=f64(bias), scale=d ** -0.5,
                    window=(-1, 0) if causal else (-1, -1))
    assert_fa_close(out, lse, ref_args, str(dtype).removeprefix("torch."), varlen=True)


# max len_k 304: query-based rows of 304 bytes (mask) / 608 (bias) are 16-byte multiples
LENS = {
    "ragged": ([130, 5, 257, 64, 1], [200, 304, 33, 129, 64]),
    "empty": ([0, 300, 17, 0, 129], [12, 0, 304, 0, 200]),
    "q_gt_k": ([300, 7, 129, 250], [100, 7, 0, 304]),
}


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("lens", list(LENS), ids=list(LENS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_plain(lens, causal, d):
    _varlen_check(LENS[lens], d=d, causal=causal, seed=d + len(lens))


def test_varlen_fp16():
    _varlen_check(LENS["ragged"], d=128, causal=True, seed=3, dtype=torch.float16)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_next_sequence_nonfinite_kv_does_not_leak(causal, d):
    """Tiles crossing a sequence's end read the next sequence's K/V rows (no TMA zero fill
    inside a packed tensor): NaN keys and inf values there must not reach this sequence."""
    lens = ([130, 60, 200], [100, 70, 300])
    q, k, v, cu_q, cu_k, mq, mk = _packed(*lens, d, 31)
    pb = check_varlen(q, k, v, cu_q, cu_k, mq, mk, None, None, None, causal, (-1, -1), 0.0,
                      "cuda")
    assert select_fwd_spec(pb).family == _want(True)
    clean = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, is_causal=causal)
    kp, vp = k.clone(), v.clone()
    kp[100:170] = float("nan")          # all of sequence 1
    vp[100:170] = float("inf")
    out = dm.flash_dmattn_varlen_func(q, kp, vp, cu_q, cu_k, mq, mk, is_causal=causal)
    torch.cuda.synchronize()
    for rows in (slice(0, 130), slice(190, 390)):   # sequences 0 and 2
        assert bool(torch.isfinite(out[rows]).all())
        assert torch.equal(out[rows], clean[rows])
    assert not bool(torch.isfinite(out[130:190]).any())   # sequence 1 propagates


def _layout(kind, layout, heads, lens, seed, transposed=False):
    g = torch.Generator().manual_seed(seed)
    tq, tk, mk = sum(lens[0]), sum(lens[1]), max(lens[1])
    shape = (tq, heads, mk) if layout == "q" else (tk, heads)
    if transposed:  # key-based, stored (h', total_k): keys contiguous per head
        shape = (heads, tk)
    x = (torch.rand(*shape, generator=g) > 0.3) if kind == "mask" else torch.randn(*shape,
                                                                                    generator=g)
    x = x.to("cuda", torch.bfloat16) if kind == "bias" else x.cuda()
    return x.t() if transposed else x


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", [1, HK, H], ids=lambda h: f"h{h}")
@pytest.mark.parametrize("mask_layout", ["q", "k", None], ids=lambda x: f"mask-{x}")
@pytest.mark.parametrize("bias_layout", ["q", "k", None], ids=lambda x: f"bias-{x}")
def test_varlen_mask_bias_layouts(heads, mask_layout, bias_layout, d):
    lens = LENS["empty"]
    mask = _layout("mask", mask_layout, heads, lens, 1) if mask_layout else None
    bias = _layout("bias", bias_layout, heads, lens, 2) if bias_layout else None
    _varlen_check(lens, d=d, mask=mask, bias=bias, causal=True, seed=heads)
    _varlen_check(LENS["q_gt_k"], d=d, mask=_layout("mask", mask_layout, heads,
                                                    LENS["q_gt_k"], 3) if mask_layout else None,
                  bias=_layout("bias", bias_layout, heads, LENS["q_gt_k"], 4)
                  if bias_layout else None, seed=heads + 1)


@pytest.mark.parametrize("lens_k", [[112, 256, 32], [113, 255, 32]], ids=["k16", "k113"])
@pytest.mark.parametrize("heads", [HK, H])
def test_varlen_key_based_transposed(heads, lens_k):
    # total_k 400: 16-byte key rows per head; k113: sequence 1 starts at key 113, off TMA's
    # 16-byte box start (key rows load from the aligned-down key)
    lens = ([100, 129, 64], lens_k)
    mask = _layout("mask", "k", heads, lens, 5, transposed=True)
    bias = _layout("bias", "k", heads, lens, 6, transposed=True)
    assert mask.stride() == (1, 400)
    _varlen_check(lens, d=128, mask=mask, bias=bias, causal=True, seed=7)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["chunk", "transposed", "strided"])
def test_varlen_key_bias_by_plain_loads(kind, causal):
    """A key-based bias without a mask reaches the Hopper kernel by the producer's plain loads
    (fp32 row per stage): contiguous rows, keys contiguous per head, and keys 2 apart with
    heads 2 * total_k apart (no TMA layout: the portable family's before), at odd starts."""
    lens = ([130, 5, 257, 64], [113, 304, 33, 200])
    tk = sum(lens[1])
    if kind == "strided":
        g = torch.Generator().manual_seed(12)
        bias = torch.randn(H, 2 * tk, generator=g).to("cuda", torch.bfloat16).t()[::2]
        assert bias.stride() == (2, 2 * tk)
    else:
        bias = _layout("bias", "k", H, lens, 12, transposed=kind == "transposed")
    _varlen_check(lens, d=128, bias=bias, causal=causal, seed=13)


def test_varlen_layouts_tma_cannot_read_go_to_fwd_mma():
    """Layouts no tensor map reads select fwd_mma; a query-based mask with 300-byte rows is
    then copied into 16-byte rows (forward.operands_to_pad) and runs on fwd_sm90 (its own
    test: test_forward_sm90.py), a float32 bias over keys stays on fwd_mma."""
    lens = ([100, 33], [300, 3])  # max_k 300: query-based mask rows of 300 bytes
    mask = _layout("mask", "q", HK, lens, 8)
    _varlen_check(lens, mask=mask, seed=9, family=False)
    bias = _layout("bias", "k", H, lens, 10).float()  # a float32 bias over keys
    _varlen_check(lens, bias=bias, seed=11, family=False)


def test_varlen_prefill_key_bias_no_query_based_temporary():
    """Key-based bias stays O(total_k * h'): the call allocates no (total_q, h', max_k)."""
    lens = ([1024, 3000, 77, 4096], [1024, 3000, 77, 4096])
    lens_tot = sum(lens[0])
    bias = _layout("bias", "k", H, lens, 12)
    q, k, v, cu_q, cu_k, mq, mk = _packed(*lens, 128, 13)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, attn_bias=bias,
                                      is_causal=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < lens_tot * H * mk * 2 // 4  # far below one query-based temporary
    assert out.shape == q.shape and bool(torch.isfinite(out).all())


# ----------------------------------------------------------------------------- block-sparse

B, D = 2, 64


def _qkv(sq, sk, seed, d=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, sq, H, d, generator=g).to("cuda", torch.bfloat16),
            torch.randn(B, sk, HK, d, generator=g).to("cuda", torch.bfloat16),
            torch.randn(B, sk, HK, d, generator=g).to("cuda", torch.bfloat16))


def _pattern(lead, sq, sk, block, seed):
    """(*lead, Sq, Sk) bool: blocks empty (40%), full, or element noise; per-head patterns have
    one query row block with nothing kept."""
    bm, bn = block
    rng = np.random.default_rng(seed)
    nr, nc = math.ceil(sq / bm), math.ceil(sk / bn)
    kind = np.where(rng.random((*lead, nr, nc)) < 0.6, rng.integers(1, 3, (*lead, nr, nc)), 0)
    if len(lead) == 2:
        kind[0, 0, -1] = 0
    el = kind.repeat(bm, axis=-2).repeat(bn, axis=-1)[..., :sq, :sk]
    return (el == 2) | ((el == 1) & (rng.random(el.shape) < 0.3))


def _block_mask(name, sq, sk, seed, block=(128, 128)):
    lead = {"bh": (B, H), "b": (B, 1), "h": (1, H)}.get(name.rsplit("_", 1)[-1], ())
    dense = _pattern(lead, sq, sk, block, seed)
    base = name.split("_")[0]
    if base == "bitset":
        return dm.BlockBitsetMask.from_dense_mask(dense, block_size=block)
    if base == "bcsr":
        return dm.BCSRMask.from_dense_mask(dense, block_size=block)
    if base == "mixed":
        return dm.MixedMask.from_dense_mask(dense, block_size=block)
    assert base == "dynamic", name
    bits = dm.BlockBitsetMask.from_dense_mask(dense, block_size=block).block_map() > 0
    return dm.DynamicMask(cupy.asarray(bits), sq, sk, block_size=block)


def make_mask(kind, sq, sk, seed=0, block=(128, 128)):
    if "&" in kind:
        a, b = kind.split("&")
        return make_mask(a, sq, sk, seed, block) & make_mask(b, sq, sk, seed + 1, block)
    if kind == "causal":
        return dm.CausalMask(sq, sk)
    if kind == "causal_window":
        return dm.CausalWindowMask(300, sq, sk)
    return _block_mask(kind, sq, sk, seed, block)


def _problem(q, k, v, sparse, mask=None, bias=None, causal=False):
    pb = check_dense(q, k, v, mask, bias, None, causal, (-1, -1), 0.0, "cuda")
    return fold_window(pb, sparse)


def _check(q, k, v, sparse, mask=None, bias=None, causal=False, family=True):
    pb, block = _problem(q, k, v, sparse, mask, bias, causal)
    assert select_fwd_spec(pb, sparse=block_size_of(block)).family == _want(family)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal,
                                    sparse_mask=sparse, return_lse=True)
    torch.cuda.synchronize()
    assert_fa_close(out, lse, _ref_args(q, k, v, sparse, mask, bias, causal), "bfloat16")
    return out


def _ref_args(q, k, v, sparse, mask=None, bias=None, causal=False):
    return dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias),
                scale=q.shape[-1] ** -0.5, window=(-1, 0) if causal else (-1, -1),
                sparse=np.asarray(sparse.to_dense()))


KINDS = ["bitset", "bcsr", "mixed", "dynamic", "bitset_bh", "bcsr_b", "mixed_h", "dynamic_bh",
         "causal&bitset", "causal_window&mixed", "causal_window&dynamic_bh", "bitset&bcsr",
         "mixed_h&bitset"]
SIZES = [(512, 512), (333, 700), (700, 333)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sq,sk", SIZES, ids=str)
def test_every_sparse_class_is_exact(kind, sq, sk):
    _check(*_qkv(sq, sk, 1), make_mask(kind, sq, sk, seed=sq + 3 * sk))


@pytest.mark.parametrize("kind", ["bitset_bh", "mixed", "dynamic"])
@pytest.mark.parametrize("d", [128, 256])
def test_sparse_head_dims(kind, d):
    sq = sk = 512
    _check(*_qkv(sq, sk, 2, d), make_mask(kind, sq, sk, seed=d))


@pytest.mark.parametrize("sk", [496, 500])
@pytest.mark.parametrize("kind", ["bitset_bh", "mixed", "dynamic"])
@pytest.mark.parametrize("combo", ["mask", "bias", "both", "causal"])
def test_sparse_with_attn_mask_bias_causal(kind, combo, sk):
    # sk 500: mask/bias rows of 500 bytes / 1000 bytes are no TMA layout (rows must be
    # 16-byte multiples): the portable kernel takes them; sk 496: a partial last key tile
    sq = 384
    q, k, v = _qkv(sq, sk, 3, 128)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(B, H, sq, sk, generator=g) > 0.2).cuda() if combo in ("mask",
                                                                                "both") else None
    bias = (torch.randn(B, 1, sq, sk, generator=g).to("cuda", torch.bfloat16)
            if combo in ("bias", "both") else None)
    _check(q, k, v, make_mask(kind, sq, sk, seed=5), mask, bias, causal=combo == "causal",
           family=combo == "causal" or sk % 16 == 0)


@pytest.mark.parametrize("block", [(64, 64), (64, 128), (128, 64)], ids=str)
def test_blocks_that_are_not_whole_sm90_tiles_go_to_fwd_mma(block):
    sq, sk = 512, 512
    _check(*_qkv(sq, sk, 6), make_mask("mixed", sq, sk, seed=7, block=block), family=False)
    _check(*_qkv(sq, sk, 6), make_mask("bitset", sq, sk, seed=8, block=block), family=False)


def test_256_blocks_run_on_sm90():
    sq, sk = 700, 900
    _check(*_qkv(sq, sk, 9), make_mask("mixed_h", sq, sk, seed=10, block=(256, 256)))


def _counted(q, k, v, sparse):
    """One debug-counter launch: (loaded, masked) per CTA as (B, H, query tiles), the tile."""
    pb, block = _problem(q, k, v, sparse)
    spec = select_fwd_spec(pb, debug_counters=True, sparse=block_size_of(block))
    assert spec.family == _want(True)
    nm = math.ceil(q.shape[1] / spec.block_m)
    counters = torch.zeros(B, H, nm, 2, dtype=torch.int32, device="cuda")
    out, _ = run_forward(pb, q, tile_counters=counters, sparse=block)
    torch.cuda.synchronize()
    c = counters.cpu().numpy()
    return c[..., 0], c[..., 1], (spec.block_m, spec.block_n), out


def _tile_stats(keep4, tm, tn):
    """Per (b, h, query tile): key tiles with something kept; of those, tiles not all kept."""
    b, h, sq, sk = keep4.shape
    nm, nn = math.ceil(sq / tm), math.ceil(sk / tn)
    any_ = np.zeros((b, h, nm * tm, nn * tn), dtype=bool)
    all_ = np.ones_like(any_)
    any_[..., :sq, :sk] = all_[..., :sq, :sk] = keep4
    any_t = any_.reshape(b, h, nm, tm, nn, tn).any(axis=(3, 5))
    all_t = all_.reshape(b, h, nm, tm, nn, tn).all(axis=(3, 5))
    return any_t.sum(-1), (any_t & ~all_t).sum(-1)


@pytest.mark.parametrize("kind", ["bitset", "bcsr_b", "dynamic_bh", "mixed", "mixed_h"])
def test_counters_unlisted_never_loaded_full_never_masked(kind):
    sq = sk = 1024
    mask = make_mask(kind, sq, sk, seed=21)
    loaded, masked, tile, _ = _counted(*_qkv(sq, sk, 22), mask)
    keep = np.broadcast_to(mask.to_dense(), (B, H, sq, sk))
    want_loaded, want_partial = _tile_stats(keep, *tile)
    np.testing.assert_array_equal(loaded, want_loaded)
    assert loaded.sum() < B * H * (sq // tile[0]) * (sk // tile[1])
    if kind.startswith("mixed"):
        assert want_partial.sum() > 0
        np.testing.assert_array_equal(masked, want_partial)
    else:
        np.testing.assert_array_equal(masked, 0)


def test_unlisted_blocks_nan_poisoned_change_nothing():
    """Keys of column blocks no row block lists hold NaN in K and V: never loaded, so the
    output equals the reference on clean K/V."""
    sq = sk = 768
    bits = np.random.default_rng(23).random((6, 6)) < 0.5
    bits[:, [1, 4]] = False
    bits[:, 0] = True
    mask = dm.BlockBitsetMask.from_dense_mask(
        np.kron(bits, np.ones((128, 128), dtype=bool)), block_size=(128, 128))
    q, k, v = _qkv(sq, sk, 24)
    kp, vp = k.clone(), v.clone()
    for c in (1, 4):
        kp[:, 128 * c:128 * (c + 1)] = float("nan")
        vp[:, 128 * c:128 * (c + 1)] = float("nan")
    pb, block = _problem(q, kp, vp, mask)
    assert select_fwd_spec(pb, sparse=block_size_of(block)).family == _want(True)
    out, lse = dm.flash_dmattn_func(q, kp, vp, sparse_mask=mask, return_lse=True)
    torch.cuda.synchronize()
    assert_fa_close(out, lse, _ref_args(q, k, v, mask), "bfloat16")


@pytest.mark.parametrize("lead", [(), (B, H)], ids=["2d", "per_head"])
def test_dynamic_mask_update_replays_in_a_cuda_graph(lead):
    sq, sk = 512, 529
    q, k, v = _qkv(sq, sk, 25)
    shape = (*lead, 4, 5)
    rng = np.random.default_rng(26)
    mask = dm.DynamicMask(cupy.asarray(rng.random(shape) < 0.5), sq, sk, block_size=(128, 128))
    causal = dm.CausalWindowMask(384, sq, sk) & mask
    pb, block = _problem(q, k, v, causal)
    assert select_fwd_spec(pb, sparse=block_size_of(block)).family == _want(True)
    dm.flash_dmattn_func(q, k, v, sparse_mask=causal)  # compile and warm up outside capture
    torch.cuda.synchronize()
    kernels = len(runtime._kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dm.flash_dmattn_func(q, k, v, sparse_mask=causal)
    previous = None
    for _ in range(3):
        new = rng.random(shape) < 0.5
        new[..., 0] = True
        mask.update(cupy.asarray(new))
        graph.replay()
        torch.cuda.synchronize()
        assert_fa_close(out, None, _ref_args(q, k, v, causal), "bfloat16")
        eager = dm.flash_dmattn_func(q, k, v, sparse_mask=causal)
        torch.cuda.synchronize()
        assert torch.equal(eager, out)
        if previous is not None:
            assert not torch.equal(out, previous)
        previous = out.clone()
    assert len(runtime._kernels) == kernels


def test_sparse_spec_is_the_dense_kernel():
    """Block lists are a runtime field of the sm_90a kernel: same spec as without them."""
    if _want(True) != "fwd_sm90":
        pytest.skip("fwd_sm90 not selected here")
    q, k, v = _qkv(512, 512, 27)
    pb, block = _problem(q, k, v, make_mask("bitset", 512, 512))
    assert select_fwd_spec(pb, sparse=block_size_of(block)) == dataclasses.replace(
        select_fwd_spec(pb), sparse=False)


def test_item_order_changes_no_output_bit(monkeypatch):
    """Block lists without a window run fwd_sm90's work items longest first within groups of
    128 (a fwd_order launch first: forward_sm90.item_order_items): every item still runs once
    (against float64: a skipped item leaves its rows unwritten, a repeated one means another
    was skipped), and out equals the kernel's own order (DMATTN_SM90_FWD_ORDER=0) bit for bit:
    an item's rows are one CTA's work whatever the order. Sq 4400, H 4, B 2: 35 x 8 = 280
    items, two whole groups and a partial one, about two claims per CTA; Sk 640 (five key
    blocks: items of 0-5 listed blocks to rank) keeps the float64 reference small."""
    families: list[str] = []
    get_kernel = runtime.get_kernel
    monkeypatch.setattr(runtime, "get_kernel",
                        lambda spec, dev: families.append(spec.family) or get_kernel(spec, dev))
    sq, sk = 4400, 640
    q, k, v = _qkv(sq, sk, 21)
    mask = make_mask("bitset_bh", sq, sk, seed=22)
    ordered = _check(q, k, v, mask)
    assert ("fwd_order" in families) == (_want(True) == "fwd_sm90")
    monkeypatch.setenv("DMATTN_SM90_FWD_ORDER", "0")
    families.clear()
    own = dm.flash_dmattn_func(q, k, v, sparse_mask=mask)   # bit for bit: no second reference
    assert "fwd_order" not in families
    assert torch.equal(ordered, own)
