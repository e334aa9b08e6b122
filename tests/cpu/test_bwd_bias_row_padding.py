"""The Hopper backward reads a bias tile whose rows are not 16-byte multiples (an odd Sk) from a
copy in 16-byte rows (backward.bias_to_pad, row_pad), without a GPU: the plan selects
bwd_sm90, copies the bias before its launches (a RowCopy a cached plan repeats), points the
kernel's bias fields at the copy and keeps dbias in the bias's own shape. Layouts the kernel
reads as they are, and expanded or unequally spaced ones, are not copied."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward_sm90_sparse_host import H100, _arrays, _family, _pb, _stub_runtime

from dmattn_cupy import backward, row_pad, runtime


def _run(monkeypatch, sk, bias):
    launched: list = []
    copies: list = []
    _stub_runtime(monkeypatch, launched)
    monkeypatch.setattr(row_pad, "copy_rows", lambda *a: copies.append(a))
    monkeypatch.setattr(runtime, "stream_ptr", lambda kind, device: 7)
    q, k, v = _arrays(sk=sk)
    pb = _pb(q, k, v, bias=bias)
    grads, plan = backward.backward_call(pb, np.zeros_like(q), q, k, v, np.zeros_like(q),
                                         np.zeros((2, 4, 200), np.float32))
    return pb, launched, copies, grads, plan


def test_odd_key_bias_tile_runs_the_hopper_backward_from_a_padded_copy(monkeypatch):
    rows = 200
    bias = np.random.default_rng(3).standard_normal((2, 4, rows, 263)).astype(np.float16)
    q, k, v = _arrays(sk=263)
    pb0 = _pb(q, k, v, bias=bias)
    assert _family(pb0, False) == "bwd_dkdv"     # 526-byte rows: no tensor map
    assert backward.bias_to_pad(pb0, pb0.q, False, False, H100)
    pb, launched, copies, grads, plan = _run(monkeypatch, 263, bias)
    fams = [x[0].family for x in launched]
    assert "bwd_sm90" in fams and "bwd_dkdv" not in fams
    _, _, (rec, _args) = next(x for x in launched if x[0].family == "bwd_sm90")
    (_dev, dst, dst_pitch, src, src_pitch, width, n_rows, stream), = copies
    assert stream == 7                             # the launches' stream
    assert (src, width, src_pitch, dst_pitch) == (pb.bias.ptr, 526, 526, 528)
    assert n_rows == 2 * 4 * rows
    assert int(rec["bias"]) == dst and int(rec["bias_head_stride"]) == rows * 264
    assert grads[3].shape == bias.shape            # dbias in the bias's own layout
    assert int(rec["dbias_head_stride"]) == rows * 263
    assert [(c.src, c.dst) for c in plan.copies] == [("bias", "bias_rows")]
    assert "bias_rows" in plan.slots and "bias" not in plan.slots


@pytest.mark.parametrize("layout", ["aligned", "key_row", "expanded", "keys_2_apart"])
def test_layouts_that_need_no_copy_or_cannot_have_one(monkeypatch, layout):
    rng = np.random.default_rng(4)
    sk = 264 if layout == "aligned" else 263
    if layout == "aligned":
        bias = rng.standard_normal((2, 4, 200, sk)).astype(np.float16)
    elif layout == "key_row":   # (B, H, 1, Sk): bwd_sm90 reads key rows at any Sk already
        bias = rng.standard_normal((2, 4, 1, sk)).astype(np.float16)
    elif layout == "expanded":                     # a stride-0 head dim
        bias = np.broadcast_to(rng.standard_normal((2, 1, 200, sk)).astype(np.float16),
                               (2, 4, 200, sk))
    else:
        bias = rng.standard_normal((2, 4, 200, 2 * sk)).astype(np.float16)[..., ::2]
    q, k, v = _arrays(sk=sk)
    pb = _pb(q, k, v, bias=bias)
    assert not backward.bias_to_pad(pb, pb.q, False, False, H100)
    _, _, copies, _, plan = _run(monkeypatch, sk, bias)
    assert copies == [] and plan.copies == []
