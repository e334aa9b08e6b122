"""Sparse masks on the CUDA backend: every class (and `&`) exact against the float64 reference
through `to_dense()`, per-batch/per-head patterns, with attn_mask/attn_bias/is_causal, the
kernel's debug tile counters against the dense pattern and `estimate_speedup`, mask block sizes
the kernel cannot serve, DynamicMask updates under CUDA-graph replay, and GPU-side builders."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tracemalloc

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy import forward as fwd_module
from dmattn_cupy import runtime
from dmattn_cupy.forward import run_forward, select_fwd_spec
from dmattn_cupy.sparse_plan import block_size_of, bound_min, split_sparse
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

# On compute capability 9.0 masks of whole 128x128 blocks run on fwd_sm90 (auto), the rest and
# everything under fwd_mma on the portable kernel.
pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("both_forward_families")]

B, H, HK, D = 2, 4, 2, 64
SIZES = [(256, 256), (200, 333), (333, 200)]  # Sq == Sk; Sq != Sk, neither a block multiple
KINDS = [
    "causal", "window", "window_pair", "causal_window", "causal&window",
    "bitset", "bcsr", "mixed", "mixed_coarse", "dynamic",
    "bitset_bh", "bcsr_b", "mixed_h", "dynamic_bh",
    "causal&bitset", "window&mixed", "causal_window&dynamic_bh", "bitset&bcsr", "mixed_h&bitset",
]


@functools.cache
def kernel_tile() -> tuple[int, int]:
    """The portable kernel's tile for a block-sparse problem of this file's shapes (lists of an
    unknown block size: the sm_90a family declines them)."""
    q = torch.empty(1, 64, 1, D, device="cuda", dtype=torch.bfloat16)
    pb = check_dense(q, q, q, None, None, None, False, (-1, -1), 0.0, "cuda")
    spec = select_fwd_spec(pb, sparse=True)
    return spec.block_m, spec.block_n


def _structured(lead, sq, sk, seed) -> np.ndarray:
    """(*lead, Sq, Sk) bool: coarse (2 tiles) blocks 40% empty; the rest made of kernel tiles
    that are full, empty or element noise, so every class meets empty, full and partial tiles
    at both the tile and the coarse scale. Head (0, 0) of a 4-D pattern has a query row block
    with nothing kept (fully masked rows)."""
    tm, tn = kernel_tile()
    rng = np.random.default_rng(seed)
    nr, nc = math.ceil(sq / tm), math.ceil(sk / tn)
    coarse = rng.random((*lead, math.ceil(nr / 2), math.ceil(nc / 2))) < 0.6
    if len(lead) == 2:
        coarse[0, 0, -1] = False
    fine = coarse.repeat(2, axis=-2).repeat(2, axis=-1)[..., :nr, :nc]
    kind = np.where(fine, rng.integers(0, 3, size=fine.shape), 0)  # 0 empty, 1 noise, 2 full
    kind_el = kind.repeat(tm, axis=-2).repeat(tn, axis=-1)[..., :sq, :sk]
    return (kind_el == 2) | ((kind_el == 1) & (rng.random(kind_el.shape) < 0.3))


def _block_mask(name: str, sq: int, sk: int, seed: int) -> dm.SparseMask:
    tm, tn = kernel_tile()
    lead = {"bh": (B, H), "b": (B, 1), "h": (1, H)}.get(name.rsplit("_", 1)[-1], ())
    dense = _structured(lead, sq, sk, seed)
    base = name.split("_")[0]
    if base == "bitset":
        return dm.BlockBitsetMask.from_dense_mask(dense, block_size=(2 * tm, 2 * tn))
    if base == "bcsr":
        return dm.BCSRMask.from_dense_mask(dense, block_size=(tm, 2 * tn))
    if base == "mixed":
        size = (2 * tm, 2 * tn) if name.endswith("coarse") else (tm, tn)
        return dm.MixedMask.from_dense_mask(dense, block_size=size)
    assert base == "dynamic", name
    bits = dm.BlockBitsetMask.from_dense_mask(dense, block_size=(tm, tn)).block_map() > 0
    return dm.DynamicMask(cupy.asarray(bits), sq, sk, block_size=(tm, tn))


def make_mask(kind: str, sq: int, sk: int, seed: int = 0) -> dm.SparseMask:
    if "&" in kind:
        a, b = kind.split("&")
        return make_mask(a, sq, sk, seed) & make_mask(b, sq, sk, seed + 1)
    if kind == "causal":
        return dm.CausalMask(sq, sk)
    if kind == "window":
        return dm.WindowMask(37, sq, sk)
    if kind == "window_pair":
        return dm.WindowMask((90, 9), sq, sk)
    if kind == "causal_window":
        return dm.CausalWindowMask(70, sq, sk)
    return _block_mask(kind, sq, sk, seed)


def _qkv(sq, sk, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, sq, H, D, generator=g).to("cuda", torch.bfloat16),
            torch.randn(B, sk, HK, D, generator=g).to("cuda", torch.bfloat16),
            torch.randn(B, sk, HK, D, generator=g).to("cuda", torch.bfloat16))


def _ref_args(q, k, v, sparse, mask=None, bias=None, causal=False):
    return dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias),
                scale=q.shape[-1] ** -0.5, window=(-1, 0) if causal else (-1, -1),
                sparse=np.asarray(sparse.to_dense()))


def _check(q, k, v, sparse, mask=None, bias=None, causal=False):
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=causal,
                                    sparse_mask=sparse, return_lse=True)
    torch.cuda.synchronize()
    assert_fa_close(out, lse, _ref_args(q, k, v, sparse, mask, bias, causal), "bfloat16")


def _kept(sparse, sq, sk, mask=None, causal=False) -> np.ndarray:
    """(B, H, Sq, Sk): what the call keeps, from the mask's element semantics."""
    keep = np.broadcast_to(sparse.to_dense(), (B, H, sq, sk))
    if causal:
        keep = keep & (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq)
    if mask is not None:
        keep = keep & f64(mask).astype(bool)
    return keep


def _tiles(keep4: np.ndarray, tm: int, tn: int) -> tuple[np.ndarray, np.ndarray]:
    """(b, h, query tile, key tile) bools: the tile keeps something; it keeps everything in
    bounds."""
    b, h, sq, sk = keep4.shape
    nm, nn = math.ceil(sq / tm), math.ceil(sk / tn)
    any_ = np.zeros((b, h, nm * tm, nn * tn), dtype=bool)
    all_ = np.ones_like(any_)
    any_[..., :sq, :sk] = all_[..., :sq, :sk] = keep4
    return (any_.reshape(b, h, nm, tm, nn, tn).any(axis=(3, 5)),
            all_.reshape(b, h, nm, tm, nn, tn).all(axis=(3, 5)))


def _tile_stats(keep4: np.ndarray, tm: int, tn: int) -> tuple[np.ndarray, np.ndarray]:
    """Per (b, h, query tile): key tiles with something kept; of those, tiles not all kept."""
    any_t, all_t = _tiles(keep4, tm, tn)
    return any_t.sum(-1), (any_t & ~all_t).sum(-1)


def _counted(q, k, v, sparse, mask=None, bias=None, causal=False):
    """One debug-counter launch as flash_dmattn_func would make it: (loaded, masked) per CTA as
    (B, H, query tiles), the kernel tile, and the output."""
    pb = check_dense(q, k, v, mask, bias, None, causal, (-1, -1), 0.0, "cuda")
    win, block = split_sparse(sparse)
    pb = dataclasses.replace(pb, window=(bound_min(pb.window[0], win[0]),
                                         bound_min(pb.window[1], win[1])))
    # the layout the launch selects on: broadcasts collapsed, rows padded where TMA needs it
    pb = fwd_module.collapsed_broadcasts(pb)
    pb_run = fwd_module.padded_problem(pb, fwd_module.operands_to_pad(pb, block_size_of(block)))
    spec = select_fwd_spec(pb_run, debug_counters=True, sparse=block_size_of(block))
    nm = math.ceil(q.shape[1] / spec.block_m)
    counters = torch.zeros(B, H, nm, 2, dtype=torch.int32, device="cuda")
    out, _ = run_forward(pb, q, tile_counters=counters, sparse=block)
    torch.cuda.synchronize()
    c = counters.cpu().numpy()
    return c[..., 0], c[..., 1], (spec.block_m, spec.block_n), out


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sq,sk", SIZES, ids=str)
def test_every_class_is_exact(kind, sq, sk):
    mask = make_mask(kind, sq, sk, seed=sq + sk)
    assert not mask.to_dense().all() and mask.to_dense().any()  # a real test of the mask
    _check(*_qkv(sq, sk, sq + 2 * sk), mask)


@pytest.mark.parametrize("kind", ["bitset_bh", "mixed"])
def test_misaligned_qkv_rows_are_copied(kind):
    """Views whose rows are not 16-byte aligned take the launcher's copy path, block lists too."""
    sq = sk = 200
    q, k, v = (torch.cat([torch.zeros(1, device="cuda", dtype=torch.bfloat16), t.flatten()])[1:]
               .view(t.shape) for t in _qkv(sq, sk, seed=5))
    assert q.data_ptr() % 16 != 0
    _check(q, k, v, make_mask(kind, sq, sk, seed=6))


COMBOS = ["attn_mask", "attn_bias", "is_causal", "all"]


def _loads_at_most(sparse, sq, sk, mask, causal, tile) -> np.ndarray:
    """Per (b, h, query tile): the key tiles a producer may load that tests the block lists (at
    their block size), the window/causal formula and attn_mask's bytes apart, as the sm_90a one
    does: a tile where each keeps something, though never the same element, costs more work,
    never a wrong skip. A tile one of them empties is never loaded."""
    win, block = split_sparse(sparse)
    d = np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None, :]
    band = np.ones((sq, sk), dtype=bool)
    if win[0] >= 0:
        band &= d <= win[0]
    right = bound_min(win[1], 0) if causal else win[1]
    if right >= 0:
        band &= d >= -right
    most = _tiles(np.broadcast_to(band, (B, H, sq, sk)), *tile)[0]
    if block is not None:
        bm, bn = block_size_of(block)
        listed = _tiles(np.broadcast_to(block.to_dense(), (B, H, sq, sk)), bm, bn)[0]
        listed = listed.repeat(bm, axis=2).repeat(bn, axis=3)[..., :sq, :sk]
        most &= _tiles(listed, *tile)[0]
    if mask is not None:
        most &= _tiles(np.broadcast_to(f64(mask).astype(bool), (B, H, sq, sk)), *tile)[0]
    return most.sum(-1)


@pytest.mark.parametrize("kind", ["bitset_bh", "mixed_coarse", "dynamic", "causal_window",
                                  "window&mixed", "bitset&bcsr"])
@pytest.mark.parametrize("combo", COMBOS)
def test_with_attn_mask_bias_causal(kind, combo):
    sq, sk = 200, 333
    tn = max(kernel_tile()[1], 128)  # whole key tiles of both families (64 and 128 keys)
    q, k, v = _qkv(sq, sk, 7)
    mask = bias = None
    if combo in ("attn_mask", "all"):
        mask = torch.rand(B, 1, sq, sk, device="cuda") > 0.2
        mask[..., tn:2 * tn] = False  # key tiles nobody keeps: skipped
    if combo in ("attn_bias", "all"):
        bias = torch.randn(B, H, 1, sk, device="cuda", dtype=torch.bfloat16)
    causal = combo in ("is_causal", "all")
    sparse = make_mask(kind, sq, sk, seed=3)
    _check(q, k, v, sparse, mask=mask, bias=bias, causal=causal)
    if mask is not None or causal:  # tiles emptied by attn_mask or is_causal are skipped too
        loaded, _, tile, out = _counted(q, k, v, sparse, mask=mask, bias=bias, causal=causal)
        want, _ = _tile_stats(_kept(sparse, sq, sk, mask, causal), *tile)
        most = _loads_at_most(sparse, sq, sk, mask, causal, tile)
        assert (want <= loaded).all() and (loaded <= most).all(), (loaded, want, most)
        assert_fa_close(out, None, _ref_args(q, k, v, sparse, mask, bias, causal), "bfloat16")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_block_mask_beside_attn_mask_at_d256(grad):
    """Head dim 256 takes no block lists beside an attn_mask: the block mask's elements are
    ANDed into attn_mask (sparse_plan.forward_takes_lists), with a gradient or without; the
    output against the float64 reference, and with a gradient dQ/dK/dV against float64
    autograd of the dense formulation (test_backward's rule)."""
    sq, sk, d = 200, 333, 256
    g = torch.Generator().manual_seed(17)
    q, k, v = (torch.randn(B, s, n, d, generator=g).to("cuda", torch.bfloat16)
               for s, n in ((sq, H), (sk, HK), (sk, HK)))
    mask = torch.rand(B, H, sq, sk, generator=g).cuda() > 0.2
    sparse = dm.BlockBitsetMask(np.array([[True, False, True], [True, True, False]]), sq, sk,
                                block_size=(128, 128))
    q.requires_grad_(grad)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, sparse_mask=sparse,
                                    return_lse=True)
    torch.cuda.synchronize()
    ref = dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=None, scale=d ** -0.5,
               window=(-1, -1), sparse=np.asarray(sparse.to_dense()))
    assert_fa_close(out.detach(), lse.detach(), ref, "bfloat16")
    if grad:   # q, k, v leaves; the block mask's dense form is the reference's extra mask
        from test_backward import _run_dense
        _run_dense(q.detach(), k, v, mask=mask, seed=18, sparse_mask=sparse)


# ----------------------------------------------------------------------------- tile counters


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sq,sk", SIZES, ids=str)
def test_counters_match_pattern_and_estimate(kind, sq, sk):
    """Each CTA loads exactly the key tiles where the mask keeps something (so empty tiles are
    never loaded), and estimate_speedup predicts the kernel's own count."""
    mask = make_mask(kind, sq, sk, seed=sq + sk)
    q, k, v = _qkv(sq, sk, 5)
    loaded, _, tile, _ = _counted(q, k, v, mask)
    want, _ = _tile_stats(_kept(mask, sq, sk), *tile)
    np.testing.assert_array_equal(loaded, want)
    dense_tiles = math.ceil(sq / tile[0]) * math.ceil(sk / tile[1]) * B * H
    if tile[1] <= 64:  # these sizes leave empty tiles at 64 keys (not always at the sm_90a 128)
        assert loaded.sum() < dense_tiles
    assert dm.estimate_speedup(mask, block_size=tile) == pytest.approx(dense_tiles / loaded.sum())


@pytest.mark.parametrize("kind", ["bitset", "bcsr_b", "dynamic_bh", "mixed", "mixed_h"])
def test_full_tiles_do_no_element_masking(kind):
    """Block-granular masks list only full tiles: none is masked. A MixedMask at the kernel
    tile masks exactly its partial tiles."""
    sq = sk = 8 * kernel_tile()[0]
    mask = make_mask(kind, sq, sk, seed=21)
    loaded, masked, tile, _ = _counted(*_qkv(sq, sk, 9), mask)
    want_loaded, want_partial = _tile_stats(_kept(mask, sq, sk), *tile)
    np.testing.assert_array_equal(loaded, want_loaded)
    if kind.startswith("mixed"):
        assert want_partial.sum() > 0
        np.testing.assert_array_equal(masked, want_partial)
    else:
        assert want_partial.sum() == 0 and loaded.sum() > 0
        np.testing.assert_array_equal(masked, 0)


# ----------------------------------------------------------------------------- block sizes


@pytest.mark.parametrize("cls", ["bitset", "bcsr", "mixed", "dynamic"])
@pytest.mark.parametrize("how", ["half_tile", "one_and_a_half_tiles"])
def test_block_size_the_kernel_cannot_serve(cls, how):
    """A mask block smaller than, or not a multiple of, the kernel tile raises a ValueError
    naming sparse_mask's block_size; the block size it suggests works and is exact."""
    tm, tn = kernel_tile()
    block = (tm // 2, tn) if how == "half_tile" else (tm + tm // 2, tn)
    sq, sk = 200, 333
    dense = _structured((), sq, sk, 31)

    def build(bs):
        if cls == "bitset":
            return dm.BlockBitsetMask.from_dense_mask(dense, block_size=bs)
        if cls == "bcsr":
            return dm.BCSRMask.from_dense_mask(dense, block_size=bs)
        if cls == "mixed":
            return dm.MixedMask.from_dense_mask(dense, block_size=bs)
        bits = dm.BlockBitsetMask.from_dense_mask(dense, block_size=bs).block_map() > 0
        return dm.DynamicMask(cupy.asarray(bits), sq, sk, block_size=bs)

    q, k, v = _qkv(sq, sk, 2)
    with pytest.raises(ValueError, match=r"sparse_mask block_size .* multiple of the kernel "
                                         rf"tile \({tm}, {tn}\)") as err:
        dm.flash_dmattn_func(q, k, v, sparse_mask=build(block))
    suggested = tuple(int(n) for n in re.search(r"block_size=\((\d+), (\d+)\)",
                                                str(err.value)).groups())
    assert suggested[0] % tm == 0 and suggested[1] % tn == 0
    _check(q, k, v, build(suggested))


def test_dynamic_mask_cannot_be_merged_with_another_block_mask():
    sq = sk = 256
    dyn = make_mask("dynamic", sq, sk, 1)
    with pytest.raises(NotImplementedError, match="DynamicMask.*parametric masks only"):
        dm.flash_dmattn_func(*_qkv(sq, sk, 3), sparse_mask=dyn & make_mask("bitset", sq, sk, 2))


# ----------------------------------------------------------------------------- dynamic


def _list_pointers(mask):
    lists = mask.device_lists()
    return [getattr(lists, f).data.ptr
            for f in ("partial_count", "partial_idx", "full_count", "full_idx")]


@pytest.mark.parametrize("lead", [(), (B, H)], ids=["2d", "per_head"])
def test_dynamic_mask_update_replays_in_a_cuda_graph(lead):
    tm, tn = kernel_tile()
    sq, sk = 4 * tm, 4 * tn + 17
    q, k, v = _qkv(sq, sk, 13)
    shape = (*lead, 4, 5)
    rng = np.random.default_rng(5)
    mask = dm.DynamicMask(cupy.asarray(rng.random(shape) < 0.5), sq, sk, block_size=(tm, tn))
    pointers, nbytes = _list_pointers(mask), mask.nbytes
    causal = dm.CausalWindowMask(3 * tn, sq, sk) & mask
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
        assert _list_pointers(mask) == pointers and mask.nbytes == nbytes
        graph.replay()
        torch.cuda.synchronize()
        np.testing.assert_array_equal(mask.block_map() > 0, new)
        assert_fa_close(out, None, _ref_args(q, k, v, causal), "bfloat16")
        eager = dm.flash_dmattn_func(q, k, v, sparse_mask=causal)
        torch.cuda.synchronize()
        assert torch.equal(eager, out)  # the replay saw the update, as an eager call does
        if previous is not None:
            assert not torch.equal(out, previous)
        previous = out.clone()
    assert len(runtime._kernels) == kernels  # no recompilation


# ----------------------------------------------------------------------------- GPU builders


def _gpu_pattern(sq, sk, seed):
    """A (2, 1, Sq, Sk) CuPy pattern with empty, full and partial (128, 128) blocks."""
    rs = cupy.random.RandomState(seed)
    i, j = cupy.arange(sq)[:, None], cupy.arange(sk)[None, :]
    blocks = rs.random_sample((2, 1, math.ceil(sq / 128), math.ceil(sk / 128))) < 0.3
    kept = blocks.repeat(128, axis=-2).repeat(128, axis=-1)[..., :sq, :sk]
    return kept | ((i - j) % 97 == 0)  # plus a sparse diagonal stripe pattern


@pytest.mark.parametrize("source", ["cupy", "torch"])
def test_builders_run_on_the_gpu(source):
    """From a GPU pattern each builder keeps its arrays on the GPU and equals the NumPy-built
    mask; no host array of the pattern's size is ever allocated (tracemalloc sees every NumPy
    allocation, so a host round-trip of the (Sq, Sk) pattern would show up)."""
    sq, sk = 2000, 2100
    dense = _gpu_pattern(sq, sk, 1)
    host = cupy.asnumpy(dense)
    if source == "torch":
        dense = torch.as_tensor(dense, device="cuda")
    builders = {
        "bitset": lambda d: dm.BlockBitsetMask.from_dense_mask(d, (128, 128)),
        "bcsr": lambda d: dm.BCSRMask.from_dense_mask(d, (128, 256)),
        "mixed": lambda d: dm.MixedMask.from_dense_mask(d, (128, 128)),
    }
    for name, build in builders.items():
        build(dense)  # CuPy compiles its kernels on first use
        tracemalloc.start()
        try:
            mask = build(dense)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < sq * sk // 8, f"{name}: {peak} bytes on the host"
        arrays = [v for v in vars(mask).values() if isinstance(v, (np.ndarray, cupy.ndarray))]
        assert arrays and all(isinstance(a, cupy.ndarray) for a in arrays), name
        want = build(host)
        assert mask.nbytes == want.nbytes
        np.testing.assert_array_equal(mask.block_map(), want.block_map())
        np.testing.assert_array_equal(mask.to_dense(), want.to_dense())

    # DynamicMask.update: (8, 8) blocks, so its int32 lists (~0.5 MB) would show on the host
    bits = dm.BlockBitsetMask.from_dense_mask(dense, (8, 8)).block_map() > 0
    dyn = dm.DynamicMask(cupy.asarray(bits), sq, sk, (8, 8))
    new = cupy.asarray(~bits)
    dyn.update(new)
    tracemalloc.start()
    try:
        dyn.update(new if source == "cupy" else torch.as_tensor(new, device="cuda"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < bits.size // 2, f"update: {peak} bytes on the host"
    np.testing.assert_array_equal(dyn.block_map() > 0, ~bits)
