"""Block sparse masks on the thin launch path (fastpath): repeated calls are served by the
cached plan with the mask's list pointers patched in, and give the float64 reference's answer
and the validated path's bits (``dispatch.dense``, never cached); a DynamicMask updated between
calls is seen, eagerly and in a CUDA graph replay; two masks of the same shapes share a plan,
not their lists."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close
from test_sparse import _qkv, _ref_args, kernel_tile, make_mask

import dmattn_cupy as dm
from dmattn_cupy import dispatch, fastpath

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("both_forward_families")]

KINDS = ["bitset", "bcsr", "mixed", "mixed_coarse", "dynamic", "bitset_bh", "bcsr_b",
         "mixed_h", "dynamic_bh", "causal&bitset", "window&mixed", "causal_window&dynamic_bh",
         "bitset&bcsr", "mixed_h&bitset"]


def _validated(q, k, v, m, return_lse=True):
    return dispatch.dense(q, k, v, None, None, None, False, (-1, -1), 0.0, m, return_lse,
                          False, "auto")


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), f"max diff {(x.float() - y.float()).abs().max().item()}"


@pytest.mark.parametrize("sq,sk", [(256, 256), (200, 333)])
@pytest.mark.parametrize("kind", KINDS)
def test_repeated_calls_hit_and_match_the_reference(kind, sq, sk):
    q, k, v = _qkv(sq, sk, 3)
    m = make_mask(kind, sq, sk, seed=1)
    other = make_mask(kind, sq, sk, seed=7)    # the same class and dims, other blocks
    first = dm.flash_dmattn_func(q, k, v, sparse_mask=m, return_lse=True)
    hits = fastpath.HITS[0]
    again = dm.flash_dmattn_func(q, k, v, sparse_mask=m, return_lse=True)
    mine = dm.flash_dmattn_func(q, k, v, sparse_mask=other, return_lse=True)
    assert fastpath.HITS[0] >= hits + 1          # `other` hits too when its lists' shapes match
    torch.cuda.synchronize()
    assert_fa_close(*again, _ref_args(q, k, v, m), "bfloat16")
    assert_fa_close(*mine, _ref_args(q, k, v, other), "bfloat16")
    _same(again, first)
    _same(again, _validated(q, k, v, m))
    _same(mine, _validated(q, k, v, other))
    torch.cuda.synchronize()


@pytest.mark.parametrize("lead", [(), (2, 4)], ids=["2d", "per_head"])
def test_dynamic_mask_update_between_thin_calls_is_seen(lead):
    tm, tn = kernel_tile()
    sq, sk = 4 * tm, 4 * tn + 17
    q, k, v = _qkv(sq, sk, 13)
    shape = (*lead, 4, 5)
    rng = np.random.default_rng(5)
    mask = dm.DynamicMask(cupy.asarray(rng.random(shape) < 0.5), sq, sk, block_size=(tm, tn))
    dm.flash_dmattn_func(q, k, v, sparse_mask=mask)
    previous = None
    for _ in range(3):
        new = rng.random(shape) < 0.5
        new[..., 0] = True
        mask.update(cupy.asarray(new))
        hits = fastpath.HITS[0]
        out = dm.flash_dmattn_func(q, k, v, sparse_mask=mask)
        assert fastpath.HITS[0] == hits + 1
        torch.cuda.synchronize()
        assert_fa_close(out, None, _ref_args(q, k, v, mask), "bfloat16")
        assert torch.equal(out, _validated(q, k, v, mask, False))
        if previous is not None:
            assert not torch.equal(out, previous)
        previous = out


@pytest.mark.parametrize("kind", ["bitset", "mixed_h", "bitset&bcsr", "dynamic_bh"])
def test_thin_block_call_replays_in_a_cuda_graph(kind):
    """The captured call is a thin hit; replay == eager, also after q changes in place and
    (for a DynamicMask) after an update."""
    sq, sk = 256, 333
    q, k, v = _qkv(sq, sk, 21)
    m = make_mask(kind, sq, sk, seed=2)

    def fn():
        return dm.flash_dmattn_func(q, k, v, sparse_mask=m, return_lse=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    hits = fastpath.HITS[0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    assert fastpath.HITS[0] == hits + 1
    for step in range(3):
        if step == 1:
            q.copy_(torch.randn_like(q))
        if step == 2 and kind.startswith("dynamic"):
            base = m.block_map() > 0
            base[..., 1:, :] = ~base[..., 1:, :]
            m.update(cupy.asarray(base))
        graph.replay()
        torch.cuda.synchronize()
        _same(static, fn())
        assert_fa_close(*static, _ref_args(q, k, v, m), "bfloat16")


@pytest.mark.parametrize("kind", ["bitset", "mixed_h", "dynamic_bh"])
def test_cupy_calls_with_block_masks_hit(kind):
    """CuPy inputs: the token is kept per library, the hit matches the reference and the
    validated path's bits."""
    sq, sk = 200, 333
    q, k, v = (cupy.asarray(x.half()) for x in _qkv(sq, sk, 31))
    m = make_mask(kind, sq, sk, seed=4)
    first = dm.flash_dmattn_func(q, k, v, sparse_mask=m, return_lse=True)
    hits = fastpath.HITS[0]
    again = dm.flash_dmattn_func(q, k, v, sparse_mask=m, return_lse=True)
    assert fastpath.HITS[0] == hits + 1
    cupy.cuda.Device().synchronize()
    assert_fa_close(*again, _ref_args(q, k, v, m), "float16")
    want = _validated(q, k, v, m)
    for a, b, c in zip(again, first, want, strict=True):
        assert cupy.array_equal(a, b) and cupy.array_equal(a, c)
