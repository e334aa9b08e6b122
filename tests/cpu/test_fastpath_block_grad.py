"""Autograd with block sparse masks on the thin launch path, on the CPU with the GPU stubbed
(test_fastpath's ``cap`` fixture: CPU torch tensors pose as CUDA device 0, launches captured
byte for byte).

The property: a fwd+bwd step with a block mask served by the cached plans launches exactly
what the validated autograd path (``autograd.dense``: the custom ops, ``run_forward`` /
``run_backward`` with the lists) launches for the same call, list pointers included, for both
backward families (bwd_sm90 walking the lists, the portable bwd_dkdv with its bwd_grid); a
DynamicMask's lists are copied at the forward (an ``update()`` before ``backward()`` changes
neither the gradient's lists nor its launches); calls the thin path cannot serve go to the
validated path and still launch what it builds."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import test_fastpath as tf  # noqa: E402  (tests/cpu is on sys.path: pytest's rootdir import)
import test_fastpath_block as tb  # noqa: E402

import dmattn_cupy as dm  # noqa: E402
from dmattn_cupy import autograd, backward_sm90, fastpath, forward_sm90, sparse_plan  # noqa: E402
from dmattn_cupy.layout import SPARSE_INPUTS  # noqa: E402

cap = tf.cap   # the fixture
B, SQ, SK, H, HK, D = tb.B, tb.SQ, tb.SK, tb.H, tb.HK, tb.D
# pointers of buffers a step allocates (its outputs, workspaces, sp_grid and the CTA order
# after it, a DynamicMask's copies) and of the forward's outputs the backward reads; dlse: the
# custom op's autograd materializes a zero gradient for its lse output, the thin path's
# Function has no such output (without return_lse) and passes none (dsum = rowsum(dO * O) - 0
# either way)
_PER_STEP = ("o", "lse", "sp_grid", "sp_order", "dlse")
_DQA = slice(128 * backward_sm90.MAP_NAMES.index("dqa"), 128 * backward_sm90.MAP_NAMES.index(
    "dqa") + 128)
_SEM = slice(backward_sm90.DQ_SEM_OFFSET, backward_sm90.DQ_SEM_OFFSET + 8)


@pytest.fixture(autouse=True)
def kernel_device(monkeypatch):
    """The custom-op route on the stub sees its CPU tensors as the CUDA kernels' (else it
    would take the reference's dense fallback)."""
    monkeypatch.setattr(autograd, "_kernel_device", lambda query, backend: backend != "reference")


def _comparable(launches, cap, lists_too=True, also=()):
    """``tf._masked`` plus the per-step pointers (``_PER_STEP``; with ``lists_too`` the
    lists' too) and, for bwd_sm90, the tensor map over the fresh workspace."""
    res = []
    for fam, grid, smem, raw, rest in tf._masked(launches, cap):
        params = "BwdParams" if fam.startswith("bwd") else "FwdParams"
        rec = tf._record(raw, params)
        for f in _PER_STEP + (SPARSE_INPUTS if lists_too else ()) + also:
            if f in rec.dtype.names:
                rec[f] = 0
        if fam == "bwd_sm90":
            args = bytearray(rest[0])
            args[_DQA] = bytes(128)
            args[_SEM] = bytes(8)
            rest = (bytes(args),) + rest[1:]
        if fam == "fwd_sm90" and "mask" in also:  # the map over a per-call copy of the mask
            args = bytearray(rest[0])
            at = 128 * forward_sm90.MAP_NAMES.index("mask")
            args[at:at + 128] = bytes(128)
            rest = (bytes(args),) + rest[1:]
        res.append((fam, grid, smem, rec.tobytes(), rest))
    return res


def _ptrs(launch, fields=SPARSE_INPUTS):
    params = "BwdParams" if launch[1].startswith("bwd") else "FwdParams"
    rec = tf._record(launch[3][0], params)
    if params == "BwdParams":
        return [int(rec[f][0]) for f in fields]
    return [int(rec[f][0]) for f in fields]


def _inputs(bias: bool, seed=0):
    q, k, v = (x.requires_grad_() for x in tb._qkv(seed))
    b = tf._rand(B, H, SQ, SK, seed=seed + 7).requires_grad_() if bias else None
    return q, k, v, b


def _thin_step(q, k, v, b, m, dout, lse=False):
    leaves = tuple(x for x in (q, k, v, b) if x is not None)
    res = dm.flash_dmattn_func(q, k, v, attn_bias=b, sparse_mask=m, return_lse=lse)
    out = res[0] if lse else res
    return out, torch.autograd.grad(out, leaves, dout)


def _validated_step(q, k, v, b, m, dout):
    """The custom-op route (what every such call took before): run_forward / run_backward."""
    leaves = tuple(x for x in (q, k, v, b) if x is not None)
    out = autograd.dense(q, k, v, None, b, None, False, (-1, -1), 0.0, m, False, False, "auto")
    return out, torch.autograd.grad(out, leaves, dout)


FAMILIES = {"sm90": {}, "sm90_lists_off": {"DMATTN_SM90_BWD_SPARSE": "0"},
            "dkdv": {"DMATTN_BWD_FAMILY": "bwd_dkdv"}}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", tb.NAMES)
def test_block_mask_steps_hit_and_launch_what_the_validated_path_builds(cap, monkeypatch, name,
                                                                        bias, family):
    tb._DeviceDynamic(monkeypatch)
    for var, val in FAMILIES[family].items():
        monkeypatch.setenv(var, val)
    block = (128, 128)
    m = tb._mask(name, block)
    q, k, v, b = _inputs(bias)
    dout = tf._rand(B, SQ, H, D, seed=9)
    _thin_step(q, k, v, b, m, dout)
    first = cap.take()
    assert {x[0] for x in first} == {"slow"}
    hits = list(fastpath.HITS)
    out, grads = _thin_step(q, k, v, b, m, dout)
    again = cap.take()
    assert {x[0] for x in again} == {"thin"}
    assert fastpath.HITS == [hits[0] + 1, hits[1] + 1]
    _validated_step(q, k, v, b, m, dout)
    valid = cap.take()
    assert {x[0] for x in valid} == {"slow"}
    dynamic = "dynamic" in name
    assert _comparable(again, cap, dynamic) == _comparable(valid, cap, dynamic) == \
        _comparable(first, cap, dynamic)
    fams = [x[1] for x in again]
    lists = _ptrs(again[0])
    assert lists[0] != 0 and all(_ptrs(x) == lists for x in again if x[1] != "bwd_post")
    live = tb._list_ptrs(m, q)
    assert (lists == live) != dynamic        # a DynamicMask's: this step's copies
    if b is not None:
        assert grads[3].shape == b.shape
    want = "bwd_dkdv" if family != "sm90" else "bwd_sm90"
    assert want in fams and fams[1:3] == ["bwd_pre", "bwd_grid"]
    if want == "bwd_sm90":   # partial blocks (an `&` of block masks has none): listed bits
        specs = [s for s in cap.specs.values() if s.family == want]
        assert specs and all(s.sparse == s.has_mask == (name == "mixed") for s in specs)
    assert fams[-1] == "bwd_post"
    rec = tf._record(again[-1][3][0], "BwdParams")
    assert int(rec["dq"][0]) == grads[0].data_ptr() and int(rec["o"][0]) == out.data_ptr()
    grid = [x for x in again if x[1] == "bwd_grid"][0]
    sp_grid = int(tf._record(grid[3][0], "BwdParams")["sp_grid"][0])
    main = [x for x in again if x[1] == want][0]
    assert sp_grid != 0 and int(tf._record(main[3][0], "BwdParams")["sp_grid"][0]) == sp_grid
    # without a window, bwd_sm90's longest-first order (bwd_order) lives after the grid, in
    # this step's buffer
    main_rec = tf._record(main[3][0], "BwdParams")
    ordered = want == "bwd_sm90" and max(main_rec["window_left"][0],
                                         main_rec["window_right"][0]) < 0
    sp_order = int(main_rec["sp_order"][0])
    assert (sp_order > sp_grid) if ordered else sp_order == 0
    assert ("bwd_order" in fams) == ordered
    entry, = (e for e in fastpath.forward_plans.values() if e is not None and e.bwd)
    bwd_plan = next(iter(entry.bwd.values())).plan      # every list and sp_grid patched
    assert set(SPARSE_INPUTS) | {"sp_grid"} <= set(bwd_plan.slots)
    assert bwd_plan.allocs[-1].name == "sp_grid" and not bwd_plan.allocs[-1].zero


def test_dynamic_mask_update_before_backward_keeps_the_forward_s_lists(cap, monkeypatch):
    """The step's copy of the lists is what both its forward and its backward read; an
    ``update()`` between them reaches neither (as on the validated path)."""
    tb._DeviceDynamic(monkeypatch)
    block = (128, 128)
    old = tb._bits(block, (B, H), 0)
    m = tb._live(dm.DynamicMask(old, SQ, SK, block_size=block))
    q, k, v, _ = _inputs(False)
    dout = tf._rand(B, SQ, H, D, seed=9)
    _thin_step(q, k, v, None, m, dout)
    cap.take()

    def step(route):
        out = route()
        fwd = cap.take()
        m.update(tb._bits(block, (B, H), 3, p=0.3))    # between forward and backward
        grads = torch.autograd.grad(out, (q, k, v), dout)
        bwd = cap.take()
        m.update(old)
        return out, grads, fwd, bwd

    out, _, fwd, bwd = step(lambda: dm.flash_dmattn_func(q, k, v, sparse_mask=m))
    assert {x[0] for x in fwd + bwd} == {"thin"}
    lists = out.grad_fn.call.sparse            # the step's copies, held until the backward
    want = [x.data_ptr() for x in (lists.full_count, lists.full_idx, lists.partial_count,
                                   lists.partial_idx)] + [0, 0]
    assert _ptrs(fwd[0]) == want and all(_ptrs(x) == want for x in bwd if x[1] != "bwd_post")
    assert want[:4] != tb._list_ptrs(m, q)[:4]
    assert np.array_equal(lists.full_count.numpy(), old.sum(-1))
    _, _, vfwd, vbwd = step(lambda: autograd.dense(q, k, v, None, None, None, False, (-1, -1),
                                                   0.0, m, False, False, "auto"))
    assert _comparable(fwd + bwd, cap) == _comparable(vfwd + vbwd, cap)


def test_masks_of_one_signature_share_the_step_s_plans_not_their_lists(cap):
    block = (128, 128)
    full = np.ones(tb._grid(block), bool)
    m1 = dm.BlockBitsetMask(full, SQ, SK, block_size=block)
    m2 = dm.BlockBitsetMask(full.copy(), SQ, SK, block_size=block)
    q, k, v, _ = _inputs(False)
    dout = tf._rand(B, SQ, H, D, seed=9)
    paths = []
    for m in (m1, m1, m2):
        _thin_step(q, k, v, None, m, dout)
        launched = cap.take()
        paths.append({x[0] for x in launched})
        assert all(_ptrs(x) == tb._list_ptrs(m, q) for x in launched if x[1] != "bwd_post")
    assert paths == [{"slow"}, {"thin"}, {"thin"}]
    # without a gradient the same mask has its own forward plan (the key tells them apart)
    dm.flash_dmattn_func(q.detach(), k.detach(), v.detach(), sparse_mask=m1)
    assert [x[0] for x in cap.take()] == ["slow"]


def test_lse_output_with_a_block_mask(cap):
    block = (128, 128)
    m = tb._mask("bitset", block)
    q, k, v, _ = _inputs(False)
    dout, dlse = tf._rand(B, SQ, H, D, seed=9), tf._rand(B, H, SQ, seed=10).float()
    for _ in range(2):
        out, lse = dm.flash_dmattn_func(q, k, v, sparse_mask=m, return_lse=True)
        assert type(out.grad_fn).__name__ == "_AttentionLseBackward"
        torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    launched = cap.take()
    assert [x[0] for x in launched[-5:]] == ["thin"] * 5
    rec = tf._record(launched[-1][3][0], "BwdParams")
    assert int(rec["dlse"][0]) == dlse.data_ptr()
    assert _ptrs(launched[-1]) == tb._list_ptrs(m, q)


def test_steps_the_thin_path_cannot_serve_take_the_validated_path(cap, monkeypatch):
    """Lists that do not tile the backward (the dense form goes into attn_mask: remembered as
    the validated path's), a DynamicMask with host buffers, a DynamicMask ``&`` another block
    mask (the validated path's error, every call): each step's forward is the custom op's
    (over the dense form it reuses the op's own plan of that signature, as its backward, the
    functional one, does) and launches what the custom-op route launches."""
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "0")   # the dense form read as the mask's bytes
    q, k, v, _ = _inputs(False)
    dout = tf._rand(B, SQ, H, D, seed=9)
    blocks = [(32, 64), (64, 32)]
    fits = [sparse_plan.lists_fit(bl, "bfloat16", D, False) for bl in blocks]
    assert fits == [False, False]
    seen = False   # both block sizes give the op's forward one dense-form signature
    for block in blocks:
        m = tb._mask("bitset", block)
        for _ in range(2):
            hits = fastpath.HITS[0]
            _thin_step(q, k, v, None, m, dout)
            thin = cap.take()
            # the op's own plan from the second step on, never a block-list plan
            assert thin[0][0] == ("thin" if seen else "slow")
            assert fastpath.HITS[0] == hits + seen
            seen = True
            rec = tf._record(thin[0][3][0], "FwdParams")
            assert int(rec["mask"][0]) != 0 and _ptrs(thin[0])[0] == 0   # the dense form
            _validated_step(q, k, v, None, m, dout)    # (a fresh dense form per call)
            assert _comparable(thin, cap, also=("mask",)) == \
                _comparable(cap.take(), cap, also=("mask",))
    dyn = dm.DynamicMask(tb._bits((128, 128), seed=1), SQ, SK, block_size=(128, 128))
    for _ in range(2):
        hits = fastpath.HITS[0]
        _thin_step(q, k, v, None, dyn, dout)
        thin = cap.take()
        assert thin[0][0] == "slow" and fastpath.HITS[0] == hits
        _validated_step(q, k, v, None, dyn, dout)
        assert _comparable(thin, cap, True) == _comparable(cap.take(), cap, True)
    tb._DeviceDynamic(monkeypatch)
    bad = tb._live(dm.DynamicMask(tb._bits((128, 128), seed=2), SQ, SK, block_size=(128, 128))
                   ) & tb._mask("bitset", (128, 128))
    for _ in range(2):
        with pytest.raises(NotImplementedError, match="DynamicMask"):
            _thin_step(q, k, v, None, bad, dout)
