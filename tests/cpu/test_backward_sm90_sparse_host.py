"""The Hopper backward with block lists, host half, without a GPU: DMATTN_SM90_BWD_SPARSE
gates them; block sizes that do not tile its 64 x 128 items and lists with partial blocks
(a MixedMask's element bits) stay on the portable kernels; run_backward launches the grid
kernel (sp_grid from the lists) before bwd_sm90, whose spec has no mask switch of its own
(the lists are the runtime field sp_grid)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts
from test_backward_sm90_host import _arrays, _pb

from dmattn_cupy import backward, backward_sm90, env, runtime, select
from dmattn_cupy.device import PRESETS
from dmattn_cupy.masks import BlockBitsetMask, MixedMask
from dmattn_cupy.sparse_plan import host_arrays

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

H100, A100 = PRESETS["sm_90"], PRESETS["sm_80"]




def _family(pb, sparse, partial=False, deterministic=False, dev=H100):
    return select.backward_family(pb, pb.q, deterministic, sparse, dev, partial)


def test_env_switch(monkeypatch):
    monkeypatch.delenv("DMATTN_SM90_BWD_SPARSE", raising=False)
    assert env.sm90_bwd_sparse()
    for val, on in (("1", True), ("0", False), ("", True)):
        monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", val)
        assert env.sm90_bwd_sparse() is on


def test_block_lists_are_taken_unless_switched_off(monkeypatch):
    monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    q, k, v = _arrays()
    pb = _pb(q, k, v)
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "0")
    for blk in ((64, 128), (128, 128)):   # switched off: the portable kernels
        assert _family(pb, blk) == "bwd_dkdv"
    assert _family(pb, False) == "bwd_sm90"
    monkeypatch.delenv("DMATTN_SM90_BWD_SPARSE")  # the default
    for blk in ((64, 128), (128, 128), (128, 256), (192, 384)):
        assert _family(pb, blk) == "bwd_sm90", blk
        assert _family(pb, blk, deterministic=True) == "bwd_sm90", blk
        assert _family(pb, blk, dev=A100) == "bwd_dkdv"
    # blocks that do not tile the 64 x 128 items, an unknown size: declined
    for blk in ((64, 64), (128, 64), (32, 128), (96, 128), (64, 192)):
        assert _family(pb, blk) == "bwd_dkdv", blk
        assert _family(pb, blk, partial=True) == "bwd_dkdv", blk
    assert _family(pb, True) == "bwd_dkdv"
    assert _family(dataclasses.replace(pb, varlen=True), (128, 128)) == "bwd_dkdv"
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_dkdv")
    assert _family(pb, (128, 128)) == "bwd_dkdv"


def test_block_lists_with_masks_biases_and_windows(monkeypatch):
    """What the kernel takes without lists it takes with them (the walk only skips items)."""
    monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "1")
    q, k, v = _arrays()
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    for mask in (None, np.ones((b, h, sq, sk), bool), np.ones((1, 1, 1, sk), bool)):
        for bias in (None, np.zeros((b, h, sq, sk), np.float16),
                     np.zeros((b, h, 1, sk), np.float16)):
            for causal in (False, True):
                pb = _pb(q, k, v, mask=mask, bias=bias, causal=causal)
                assert _family(pb, (128, 128)) == "bwd_sm90"
    # a bias the kernel declines (float32, not the query's dtype) stays declined with lists
    assert _family(_pb(q, k, v, bias=np.zeros((b, h, sq, sk), np.float32)), (128, 128)) == \
        "bwd_dkdv"
    assert backward_sm90.sparse_fits(False)
    assert not backward_sm90.sparse_fits((0, 128))


def _stub_runtime(monkeypatch, launched):
    monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    monkeypatch.setattr(backward_sm90, "encode", lambda spec, ptr: bytes(128))
    monkeypatch.setattr(runtime, "device_props", lambda device: H100)
    monkeypatch.setattr(runtime, "current_stream", lambda kind, device: "stream")
    monkeypatch.setattr(runtime, "get_kernel", lambda spec, device: spec)
    monkeypatch.setattr(runtime, "launch", lambda kern, grid, args, stream: launched.append(
        (kern, grid, args)))


def _bitset(sq, sk, block, heads=1, seed=0):
    rng = np.random.default_rng(seed)
    nrb, ncb = -(-sq // block[0]), -(-sk // block[1])
    bits = rng.random((1, heads, nrb, ncb)) < 0.4
    return BlockBitsetMask(bits, sq, sk, block)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("block", [(64, 128), (128, 256)])
def test_run_backward_launches_the_grid_before_the_hopper_kernel(monkeypatch, block,
                                                                 deterministic):
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "1")
    q, k, v = _arrays()
    mask = _bitset(200, 264, block, heads=4)
    sparse = host_arrays(mask)
    assert sparse.partial_slot is None
    pb = _pb(q, k, v)
    before = backward.launches["bwd_sm90"]
    backward.run_backward(pb, np.zeros_like(q), q, k, v, np.zeros_like(q),
                          np.zeros((2, 4, 200), np.float32), deterministic=deterministic,
                          sparse=sparse)
    assert backward.launches["bwd_sm90"] == before + 1
    # the default mode ranks bwd_sm90's CTAs longest first (bwd_order: a CTA per 128) after
    # the grid
    order = [] if deterministic else ["bwd_order"]
    assert [x[0].family for x in launched] == ["bwd_pre", "bwd_grid", *order, "bwd_sm90",
                                               "bwd_post"]
    nrb, ncg = -(-200 // block[0]), -(-264 // block[1])
    assert launched[1][1] == (nrb, 4, 1)   # one CTA per (row block, mask head, mask batch)
    spec, grid, (rec, args) = launched[-2]
    if order:
        assert launched[2][1] == (1, 1, 1) and launched[2][2][0].tobytes() == rec.tobytes()
        # the permutation of the 3 x 2 x 2 CTAs follows the grid in sp_grid's buffer
        assert int(rec["sp_order"]) == int(rec["sp_grid"]) + 4 * (4 * nrb * ncg)
    else:
        assert int(rec["sp_order"]) == 0
    assert spec.family == "bwd_sm90" and not spec.has_mask and grid == (3, 2, 2)
    # the grid kernel fills the sp_grid that bwd_sm90 then reads: one record for both
    assert launched[1][2][0].tobytes() == rec.tobytes()
    assert rec["sp_grid_cols"] == ncg
    assert (rec["sp_block_m"], rec["sp_block_n"]) == block
    assert (rec["sp_batches"], rec["sp_heads"], rec["sp_row_blocks"]) == (1, 4, nrb)
    assert (int(args["dq_sem"]) != 0) == deterministic


def test_run_backward_sends_partial_blocks_beside_a_mask_and_unfit_blocks_to_the_portable_kernels(
        monkeypatch):
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "1")
    q, k, v = _arrays()
    pb = _pb(q, k, v)
    masked = _pb(q, k, v, mask=np.ones((2, 4, 200, 264), bool))
    lse = np.zeros((2, 4, 200), np.float32)
    dense = np.random.default_rng(1).random((200, 264)) < 0.5
    mixed = host_arrays(MixedMask.from_dense_mask(dense, (64, 128)))
    assert mixed.partial_slot is not None
    unfit = host_arrays(_bitset(200, 264, (128, 64)))
    for problem, sparse in ((masked, mixed), (pb, unfit)):
        launched.clear()
        backward.run_backward(problem, np.zeros_like(q), q, k, v, np.zeros_like(q), lse,
                              sparse=sparse)
        assert [x[0].family for x in launched] == ["bwd_pre", "bwd_grid", "bwd_dkdv",
                                                   "bwd_post"]
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "0")  # switched off: every list portable
    launched.clear()
    backward.run_backward(pb, np.zeros_like(q), q, k, v, np.zeros_like(q), lse,
                          sparse=host_arrays(_bitset(200, 264, (128, 128))))
    assert [x[0].family for x in launched] == ["bwd_pre", "bwd_grid", "bwd_dkdv", "bwd_post"]


def test_longest_first_order_only_where_the_grid_order_is_free(monkeypatch):
    """backward.order_items: the default mode of the Hopper backward without a window ranks
    its CTAs (ceil(Sk / 128) x kv heads x batch, in groups of ORDER_GROUP); the deterministic
    mode (tickets ordered by key tile), a window (causal's own longest-first remap), the
    portable family and DMATTN_SM90_BWD_ORDER=0 keep the grid order."""
    monkeypatch.delenv("DMATTN_SM90_BWD_ORDER", raising=False)
    q, k, v = _arrays()   # Sk 264: 3 key tiles, 2 kv heads, batch 2
    pb = _pb(q, k, v)
    assert backward.order_items(pb, "bwd_sm90", False) == 3 * 2 * 2
    assert backward.order_items(pb, "bwd_sm90", True) == 0
    assert backward.order_items(pb, "bwd_dkdv", False) == 0
    assert backward.order_items(_pb(q, k, v, causal=True), "bwd_sm90", False) == 0
    big = dataclasses.replace(pb, batch=backward.ORDER_GROUP * 100)
    assert backward.order_items(big, "bwd_sm90", False) == 3 * 2 * backward.ORDER_GROUP * 100
    monkeypatch.setenv("DMATTN_SM90_BWD_ORDER", "0")
    assert backward.order_items(pb, "bwd_sm90", False) == 0


def test_order_constants_mirror_the_kernel():
    """The host's group (one bwd_order CTA per ORDER_GROUP CTAs) and key tile are the
    kernel's (bwd_params.cuh kSpOrderGroup, kSpOrderTileN)."""
    compile_static_asserts(
        '#include "bwd_params.cuh"\n'
        f"static_assert(kSpOrderGroup == {backward.ORDER_GROUP});\n"
        f"static_assert(kSpOrderTileN == {backward_sm90.BLOCK_N});\n",
        "bwd_order_constants.cu")


def test_partial_blocks_are_taken_without_a_mask(monkeypatch):
    """Lists with partial blocks of a size that tiles the items run on bwd_sm90 without a
    mask (beside a mask, or with DMATTN_SM90_BWD_SPARSE=0, they do not)."""
    monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    monkeypatch.delenv("DMATTN_SM90_BWD_SPARSE", raising=False)
    q, k, v = _arrays()
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    pb, masked = _pb(q, k, v), _pb(q, k, v, mask=np.ones((b, h, sq, sk), bool))
    for blk in ((64, 128), (128, 256)):
        assert _family(pb, blk, partial=True) == "bwd_sm90", blk
        assert _family(pb, blk, partial=True, deterministic=True) == "bwd_sm90", blk
        assert _family(_pb(q, k, v, bias=np.zeros((b, h, sq, sk), np.float16), causal=True),
                       blk, partial=True) == "bwd_sm90", blk
        assert _family(masked, blk, partial=True) == "bwd_dkdv", blk
    assert _family(pb, (128, 64), partial=True) == "bwd_dkdv"
    assert _family(masked, (128, 128)) == "bwd_sm90"   # full-block lists beside a mask: as before
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "0")
    assert _family(pb, (128, 128), partial=True) == "bwd_dkdv"


def test_run_backward_sends_partial_blocks_to_the_listed_bits_spec(monkeypatch):
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    monkeypatch.setenv("DMATTN_SM90_BWD_SPARSE", "1")
    q, k, v = _arrays()
    dense = np.random.default_rng(1).random((200, 264)) < 0.5
    mixed = host_arrays(MixedMask.from_dense_mask(dense, (64, 128)))
    backward.run_backward(_pb(q, k, v), np.zeros_like(q), q, k, v, np.zeros_like(q),
                          np.zeros((2, 4, 200), np.float32), sparse=mixed)
    assert [x[0].family for x in launched] == ["bwd_pre", "bwd_grid", "bwd_order", "bwd_sm90",
                                               "bwd_post"]
    spec, _, (rec, _) = launched[-2]
    assert spec.has_mask and spec.sparse and not spec.has_bias
    assert spec.name_expression.endswith(", true, false, false, true>")
    assert int(rec["mask"]) == 0   # the kernel reads the bits where a mask's bytes would be
    launched.clear()   # full-block lists: the plain spec
    full = host_arrays(MixedMask.from_dense_mask(np.ones((200, 264), bool), (64, 128)))
    backward.run_backward(_pb(q, k, v), np.zeros_like(q), q, k, v, np.zeros_like(q),
                          np.zeros((2, 4, 200), np.float32), sparse=full)
    spec = launched[-2][0]
    assert spec.family == "bwd_sm90" and not spec.has_mask and not spec.sparse


def _listed_row_word(slot, bm, bn, m, n):
    return slot * (bm // 32) * bn + (m * bn + n) // 32


def test_listed_bits_helpers_match_the_model():
    """bwd.cu's row word of a partial block (the row-major layout of MixedMask.partial_bits:
    element (m, n) is bit n % 32 of word (m * bn + n) // 32 of its slot)."""
    rng = np.random.default_rng(4)
    checks = []
    for bm, bn in [(64, 128), (128, 128), (192, 256), (1024, 384)]:
        for _ in range(5):
            slot, m = int(rng.integers(0, 3000)), int(rng.integers(0, bm))
            n = 64 * int(rng.integers(0, bn // 64))  # a mask warp's key half
            checks.append(f"static_assert(dm::bwd_listed_row_word({slot}, {bm}, {bn}, {m}, {n}) "
                          f"== {_listed_row_word(slot, bm, bn, m, n)}ll, \"row word\");")
    compile_static_asserts('#include "sm90/bwd.cu"\n' + "\n".join(checks) + "\n",
                           "bwd_listed_bits.cu")
    # the model against MixedMask's own words
    dense = rng.random((256, 384)) < 0.5
    mask = MixedMask.from_dense_mask(dense, (128, 128))
    slot = int(mask.partial_slot[1, 2])
    assert slot >= 0
    words = mask.partial_bits.reshape(-1)
    for m in (0, 5, 127):
        for n0 in (0,):
            w = int(words[_listed_row_word(slot, 128, 128, m, n0) + 1])  # keys n0 + 32 ..
            got = [(w >> e) & 1 for e in range(32)]
            assert got == [int(x) for x in dense[128 + m, 256 + 32: 256 + 64]]
