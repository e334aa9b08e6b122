"""The thin launch path with block sparse masks, on the CPU with the GPU stubbed (the ``cap``
fixture of test_fastpath: CPU torch tensors pose as CUDA device 0, launches captured byte for
byte).

The property: a call with a block mask served by a cached plan launches exactly what the
validated path (``dispatch.dense``) builds for the same call, block-list pointers included;
the list pointers are patched per call (two masks of the same shapes share a plan, never its
pointers), a DynamicMask's live buffers are read in place (an update between calls is seen),
and every call the thin path cannot prove the same takes the validated path."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import test_fastpath as tf  # noqa: E402  (tests/cpu is on sys.path: pytest's rootdir import)

import dmattn_cupy as dm  # noqa: E402
from dmattn_cupy import dispatch, fastpath, masks, sparse_plan  # noqa: E402
from dmattn_cupy.layout import SPARSE_INPUTS  # noqa: E402

cap = tf.cap   # the fixture
B, SQ, SK, H, HK, D = 2, 200, 264, 4, 2, 64


def _qkv(seed=0, sq=SQ, sk=SK):
    return (tf._rand(B, sq, H, D, seed=seed), tf._rand(B, sk, HK, D, seed=seed + 1),
            tf._rand(B, sk, HK, D, seed=seed + 2))


def _grid(block):
    return -(-SQ // block[0]), -(-SK // block[1])


def _bits(block, lead=(), seed=0, p=0.5):
    rng = np.random.default_rng(seed)
    bits = rng.random((*lead, *_grid(block))) < p
    bits[..., 0, 0] = True
    return bits


def _dense(seed=0, lead=()):
    """An element mask with full, empty and partial blocks at any block size."""
    rng = np.random.default_rng(seed)
    d = np.zeros((*lead, SQ, SK), bool)
    d[..., :64, :128] = True
    d[..., 128:, 64:] = rng.random((*lead, SQ - 128, SK - 64)) < 0.6
    return d


def _live(mask):
    """A NumPy DynamicMask made to look device-resident under the stub (once
    ``_DeviceDynamic`` is installed): its lists become torch views of the same memory (stable
    pointers, contents rewritten by ``update``), as a CuPy DynamicMask's are on a GPU."""
    host = mask.device_lists()
    mask.__dict__["_test_live"] = dataclasses.replace(host, **{
        f: torch.from_numpy(getattr(host, f)) for f in
        ("partial_count", "partial_idx", "full_count", "full_idx")})
    return mask


class _DeviceDynamic:
    """``DynamicMask.device_lists`` answers a ``_live`` mask's torch views."""

    def __init__(self, monkeypatch):
        real = masks.DynamicMask.device_lists

        def device_lists(mask):
            return mask.__dict__.get("_test_live") or real(mask)

        monkeypatch.setattr(masks.DynamicMask, "device_lists", device_lists)


def _mask(name, block, seed=0):
    sq, sk = SQ, SK
    if name == "bitset":
        return dm.BlockBitsetMask(_bits(block, seed=seed), sq, sk, block_size=block)
    if name == "bitset_batch":
        return dm.BlockBitsetMask(_bits(block, (B, 1), seed), sq, sk, block_size=block)
    if name == "bitset_heads":
        return dm.BlockBitsetMask(_bits(block, (1, H), seed), sq, sk, block_size=block)
    if name == "bcsr":
        return dm.BCSRMask.from_dense_mask(_dense(seed), block_size=block)
    if name == "mixed":
        return dm.MixedMask.from_dense_mask(_dense(seed, (B, H)), block_size=block)
    if name == "dynamic":
        return _live(dm.DynamicMask(_bits(block, (B, H), seed), sq, sk, block_size=block))
    if name == "and":
        return (dm.BlockBitsetMask(_bits(block, seed=seed), sq, sk, block_size=block)
                & dm.BCSRMask.from_dense_mask(_dense(seed + 1), block_size=block))
    if name == "causal_and_bitset":
        return dm.CausalMask(sq, sk) & dm.BlockBitsetMask(_bits(block, seed=seed), sq, sk,
                                                          block_size=block)
    if name == "dynamic_and_window":
        d = dm.DynamicMask(_bits(block, seed=seed), sq, sk, block_size=block)
        m = d & dm.WindowMask((90, 40), sq, sk)   # built (its build hooks run), then _live
        _live(d)
        return m
    raise AssertionError(name)


NAMES = ("bitset", "bitset_batch", "bitset_heads", "bcsr", "mixed", "dynamic", "and",
         "causal_and_bitset", "dynamic_and_window")
# (128, 128): the Hopper family (sm_90 preset); (64, 64) does not fit its 128-row CTAs: fwd_mma
BLOCKS = ((128, 128), (64, 64))


def _validated(args, m, **kw):
    """What the validated path launches for the call (its plans are never cached)."""
    kw = {"is_causal": False, "window_size": (-1, -1), "return_lse": False, **kw}
    dispatch.dense(*args, None, None, None, kw["is_causal"], kw["window_size"], 0.0, m,
                   kw["return_lse"], False, "auto")


def _sp_ptrs(launch):
    rec = tf._record(launch[3][0], "FwdParams")
    return [int(rec[f][0]) for f in SPARSE_INPUTS]


def _list_ptrs(m, like):
    _, block = sparse_plan.split_sparse(m)
    arrs = sparse_plan.device_lists(block, like)
    return [0 if a is None else a.data_ptr() for a in
            (arrs.full_count, arrs.full_idx, arrs.partial_count, arrs.partial_idx,
             arrs.partial_slot, arrs.partial_bits)]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lse", [False, True])
def test_block_mask_hits_launch_what_the_validated_path_builds(cap, monkeypatch, name, block,
                                                               lse):
    _DeviceDynamic(monkeypatch)
    args = _qkv()
    m = _mask(name, block)
    res0 = dm.flash_dmattn_func(*args, sparse_mask=m, return_lse=lse)
    first = cap.take()
    assert [x[0] for x in first] == ["slow"]
    hits = fastpath.HITS[0]
    res = dm.flash_dmattn_func(*args, sparse_mask=m, return_lse=lse)
    again = cap.take()
    assert [x[0] for x in again] == ["thin"] and fastpath.HITS[0] == hits + 1
    _validated(args, m, return_lse=lse)
    valid = cap.take()
    assert [x[0] for x in valid] == ["slow"]
    assert tf._masked(again, cap) == tf._masked(valid, cap) == tf._masked(first, cap)
    ptrs = _sp_ptrs(again[0])
    assert ptrs == _list_ptrs(m, args[0]) and ptrs[0] != 0
    assert (ptrs[4] != 0) == (name in ("mixed", "and"))   # partial_slot: a MixedMask's
    out = res[0] if lse else res
    rec = tf._record(again[0][3][0], "FwdParams")
    assert int(rec["o"][0]) == out.data_ptr() != (res0[0] if lse else res0).data_ptr()
    fam = again[0][1]
    assert fam == ("fwd_sm90" if block == (128, 128) else "fwd_mma")
    # without a window the Hopper forward's items run longest first per group of 128: a
    # fwd_order launch before each fwd_sm90 one (cap.take checks they match), one per call
    ordered = fam == "fwd_sm90" and max(rec["window_left"][0], rec["window_right"][0]) < 0
    assert len(cap.orders) == (3 if ordered else 0)
    items = -(-SQ // 128) * H * B
    assert all(o[2] == (-(-items // 128), 1, 1) for o in cap.orders)
    if name == "causal_and_bitset":
        assert (int(rec["window_left"][0]), int(rec["window_right"][0])) == (-1, 0)


def test_dynamic_mask_update_between_calls_is_seen(cap, monkeypatch):
    """The plan keeps the live buffers' pointers; ``update`` rewrites their contents, which
    the next hit reads at launch; the record equals the validated path's after the update."""
    _DeviceDynamic(monkeypatch)
    block = (128, 128)
    args = _qkv()
    m = _live(dm.DynamicMask(_bits(block, (B, H), 0), SQ, SK, block_size=block))
    dm.flash_dmattn_func(*args, sparse_mask=m)
    dm.flash_dmattn_func(*args, sparse_mask=m)
    before = cap.take()[1]
    assert before[0] == "thin"
    new = _bits(block, (B, H), 5, p=0.3)
    m.update(new)
    dm.flash_dmattn_func(*args, sparse_mask=m)
    after = cap.take()
    assert [x[0] for x in after] == ["thin"]
    assert _sp_ptrs(after[0]) == _sp_ptrs(before)      # same buffers
    _validated(args, m)
    assert tf._masked(after, cap) == tf._masked(cap.take(), cap)
    live = m.device_lists()
    assert live.full_count.data_ptr() == _sp_ptrs(after[0])[0]
    assert np.array_equal(live.full_count.numpy(), new.sum(-1))   # what the launch reads
    idx = live.full_idx.numpy()
    for b, h, r in np.ndindex(*new.shape[:3]):
        cols = np.flatnonzero(new[b, h, r])
        assert list(idx[b, h, r, :len(cols)]) == list(cols)


def test_masks_of_the_same_shapes_share_a_plan_not_its_pointers(cap):
    """Two immutable masks of one signature: one plan, each call patched with its own
    mask's lists (== the validated launch for that mask); list widths derived from contents
    are part of the signature (shapes), so a wider mask gets its own plan."""
    block = (64, 64)
    args = _qkv()
    full = np.ones(_grid(block), bool)
    sparse = np.zeros(_grid(block), bool)
    sparse[:, 0] = True
    m1 = dm.BlockBitsetMask(full, SQ, SK, block_size=block)
    m2 = dm.BlockBitsetMask(full.copy(), SQ, SK, block_size=block)  # same widths, other arrays
    m3 = dm.BlockBitsetMask(sparse, SQ, SK, block_size=block)       # narrower full_idx
    for m in (m1, m1, m2, m3, m3):
        dm.flash_dmattn_func(*args, sparse_mask=m)
    launches = cap.take()
    assert [x[0] for x in launches] == ["slow", "thin", "thin", "slow", "thin"]
    assert len(fastpath.forward_plans) == 2
    for launch, m in zip(launches, (m1, m1, m2, m3, m3), strict=True):
        assert _sp_ptrs(launch) == _list_ptrs(m, args[0])
        _validated(args, m)
        assert tf._masked([launch], cap) == tf._masked(cap.take(), cap)
    assert _sp_ptrs(launches[2]) != _sp_ptrs(launches[1])
    rec1, rec3 = (tf._record(launches[i][3][0], "FwdParams") for i in (1, 3))
    assert rec1["sp_full_width"][0] != rec3["sp_full_width"][0]


def test_lists_uploaded_into_a_private_pool_are_not_kept_on_the_mask(cap, monkeypatch):
    """Lists uploaded while torch routes allocations to a private pool (inductor's CUDA-graph
    warm-up) serve their call only: the thin path still serves the calls, each launching what
    the validated path builds, and nothing stays on the mask (neither the upload nor the thin
    path's token, which holds it)."""
    monkeypatch.setattr(sparse_plan, "upload_in_private_pool", lambda value: True)
    block = (64, 64)
    args = _qkv()
    m = dm.BlockBitsetMask(np.ones(_grid(block), bool), SQ, SK, block_size=block)
    for _ in range(3):
        dm.flash_dmattn_func(*args, sparse_mask=m)
    launches = cap.take()
    assert [x[0] for x in launches] == ["slow", "thin", "thin"]
    assert not m.__dict__.get("_dmattn_device_lists")
    assert not m.__dict__.get(fastpath._TOKEN_ATTR)
    assert all(_sp_ptrs(x)[1] for x in launches), "a launch without its full block list"
    _validated(args, m)
    monkeypatch.setattr(tf, "_FRESH", tf._FRESH + tf._SPARSE_FIELDS)   # uploads: per call
    assert tf._masked(launches[2:], cap) == tf._masked(cap.take(), cap)


def test_block_mask_calls_the_thin_path_cannot_prove_take_the_validated_path(cap,
                                                                              monkeypatch):
    """(Calls that want a gradient: test_fastpath_block_grad.py.)"""
    block = (128, 128)
    args = _qkv()
    m = _mask("bitset", block)
    miss = (None, None, None, False, (-1, -1), 0.0, False, False)

    def calls():
        for _ in range(2):
            dm.flash_dmattn_func(*args, sparse_mask=m)
        return [x[0] for x in cap.take()]

    # NumPy inputs
    qn = np.zeros((1, SQ, 2, 32), np.float32)
    assert fastpath.dense(qn, qn, qn, *miss, "auto", m) is fastpath.MISS
    # backend='reference' (the float64 reference applies the mask itself)
    assert fastpath.dense(*args, *miss, "reference", m) is fastpath.MISS
    # torch.compile tracing
    monkeypatch.setattr(fastpath, "_compiling", lambda: True)
    assert fastpath.dense(*args, *miss, "auto", m) is fastpath.MISS
    monkeypatch.undo()
    assert calls() == ["slow", "thin"]
    # a DynamicMask with host (NumPy) buffers: its lists are uploaded afresh every call
    dyn = dm.DynamicMask(_bits(block, seed=1), SQ, SK, block_size=block)
    assert fastpath.dense(*args, *miss, "auto", dyn) is fastpath.MISS
    for _ in range(2):
        dm.flash_dmattn_func(*args, sparse_mask=dyn)
    assert [x[0] for x in cap.take()] == ["slow", "slow"]
    # lists on another device than the query's
    fastpath.clear()
    other = _mask("bcsr", block)
    real = fastpath.describe
    lists = {a.data_ptr() for a in (sparse_plan.device_lists(other, args[0]).full_count,)}
    monkeypatch.setattr(fastpath, "describe", lambda x: dataclasses.replace(
        real(x), device=1) if x.data_ptr() in lists else real(x))
    assert fastpath.dense(*args, *miss, "auto", other) is fastpath.MISS
    monkeypatch.undo()
    # a DynamicMask & another block mask: the validated path's NotImplementedError, each call
    _DeviceDynamic(monkeypatch)
    bad = dm.DynamicMask(_bits(block, seed=2), SQ, SK, block_size=block) & m
    for _ in range(2):
        with pytest.raises(NotImplementedError, match="DynamicMask"):
            dm.flash_dmattn_func(*args, sparse_mask=bad)
    # a mask for other sequence lengths meets the validated path's error, each call
    short = dm.BlockBitsetMask(_bits((128, 128)), SQ, SK, block_size=(128, 128))
    qs = tf._rand(B, SQ - 8, H, D)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"sparse_mask is for \(seqlen_q, seqlen_k\)"):
            dm.flash_dmattn_func(qs, *args[1:], sparse_mask=short)


@pytest.mark.parametrize("grad", [False, True])
def test_block_mask_beside_attn_mask_at_d256_goes_dense(cap, monkeypatch, grad):
    """Head dim 256 takes no block lists beside an attn_mask (``forward_takes_lists``): the
    mask's exact elements ANDed into attn_mask, with a gradient or without (before, the no-grad
    call raised NotImplementedError), made afresh per call (the outer key is remembered as
    not the thin path's, so no plan slots the caller's attn_mask where the ANDed one belongs);
    the forward reads no lists and the ANDed mask."""
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "0")   # the ANDed mask read as its bytes
    d = 256
    q, k, v = (tf._rand(B, s, n, d, seed=i) for i, (s, n) in enumerate(((SQ, H), (SK, HK),
                                                                        (SK, HK))))
    attn = torch.rand(B, H, SQ, SK, generator=torch.Generator().manual_seed(3)) > 0.3
    m = _mask("bitset", (128, 128))
    want = np.asarray(m.to_dense(), dtype=bool) & attn.numpy()
    seen = []
    real = sparse_plan.dense_block_mask

    def spy(*a):
        seen.append(real(*a))
        return seen[-1]

    monkeypatch.setattr(sparse_plan, "dense_block_mask", spy)   # autograd's route
    monkeypatch.setattr(dispatch, "dense_block_mask", spy)      # the forward's
    for call in range(2):
        qq, kk, vv = (x.clone().requires_grad_(grad) for x in (q, k, v))
        dm.flash_dmattn_func(qq, kk, vv, attn_mask=attn, sparse_mask=m)
        fwd = [x for x in cap.take() if x[1] in ("fwd_mma", "fwd_sm90")]
        # (with a gradient the custom op's inner forward over the ANDed mask may take its
        # own cached plan, whose mask slot is that call's attn_mask: the ANDed one)
        assert [x[0] for x in fwd] == ["thin" if grad and call else "slow"], fwd
        rec = tf._record(fwd[0][3][0], "FwdParams")
        assert int(rec["sp_full_idx"][0]) == 0                      # no lists
        # the ANDed mask (its rows padded to 16 bytes for the Hopper maps: a copy of it)
        assert int(rec["mask"][0]) not in (0, attn.data_ptr())
        assert len(seen) == call + 1                                 # made per call
        assert np.array_equal(seen[-1].numpy(), want)
