"""Backward without a GPU: the float64 reference against finite differences and torch autograd,
torch autograd and torch.compile through the custom ops on the reference backend, the
BwdParams ABI mirror, the dbias write modes, and the backward kernels' fragment addressing."""

from __future__ import annotations

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

import dmattn_cupy as dm
from dmattn_cupy import backward, reference, reference_bwd

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(0)


def _loss(q, k, v, bias, g, **kw):
    out, lse = reference.dense_forward(q, k, v, kw.get("mask"), bias, kw["scale"],
                                       kw.get("softcap", 0.0), kw.get("window", (-1, -1)))
    return float((out * g).sum())


@pytest.mark.parametrize("case", ["plain", "causal_softcap_gqa", "bias_kside", "masked_rows"])
def test_reference_backward_matches_finite_differences(case):
    b, sq, sk, h, hk, d = 1, 4, 5, 2, 1, 8
    q, k, v = (RNG.standard_normal(s) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)))
    g = RNG.standard_normal((b, sq, h, d))
    kw = dict(scale=0.4)
    bias = RNG.standard_normal((b, h, sq, sk))
    if case == "causal_softcap_gqa":
        kw.update(softcap=2.0, window=(-1, 0))
    if case == "bias_kside":
        bias = RNG.standard_normal((1, 1, 1, sk))
    if case == "masked_rows":
        mask = RNG.random((b, h, sq, sk)) > 0.4
        mask[:, :, 1] = False
        kw["mask"] = mask
    dq, dk, dv, db = reference_bwd.dense_backward(q, k, v, kw.get("mask"), bias, g, kw["scale"],
                                                  kw.get("softcap", 0.0),
                                                  kw.get("window", (-1, -1)))
    eps = 1e-6
    for name, x, grad in (("q", q, dq), ("k", k, dk), ("v", v, dv), ("bias", bias, db)):
        flat = x.reshape(-1)
        for idx in RNG.choice(flat.size, size=min(12, flat.size), replace=False):
            old = flat[idx]
            flat[idx] = old + eps
            up = _loss(q, k, v, bias, g, **kw)
            flat[idx] = old - eps
            down = _loss(q, k, v, bias, g, **kw)
            flat[idx] = old
            num = (up - down) / (2 * eps)
            assert abs(num - grad.reshape(-1)[idx]) < 1e-6 * (1 + abs(num)), (name, idx)
    assert np.isfinite(dq).all() and np.isfinite(db).all()
    if case == "masked_rows":
        assert (dq[:, 1] == 0).all()


def _torch_attention(q, k, v, mask, bias, scale, softcap, window):
    """The dense formulation in torch (differentiable), excluded rows give 0."""
    h = q.shape[2]
    kk = k.repeat_interleave(h // k.shape[2], dim=2)
    vv = v.repeat_interleave(h // v.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + (bias if bias.shape[1] in (1, h) else bias.repeat_interleave(h // bias.shape[1], 1))
    keep = torch.from_numpy(reference.allowed_positions(q.shape[1], k.shape[1], window))
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    ell = p.sum(-1, keepdim=True)
    p = p / torch.where(ell > 0, ell, torch.ones_like(ell))
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


BIAS_SHAPES = {"full": (2, 4, 6, 9), "bh1k": (2, 4, 1, 9), "hk": (2, 2, 6, 9),
               "kside": (1, 1, 1, 9), "k1": (2, 4, 6, 1), "b1": (1, 4, 6, 9)}


@pytest.mark.parametrize("shape", list(BIAS_SHAPES), ids=list(BIAS_SHAPES))
def test_autograd_reference_backend_matches_torch(shape):
    """out.backward() through the custom ops (CPU tensors -> reference backend) against torch
    autograd of the dense formulation, float64, GQA, causal, softcap, masked rows."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 9, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(*BIAS_SHAPES[shape], generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 6, 9, generator=g) > 0.3
    mask[:, :, 0] = False
    dout = torch.randn(2, 6, 4, 8, generator=g, dtype=torch.float64)
    out = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True,
                               softcap=3.0)
    out.backward(dout)
    got = [x.grad.clone() for x in (q, k, v, bias)]
    for x in (q, k, v, bias):
        x.grad = None
    ref = _torch_attention(q, k, v, mask, bias, 8 ** -0.5, 3.0, (-1, 0))
    ref.backward(dout)
    for a, x in zip(got, (q, k, v, bias), strict=True):
        assert a.shape == x.shape
        torch.testing.assert_close(a, x.grad, rtol=1e-9, atol=1e-9)


def test_autograd_varlen_key_based_bias_and_lse_grad():
    g = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    q = torch.randn(8, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(8, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, 1, generator=g, dtype=torch.float64, requires_grad=True)
    out, lse = dm.flash_dmattn_varlen_func(q, k, v, cu, cu, 5, 5, attn_bias=bias, is_causal=True,
                                           return_lse=True)
    (out.square().sum() + lse.sum()).backward()
    got = [x.grad.clone() for x in (q, k, v, bias)]
    for x in (q, k, v, bias):
        x.grad = None
    total = 0
    for s, e in ((0, 3), (3, 8)):
        o = _torch_attention(q[None, s:e], k[None, s:e], v[None, s:e], None,
                             bias[s:e].T[None, :, None, :], 8 ** -0.5, 0.0, (-1, 0))
        sc = torch.einsum("bqhd,bkhd->bhqk", q[None, s:e], k[None, s:e].expand(-1, -1, 2, -1))
        sc = sc * 8 ** -0.5 + bias[s:e].T[None, :, None, :]
        keep = torch.from_numpy(reference.allowed_positions(e - s, e - s, (-1, 0)))
        lse_ref = torch.logsumexp(sc.masked_fill(~keep, float("-inf")), -1)
        total = total + o.square().sum() + lse_ref.sum()
    total.backward()
    for a, x in zip(got, (q, k, v, bias), strict=True):
        torch.testing.assert_close(a, x.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("use_lse", [False, True], ids=["out_only", "out_and_lse"])
def test_an_unused_lse_reaches_the_backward_as_none(monkeypatch, use_lse):
    """The ops' autograd does not materialize the gradient of an output the loss never
    reached: an unused lse gives dlse=None (no dlse term; a bias constant over keys then has
    its exact zero gradient, backward.row_shift), a used one its gradient."""
    from dmattn_cupy import autograd as ag

    seen = []
    real = ag.flash_dmattn_backward
    monkeypatch.setattr(ag, "flash_dmattn_backward",
                        lambda *a, **kw: seen.append(kw["dlse"]) or real(*a, **kw))
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 8, 2, 16, generator=g, requires_grad=True)
    k, v = torch.randn(1, 8, 2, 16, generator=g), torch.randn(1, 8, 2, 16, generator=g)
    bias = torch.randn(1, 2, 8, 1, generator=g, requires_grad=True)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True)
    (out.sum() + (lse.sum() if use_lse else 0)).backward()
    assert len(seen) == 1 and (seen[0] is not None) == use_lse
    if use_lse:   # d(lse)/d(bias) = 1 per row
        torch.testing.assert_close(bias.grad, torch.ones_like(bias))
    else:
        assert bias.grad.abs().max() < 1e-6


def test_functional_backward_numpy_and_dbias_none():
    q, k, v = (RNG.standard_normal(s) for s in ((1, 3, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)))
    out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
    dq, dk, dv, db = dm.flash_dmattn_backward(np.ones_like(out), q, k, v, out, lse)
    assert db is None and dq.shape == q.shape and dk.shape == k.shape
    with pytest.raises(ValueError, match="dout must have shape"):
        dm.flash_dmattn_backward(np.ones((1, 2, 2, 8)), q, k, v, out, lse)


def test_torch_compile_fullgraph_traces_forward_and_backward():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 5, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(1, 7, 2, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, 1, 1, 7, dtype=torch.float64, requires_grad=True)

    def block(q, kv, bias):
        return dm.flash_dmattn_func(q, kv, kv, attn_bias=bias, window_size=(2, 1)).sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    compiled(q, kv, bias).backward()
    got = [x.grad.clone() for x in (q, kv, bias)]
    for x in (q, kv, bias):
        x.grad = None
    block(q, kv, bias).backward()
    for a, x in zip(got, (q, kv, bias), strict=True):
        torch.testing.assert_close(a, x.grad)


def test_no_grad_call_is_untracked():
    q = torch.randn(1, 3, 1, 8, requires_grad=True)
    with torch.no_grad():
        out = dm.flash_dmattn_func(q, q, q)
    assert out.grad_fn is None


# ---------------------------------------------------------------------------------------------
# CUDA-side pieces that need only NVRTC / NumPy.

def test_bwd_params_flat_and_nested_agree():
    from dmattn_cupy.params import FWD_DTYPE, bwd_dtype_flat, bwd_dtype_nested

    flat, nested = bwd_dtype_flat(), bwd_dtype_nested()
    assert flat.itemsize == nested.itemsize
    for name in FWD_DTYPE.names:
        assert flat.fields[name][1] == FWD_DTYPE.fields[name][1]
    for name in nested.names[1:]:
        assert flat.fields[name][1] == nested.fields[name][1]


def _bias_problem(bshape, b=2, h=4, hk=2, sq=100, sk=100):
    from dmattn_cupy.arrays import ArrayInfo
    from dmattn_cupy.validate import Problem

    info = ArrayInfo("cupy", "float32", (b, sq, h, 64), (1, 1, 1, 1), 0, 0)
    strides = tuple(int(np.prod(bshape[i + 1:])) for i in range(4))
    bias = ArrayInfo("cupy", "float32", bshape, strides, 0, 0)
    return Problem(kind="cupy", backend="cuda", varlen=False, batch=b, seqlen_q=sq, seqlen_k=sk,
                   heads=h, kv_heads=hk, head_dim=64, dtype="bfloat16", scale=1.0, softcap=0.0,
                   window=(-1, -1), q=info, k=info, v=info, mask=None, bias=bias)


def test_dbias_modes():
    from dmattn_cupy.backward import dbias_mode
    from dmattn_cupy.layout import mask_bias_strides

    def mode(bshape, **kw):
        pb = _bias_problem(bshape, **kw)
        return dbias_mode(pb, mask_bias_strides(pb.bias, False), 64, 64)

    assert mode((2, 4, 100, 100)) == 1
    assert mode((2, 2, 100, 100)) == 2        # kv-head bias: group summed inside one CTA
    assert mode((2, 4, 1, 100)) == 2          # summed over query tiles inside one CTA
    assert mode((2, 4, 1, 100), sq=50) == 1   # one query tile
    assert mode((1, 4, 100, 100)) == 3        # batch broadcast
    assert mode((2, 1, 100, 100)) == 3        # one head, several kv heads
    assert mode((2, 1, 100, 100), hk=1) == 2
    assert mode((2, 4, 100, 1)) == 3          # summed over key tiles
    assert mode((2, 4, 100, 1), sk=60) == 1


@pytest.mark.parametrize("bshape,axes", [
    ((1, 4, 100, 100), (0,)),          # batch: widened with stride 0
    ((2, 1, 100, 100), (1,)),          # one head, two kv heads
    ((1, 1, 1, 100), (0, 1)),
])
def test_deterministic_widening_leaves_no_cross_block_atomics(bshape, axes):
    from dmattn_cupy.backward import _probe_strides, _widen_bias, dbias_mode

    pb, got_axes = _widen_bias(_bias_problem(bshape))
    assert got_axes == axes
    for axis in axes:
        assert pb.bias.strides[axis] == 0 and pb.bias.shape[axis] > 1
    assert dbias_mode(pb, _probe_strides(pb), 64, 64) in (1, 2)


def test_dkdv_tile_rows_follow_shared_memory():
    import dataclasses

    from dmattn_cupy import select
    from dmattn_cupy.device import PRESETS

    def rows(hd, mask=False, bias=False, limit=None):
        dev = PRESETS["sm_90"] if limit is None else dataclasses.replace(
            PRESETS["sm_90"], smem_per_block=limit)
        return select.backward("bfloat16", hd, mask, bias, False, False, False, dev)[1].block_m

    assert rows(128) == 128 and rows(64) == 128
    assert rows(128, limit=227 * 1024) == 128
    assert rows(128, limit=163 * 1024) == 64     # sm_80: 163 KB per block
    assert rows(128, mask=True) == rows(128, bias=True) == rows(256) == 64


def test_sparse_arrays_round_trip_and_backward_fit():
    from dmattn_cupy.sparse_plan import arrays_from_list, arrays_to_list, host_arrays
    from dmattn_cupy.sparse_plan import fits_backward as sparse_fits_backward

    dense = np.random.default_rng(0).random((200, 300)) > 0.5
    for mask in (dm.BlockBitsetMask.from_dense_mask(dense, block_size=(64, 128)),
                 dm.MixedMask.from_dense_mask(dense, block_size=(64, 128))):
        arrs = host_arrays(mask)
        items = arrays_to_list(arrs)
        assert len(items) == (6 if isinstance(mask, dm.MixedMask) else 4)
        back = arrays_from_list(items, arrs.block_m, arrs.block_n)
        assert back == arrs
    assert sparse_fits_backward((64, 128), "bfloat16", 128)
    assert not sparse_fits_backward((64, 32), "bfloat16", 128)   # backward tile 64 x 64
    assert sparse_fits_backward((64, 32), "float16", 256)        # backward tile 64 x 32
    assert not sparse_fits_backward((32, 64), "float16", 64)


def test_bwd_abi_compiles():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from cupy_backends.cuda.libs import nvrtc

    from dmattn_cupy import compile as dmc
    from dmattn_cupy.params import bwd_abi_check_source

    prog = nvrtc.createProgram('#include "params_check.cuh"\n', "abi.cu",
                               (bwd_abi_check_source().encode(),), (b"params_check.cuh",))
    try:
        nvrtc.compileProgram(prog, ["-std=c++20", "--gpu-architecture=sm_80",
                                    f"-I{dmc.cuda_src_dir()}"])
    finally:
        nvrtc.destroyProgram(prog)


def test_pre_post_rows_per_warp_agree_with_the_kernel():
    """The host's pre/post grids divide by backward.ROWS_PER_WARP: the kernels' constant."""
    compile_static_asserts('#include "sm80/bwd.cu"\n'
                           f"static_assert(dm::kBwdRowsPerWarp == {backward.ROWS_PER_WARP});\n",
                           "bwd_rows_per_warp.cu")


@pytest.mark.parametrize("hd", [64, 128, 256])
def test_backward_kernels_compile_without_spills(hd):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from dmattn_cupy import select
    from dmattn_cupy.compile import compile_spec
    from dmattn_cupy.device import PRESETS

    for spec in select.backward("bfloat16", hd, True, True, False, True, True,
                                PRESETS["sm_80"]):
        if spec is None:
            continue
        ck = compile_spec(spec, use_disk_cache=False)
        assert not ck.spills, (spec.id, ck.registers, ck.spill_stores)


def _emulate(a_smem, b_smem, kk, nf, a_trans, a_col0, b_col0):
    """One warp's C (16 x 8*nf) from the bwd_gemm.cuh addressing (gemm_atb when a_trans, else
    gemm_ab), with ldmatrix/mma emulated as in test_fragment_layout and the per-lane offsets
    read from sm80/mma.cuh (the ldsm_* functions bwd_gemm.cuh calls). The tile-level
    composition (ks * 16 + offset, column bases) mirrors bwd_gemm.cuh: a design proof."""
    from test_fragment_layout import LDSM, c_to_matrix, ldmatrix_x4, mma_m16n8k16

    a_row, a_col = LDSM["ldsm_a_row"], LDSM["ldsm_a_col"]
    nk_row, nk_col = LDSM["ldsm_nk_row"], LDSM["ldsm_nk_col"]
    kn_row, kn_col = LDSM["ldsm_kn_row"], LDSM["ldsm_kn_col"]
    acc = np.zeros((nf, 32, 4))
    for ks in range(kk // 16):
        if a_trans:  # load_a_trans
            a = ldmatrix_x4(a_smem, lambda ln, ks=ks: ks * 16 + nk_row(ln),
                            lambda ln: a_col0 + nk_col(ln), trans=True)
        else:        # load_a_rowmajor
            a = ldmatrix_x4(a_smem, a_row, lambda ln, ks=ks: ks * 16 + a_col(ln))
        for jj in range(nf // 2):  # load_b_kn
            bf = ldmatrix_x4(b_smem, lambda ln, ks=ks: ks * 16 + kn_row(ln),
                             lambda ln, jj=jj: b_col0 + jj * 16 + kn_col(ln), trans=True)
            mma_m16n8k16(acc[2 * jj], a, bf[:, 0], bf[:, 1])
            mma_m16n8k16(acc[2 * jj + 1], a, bf[:, 2], bf[:, 3])
    return c_to_matrix(acc)


@pytest.mark.parametrize("block_n,head_dim,warps", [(64, 128, 8), (32, 256, 8), (64, 96, 8)],
                         ids=lambda x: str(x))
def test_bwd_gemm_addressing(block_n, head_dim, warps):
    """dV += P^T dO (gemm_atb) per warp role, and dQ += dS K (gemm_ab), on random tiles."""
    block_m = 64
    p = RNG.standard_normal((block_m, block_n))
    do = RNG.standard_normal((block_m, head_dim))
    k = RNG.standard_normal((block_n, head_dim))
    warps_n = block_n // 16
    dcols = head_dim // (warps // warps_n)
    for w in range(warps):
        ws, wd = w % warps_n, w // warps_n
        got = _emulate(p, do, block_m, dcols // 8, True, 16 * ws, wd * dcols)
        want = p[:, 16 * ws:16 * ws + 16].T @ do[:, wd * dcols:(wd + 1) * dcols]
        np.testing.assert_allclose(got, want, atol=1e-9)
    for wm in range(block_m // 16):
        got = _emulate(p[16 * wm:], k, block_n, 4, False, 0, 32)
        np.testing.assert_allclose(got, p[16 * wm:16 * wm + 16] @ k[:, 32:64], atol=1e-9)
