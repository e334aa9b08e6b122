"""Block-sparse masks in the tensor-core kernel: exact results, skipped blocks, updates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy.launch import run_forward
from dmattn_cupy.sparse_plan import split_sparse
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu

SIZES = [(256, 256), (200, 333), (333, 200)]


def _pattern(sq, sk, seed, density=0.3):
    rng = np.random.default_rng(seed)
    dense = rng.random((sq, sk)) < 0.02
    blocks = rng.random((math.ceil(sq / 64), math.ceil(sk / 64))) < density
    for r, c in zip(*np.nonzero(blocks), strict=True):
        dense[64 * r:64 * r + 64, 64 * c:64 * c + 64] = True
    return dense


def _make(kind, sq, sk, seed):
    dense = _pattern(sq, sk, seed)
    if kind == "bitset":
        return dm.BlockBitsetMask.from_dense_mask(dense, block_size=(128, 128))
    if kind == "bcsr":
        return dm.BCSRMask.from_dense_mask(dense, block_size=(64, 128))
    if kind == "mixed":
        return dm.MixedMask.from_dense_mask(dense, block_size=(64, 64))
    if kind == "mixed128":
        return dm.MixedMask.from_dense_mask(dense, block_size=(128, 128))
    pattern = cupy.asarray(dm.BlockBitsetMask.from_dense_mask(dense, block_size=(64, 64))
                           .block_map() > 0)
    return dm.DynamicMask(pattern, sq, sk, block_size=(64, 64))


KINDS = ["bitset", "bcsr", "mixed", "mixed128", "dynamic"]


def _qkv(sq, sk, seed, d=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, sq, 4, d, generator=g).to("cuda", torch.bfloat16),
            torch.randn(2, sk, 2, d, generator=g).to("cuda", torch.bfloat16),
            torch.randn(2, sk, 2, d, generator=g).to("cuda", torch.bfloat16))


def _check(q, k, v, sparse, mask=None, bias=None, causal=False):
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal,
                                    sparse_mask=sparse, return_lse=True)
    torch.cuda.synchronize()
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias),
                    scale=q.shape[-1] ** -0.5, window=(-1, 0) if causal else (-1, -1),
                    sparse=np.asarray(sparse.to_dense()))
    assert_fa_close(out, lse, ref_args, "bfloat16")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sq,sk", SIZES, ids=str)
def test_block_masks_exact(kind, sq, sk):
    _check(*_qkv(sq, sk, sq + sk), _make(kind, sq, sk, 1))


@pytest.mark.parametrize("kind", ["bitset", "mixed"])
def test_block_masks_with_mask_bias_causal(kind):
    sq, sk = 200, 333
    q, k, v = _qkv(sq, sk, 7)
    mask = torch.rand(2, 1, sq, sk, device="cuda") > 0.2
    bias = torch.randn(2, 4, 1, sk, device="cuda", dtype=torch.bfloat16)
    _check(q, k, v, _make(kind, sq, sk, 2), mask=mask, bias=bias, causal=True)
    _check(q, k, v, dm.CausalMask(sq, sk) & _make(kind, sq, sk, 3), bias=bias)


def _loaded_tiles(q, k, v, sparse):
    win, block = split_sparse(sparse)
    pb = check_dense(q, k, v, None, None, None, False, win, 0.0, "cuda")
    n_cta = math.ceil(q.shape[1] / 64) * q.shape[2] * q.shape[0]
    counters = torch.zeros(n_cta, 2, dtype=torch.int32, device="cuda")
    run_forward(pb, q, tile_counters=counters, sparse=block)
    torch.cuda.synchronize()
    return int(counters[:, 0].sum())


@pytest.mark.parametrize("kind", ["bitset", "mixed", "dynamic"])
def test_empty_blocks_are_never_loaded(kind):
    sq, sk = 512, 512
    q, k, v = _qkv(sq, sk, 11)
    mask = _make(kind, sq, sk, 4)
    visited = mask.visited_tiles(64, 64) * q.shape[0] * q.shape[2]
    assert _loaded_tiles(q, k, v, mask) == visited
    assert dm.estimate_speedup(mask, block_size=(64, 64)) == pytest.approx(
        (sq // 64) * (sk // 64) / mask.visited_tiles(64, 64))


def _list_pointers(mask):
    lists = mask.device_lists()
    return [getattr(lists, f).data.ptr
            for f in ("partial_count", "partial_idx", "full_count", "full_idx")]


def test_dynamic_mask_update_replays_in_a_cuda_graph():
    sq = sk = 256
    q, k, v = _qkv(sq, sk, 13)
    first = cupy.asarray(np.random.default_rng(5).random((4, 4)) < 0.5)
    first[:, 0] = True
    mask = dm.DynamicMask(first, sq, sk, block_size=(64, 64))
    dm.flash_dmattn_func(q, k, v, sparse_mask=mask)  # compile and warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dm.flash_dmattn_func(q, k, v, sparse_mask=mask)
    for seed in (6, 7):
        new = cupy.asarray(np.random.default_rng(seed).random((4, 4)) < 0.5)
        new[:, 1] = True
        before = _list_pointers(mask)
        mask.update(new)
        after = _list_pointers(mask)
        assert before == after
        graph.replay()
        torch.cuda.synchronize()
        ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=None, bias=None, scale=1 / 8,
                        sparse=np.asarray(mask.to_dense()))
        assert_fa_close(out, None, ref_args, "bfloat16")
