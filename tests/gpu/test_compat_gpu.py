"""flash-dmattn 1.x call patterns through ``dmattn_cupy.compat.flash_dmattn`` on the CUDA
backend (ported usage examples against float64 torch math), and the dynamic-mask helpers on the
GPU (torch and CuPy give the NumPy answer; the block mask runs as ``sparse_mask``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmattn_cupy.compat import flash_dmattn as fdm  # noqa: E402

pytestmark = pytest.mark.gpu


def _math_ref(q, k, v, mask, bias, scale, causal):
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    keep = mask.bool() if mask is not None else torch.ones_like(s, dtype=torch.bool)
    if causal:
        sq, sk = s.shape[-2:]
        keep = keep & torch.ones(sq, sk, device=s.device).tril(sk - sq).bool()
    p = torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_port_dynamic_mask_example_cuda(dtype):
    torch.manual_seed(0)
    B, H, L, D = 2, 4, 512, 128
    keep_window_size = 128
    dev = "cuda"
    q = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    k = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    v = torch.randn(B, L, H, D, device=dev, dtype=dtype)
    attention_bias = torch.randn(B, H, L, L, device=dev, dtype=dtype)
    attention_mask = torch.zeros_like(attention_bias)
    topk_indices = torch.topk(attention_bias, keep_window_size, dim=-1, largest=True).indices
    attention_mask.scatter_(-1, topk_indices, 1.0)
    attn = fdm.flash_dmattn_func_auto()
    out = attn(q, k, v, attn_mask=attention_mask, attn_bias=attention_bias, is_causal=True,
               scale=1.0 / math.sqrt(D))
    ref = _math_ref(q, k, v, attention_mask, attention_bias, 1.0 / math.sqrt(D), True)
    low = _math_ref(q.float(), k.float(), v.float(), attention_mask, attention_bias.float(),
                    1.0 / math.sqrt(D), True).to(dtype)
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * (low.double() - ref).abs().max().item() + 2e-2


def test_positional_gqa_and_autograd_cuda():
    torch.manual_seed(1)
    B, L, H, Hk, D = 2, 256, 8, 2, 64
    kw = dict(device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = torch.randn(B, L, H, D, **kw), torch.randn(B, L, Hk, D, **kw), \
        torch.randn(B, L, Hk, D, **kw)
    bias = torch.randn(B, Hk, L, L, **kw)
    out = fdm.flash_dmattn_func(q, k, v, torch.ones(B, H, L, L, device="cuda"), bias, None,
                                True, None, None, None)
    out.float().square().sum().backward()
    for t in (q, k, v, bias):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("lib", ["torch", "cupy"])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_mask_on_gpu_matches_numpy(lib, causal):
    rng = np.random.default_rng(2)
    bias = rng.standard_normal((2, 4, 96, 160)).astype(np.float32)
    pad = np.ones((2, 1, 1, 160), bool)
    pad[0, ..., :20] = False
    want = fdm.topk_mask(bias, 32, pad, is_causal=causal)
    if lib == "torch":
        got = fdm.topk_mask(torch.from_numpy(bias).cuda(), 32, torch.from_numpy(pad).cuda(),
                            is_causal=causal)
        assert got.is_cuda
        got = got.cpu().numpy()
    else:
        cupy = pytest.importorskip("cupy")
        got = fdm.topk_mask(cupy.asarray(bias), 32, cupy.asarray(pad), is_causal=causal)
        assert isinstance(got, cupy.ndarray)
        got = cupy.asnumpy(got)
    np.testing.assert_array_equal(got, want)


def test_topk_block_mask_runs_sparse_on_gpu():
    import dmattn_cupy as dm

    torch.manual_seed(3)
    B, H, Hk, L, D = 1, 4, 2, 512, 64
    q = torch.randn(B, L, H, D, device="cuda", dtype=torch.float16)
    k = torch.randn(B, L, Hk, D, device="cuda", dtype=torch.float16)
    bias = torch.randn(B, Hk, L, L, device="cuda", dtype=torch.float16)
    bm = fdm.topk_mask(bias, 128, block_size=(64, 64), num_heads=H)
    assert isinstance(bm, dm.BlockBitsetMask)
    out = dm.flash_dmattn_func(q, k, k, attn_bias=bias, sparse_mask=bm)
    dense = torch.as_tensor(bm.to_dense(), device="cuda")  # NumPy or CuPy: both convert
    ref = dm.flash_dmattn_func(q, k, k, attn_bias=bias, attn_mask=dense)
    assert (out.float() - ref.float()).abs().max().item() < 2e-2


def test_create_mask_cuda():
    torch.manual_seed(4)
    bias = torch.randn(2, 2, 64, 256, device="cuda", dtype=torch.bfloat16)
    pad = torch.ones(2, 256, dtype=torch.bool, device="cuda")
    pad[1, :30] = False
    m = fdm.create_mask(bias, pad, 2, 64, 256, 48, torch.finfo(torch.bfloat16).min)
    assert m.is_cuda and m.dtype == torch.bool and m.shape == (2, 2, 64, 256)
    assert not m[1, ..., :30].any() and (m.sum(-1) >= 48).all()
