"""The split decode's combine inside its own grid (``DM_DECODE_FUSED_COMBINE=1``, an A/B
define of fwd_decode.cu that decode.py reads): one launch, the last CTA of each (batch, kv
head, m block) group merging the group's partials, against the float64 reference; the group
counters left zero call after call; close to the two-launch path; a CUDA graph's replay equal
to eager. The rest of test_decode.py also runs under the define (NOTES: the A/B call)."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import f64
from test_decode import _check_varlen, _layout, _varlen, split37_case
from test_kvcache import record_launch_families

import dmattn_cupy as dm
from dmattn_cupy import scratch

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

FUSED = "DM_DECODE_FUSED_COMBINE=1"


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    monkeypatch.setenv("DMATTN_DECODE", "1")
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", FUSED)


def _counters_zero():
    torch.cuda.synchronize()
    kept = [c for key, c in scratch._counters.items() if key[0][0] == "torch"]
    assert kept and all(not bool(c.any()) for c in kept)


@pytest.mark.parametrize("splits", ["2", "13", "37"], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("len_q", [1, 4], ids=lambda n: f"lq{n}")
def test_one_launch_matches_the_reference(splits, len_q, monkeypatch):
    """Sequences of different lengths (one empty: its m blocks return before counting; with 4
    queries x 4 heads a sequence of 1 query has one m block of 2), a key range no split keeps,
    a head that keeps nothing; one launch per call, the counters zero after each."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", splits)
    h, hk = 8, 2
    lens_q = [len_q, 1, len_q, 0 if len_q > 1 else 1]
    lens_k = [4100, 700, 2500, 65]
    tq, tk = sum(lens_q), sum(lens_k)
    mask = _layout("mask", "k", h, tq, tk, max(lens_k), 91)
    mask[1000:3000] = False
    mask[4800:, 5] = False
    bias = _layout("bias", "k", hk, tq, tk, max(lens_k), 92)
    families = record_launch_families(monkeypatch)   # the validated call's launches
    for _ in range(3):                                # then the cached plan's
        _check_varlen(lens_q, lens_k, h, hk, d=128, mask=mask, bias=bias, seed=93)
        _counters_zero()
    assert families == ["fwd_decode"], families


def test_close_to_the_two_launch_path(monkeypatch):
    """The same call with and without the define: out within a few bf16 units (the merge sums
    the splits in another order), lse within float32 rounding."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "37")
    run, _ = split37_case()
    res = []
    for defines in (FUSED, ""):
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
        res.append(run())
    (o1, l1), (o2, l2) = res
    assert torch.allclose(o1.float(), o2.float(), rtol=0, atol=2e-2)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-5)


def test_nan_and_dropped_rows(monkeypatch):
    """A NaN key in one split makes its rows NaN (the merge's max is NaN-aware); a sequence
    whose mask keeps nothing gets out 0 and lse -inf."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "8")
    h, hk = 4, 2
    lens_q, lens_k = [1, 1], [2048, 1024]
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, h, hk, 128, 95)
    k[700, 0, 3] = float("nan")                      # sequence 0, kv head 0
    mask = torch.ones(sum(lens_k), h, dtype=torch.bool, device="cuda")
    mask[2048:] = False                              # sequence 1 keeps nothing
    out, lse = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lens_k),
                                           attn_mask=mask, return_lse=True)
    o, ls = f64(out), f64(lse)
    assert np.isnan(o[0, :2]).all() and np.isfinite(o[0, 2:]).all()
    assert (o[1] == 0).all() and np.isneginf(ls[:, 1]).all()
    _counters_zero()


def test_graph_replay_equals_eager(monkeypatch):
    """A captured fused decode (its counters fresh and zero-filled in the graph) replays to the
    eager call's bits."""
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "13")
    lens_q, lens_k = [1, 1, 1, 1], [3000, 1500, 4096, 10]
    q, k, v, cu_q, cu_k = _varlen(lens_q, lens_k, 8, 2, 128, 97)

    def run():
        return dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, max(lens_k))

    eager = run()
    run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)
