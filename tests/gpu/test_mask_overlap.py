"""The attn_mask route's packing overlapped with its forward (DMATTN_MASK_ROUTE=overlap here): a
mask of its own per (batch, head) with 16-byte aligned rows is packed by a few CTAs
(mask_rows) while the Hopper forward, launched programmatically behind them, waits per work
item for its block row's lists. Against the float64 reference (no bias, a full bias, a key-row
bias; causal and window bounds; empty, full and partial blocks, fully masked rows; a row tail
read byte by byte); bit for bit the two-launch route's result (the same lists, the same
forward) with one packing CTA (the forward waits on nearly every item), with plain launches
(DMATTN_PDL=0) and with a CTA per block row; repeated cached calls leave every ready word zero;
layouts it does not take keep the two launches; a captured call replays like eager."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64
from test_mask_route import B, D, H, _bias, _keep, _qkv, _run

import dmattn_cupy as dm
from dmattn_cupy import fastpath, scratch

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]

OVERLAP = {"mask_rows", "fwd_sm90"}
TWO_LAUNCHES = {"mask_pack", "mask_lists"}


@pytest.fixture(autouse=True)
def overlap_on(monkeypatch):
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "overlap")


def _mask(sq: int, sk: int, seed: int, pitch: int | None = None, lead=(B, H)):
    """(the attn_mask given, its values); ``pitch``: rows that many bytes apart."""
    keep = _keep(lead, sq, sk, seed)
    if pitch is None:
        return torch.from_numpy(keep).cuda(), keep
    big = torch.zeros(*lead, sq, pitch, dtype=torch.bool)
    big[..., :sk] = torch.from_numpy(keep)
    return big.cuda()[..., :sk], keep


@pytest.mark.parametrize("bias_kind", ["none", "full", "key_row"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 30)], ids=["full", "causal",
                                                                          "window"])
@pytest.mark.parametrize("sq,sk,pitch", [(300, 528, None), (512, 512, None),
                                         (129, 1008, None), (300, 520, 528)],
                         ids=["tail16", "even", "one_row", "byte_tail"])
def test_overlap_matches_the_reference(sq, sk, pitch, window, bias_kind, monkeypatch):
    dtype = "bfloat16"
    seed = sq + sk + window[0] + len(bias_kind)
    q, k, v = _qkv(sq, sk, dtype, seed)
    mask, keep = _mask(sq, sk, seed, pitch)
    # a full bias needs 16-byte rows (a tensor map's rule): Sk 520 takes a key row instead
    kind = "key_row" if bias_kind == "full" and 2 * sk % 16 else bias_kind
    bias = _bias(kind, sq, sk, dtype, seed + 1)
    out, lse, fams = _run(monkeypatch, q, k, v, mask, bias, window_size=window)
    assert OVERLAP <= fams and not fams & TWO_LAUNCHES, fams
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=keep, bias=f64(bias),
                                   scale=D ** -0.5, window=window), dtype)
    assert np.all(np.isneginf(f64(lse)[:, :, 7])) and np.all(f64(out)[:, 7] == 0)


@pytest.mark.parametrize("env", [{}, {"DMATTN_MASK_OVERLAP_CTAS": "1"}, {"DMATTN_PDL": "0"},
                                 {"DMATTN_MASK_OVERLAP_CTAS": "100000"}],
                         ids=["default", "one_cta", "plain_launch", "cta_per_row"])
@pytest.mark.parametrize("density", [0.85, 0.02], ids=["dense", "sparse"])
def test_overlap_equals_the_two_launch_route(env, density, monkeypatch):
    """B2 H16 S1024 d128, a mask of its own per pair beside a full bias: out and lse equal the
    two-launch route's bit for bit (same lists, same forward kernel), also where one packing
    CTA makes the forward wait on nearly every item; a document-like sparse mask (most blocks
    empty) too."""
    b, h, s, dtype = 2, 16, 1024, "bfloat16"
    q, k, v = _qkv(s, s, dtype, 31, b=b, h=h, hk=h)
    rng = np.random.default_rng(32)
    keep = rng.random((b, h, s, s)) < 0.85
    if density < 0.5:   # 128-key documents: only the diagonal blocks hold kept keys
        doc = np.arange(s) // 128
        keep &= doc[:, None] == doc[None, :]
    mask = torch.from_numpy(keep).cuda()
    bias = _bias("full", s, s, dtype, 33, b=b, h=h)
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "1")
    want_out, want_lse, fams = _run(monkeypatch, q, k, v, mask, bias)
    assert TWO_LAUNCHES <= fams and "mask_rows" not in fams, fams
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "overlap")
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    for i in range(3):   # the validated call, then cached ones
        hits = fastpath.HITS[0]
        out, lse, fams = _run(monkeypatch, q, k, v, mask, bias)
        if i == 0:
            assert OVERLAP <= fams and not fams & TWO_LAUNCHES, fams
        else:
            assert fastpath.HITS[0] == hits + 1 and not fams
        assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_overlap_leaves_its_ready_words_zero(monkeypatch):
    """Cached calls run on one kept counter buffer of a word per work item: after each call
    every word is zero again (the forward reset each), and a new mask in the same buffer is
    packed and read (out follows the mask)."""
    sq, sk, dtype = 384, 512, "bfloat16"
    q, k, v = _qkv(sq, sk, dtype, 41)
    bias = _bias("full", sq, sk, dtype, 42)
    mask, keep = _mask(sq, sk, 43)
    outs = []
    for i in range(4):
        if i == 2:   # the same buffer, new values
            keep = _keep((B, H), sq, sk, 44, p=0.5)
            mask.copy_(torch.from_numpy(keep).cuda())
        hits = fastpath.HITS[0]
        out, lse, fams = _run(monkeypatch, q, k, v, mask, bias)
        assert OVERLAP <= fams if i == 0 else fastpath.HITS[0] == hits + 1, fams
        words = [buf for key, buf in scratch._counters.items()
                 if key[0][-1] == "mask_ready" and buf.numel() == B * H * 3]
        assert len(words) == 1 and int(words[0].abs().sum()) == 0
        assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=keep, bias=f64(bias),
                                       scale=D ** -0.5), dtype)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[2], outs[3])
    assert not torch.equal(outs[1], outs[2])


def test_overlap_declines_shared_and_unaligned_masks(monkeypatch):
    """A mask shared by the heads, and one whose rows are not 16-byte aligned, take the two
    packing launches (the route as under ``1``) and agree with the reference."""
    sq, sk, dtype = 300, 528, "bfloat16"
    q, k, v = _qkv(sq, sk, dtype, 51)
    bias = _bias("full", sq, sk, dtype, 52)
    for mask, keep in (_mask(sq, sk, 53, lead=(B, 1)), _mask(sq, sk, 54, pitch=sk + 4)):
        out, lse, fams = _run(monkeypatch, q, k, v, mask, bias)
        assert TWO_LAUNCHES <= fams and "mask_rows" not in fams, fams
        assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=keep,
                                       bias=f64(bias), scale=D ** -0.5), dtype)


def test_overlap_captured_in_a_cuda_graph():
    """A call on the overlapped route captured by torch.cuda.graph (packing and forward from its
    cached plan, the ready words a zero-filled buffer of the graph's): replay equals eager bit
    for bit, also after its inputs change in place (the replay repacks the new mask)."""
    from test_graphs import _replay_matches_eager

    sq, sk = 300, 528
    q, k, v = _qkv(sq, sk, "bfloat16", 61)
    mask, _ = _mask(sq, sk, 62)
    bias = _bias("full", sq, sk, "bfloat16", 63)

    def fn():
        return dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias)

    _replay_matches_eager(fn, [q, k, v, mask, bias])
