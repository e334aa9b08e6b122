"""The CUDA forward kernel against the float64 reference (FlashAttention's tolerance rule)."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("both_forward_families")]


def _poison_allocator(nbytes: int) -> None:
    """Leave NaN-filled blocks in torch's caching allocator so the kernel's freshly allocated
    outputs start as NaN: any element the kernel fails to write shows up as NaN."""
    n = max(1, nbytes // 2)
    blocks = [torch.full((n,), float("nan"), dtype=torch.float16, device="cuda") for _ in range(4)]
    del blocks


def _qkv(b, sq, sk, h, hk, d, dtype, seed, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = getattr(torch, dtype)
    q = torch.randn(b, sq, h, d, generator=g).to(device=device, dtype=dt)
    k = torch.randn(b, sk, hk, d, generator=g).to(device=device, dtype=dt)
    v = torch.randn(b, sk, hk, d, generator=g).to(device=device, dtype=dt)
    return q, k, v


def _run_and_check(q, k, v, dtype, mask=None, bias=None, **kw):
    _poison_allocator(q.numel() * q.element_size())
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True,
                                    **kw)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    scale = kw.get("softmax_scale") or 1.0 / np.sqrt(q.shape[-1])
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0 if window[1] < 0 else min(window[1], 0)
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias), scale=scale,
                    softcap=kw.get("softcap", 0.0), window=tuple(window))
    assert_fa_close(out, lse, ref_args, str(q.dtype).removeprefix("torch."))
    return out, lse


DTYPES = ["float16", "bfloat16"]
HEAD_DIMS = [8, 32, 40, 64, 96, 128, 160, 192, 256]


@pytest.mark.parametrize("d", HEAD_DIMS, ids=[f"d{d}" for d in HEAD_DIMS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_head_dim(d, dtype):
    q, k, v = _qkv(2, 37, 45, 3, 3, d, dtype, seed=d)
    _run_and_check(q, k, v, dtype)


SEQLENS = [1, 7, 8, 9, 31, 32, 33, 127, 128, 129, 1029]


@pytest.mark.parametrize("sk", SEQLENS, ids=[f"sk{s}" for s in SEQLENS])
@pytest.mark.parametrize("sq", [1, 8, 9, 130, 1001], ids=lambda s: f"sq{s}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lengths_and_causal(sq, sk, causal):
    q, k, v = _qkv(1, sq, sk, 2, 1, 64, "bfloat16", seed=sq * 7919 + sk)
    _run_and_check(q, k, v, "bfloat16", is_causal=causal)


@pytest.mark.parametrize("h,hk", [(8, 8), (8, 4), (8, 2), (8, 1)], ids=lambda x: str(x))
def test_gqa_mqa(h, hk):
    q, k, v = _qkv(2, 65, 70, h, hk, 64, "float16", seed=h * 10 + hk)
    _run_and_check(q, k, v, "float16", is_causal=True)


B, H, HK, SQ, SK = 2, 4, 2, 70, 91
PATTERNS = {
    "full": (B, H, SQ, SK), "b1": (1, H, SQ, SK), "h1": (B, 1, SQ, SK), "hk": (B, HK, SQ, SK),
    "q1": (B, H, 1, SK), "k1": (B, H, SQ, 1), "kside_hk": (B, HK, 1, SK),
    "kside_111": (1, 1, 1, SK), "scalar": (1, 1, 1, 1),
}


def _expanded(shape, dtype, seed, kind):
    """A random mask/bias of the reduced ``shape``: size-1 dims are broadcast by the kernel."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "mask":
        base = torch.rand(*shape, generator=g) > 0.3
    else:
        base = torch.randn(*shape, generator=g).to(getattr(torch, dtype))
    return base.to("cuda")


@pytest.mark.parametrize("pattern", list(PATTERNS), ids=list(PATTERNS))
@pytest.mark.parametrize("what", ["mask", "bias", "both"])
def test_mask_bias_broadcast(pattern, what):
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "bfloat16", seed=sum(map(ord, pattern)))
    shape = PATTERNS[pattern]
    mask = _expanded(shape, "bool", 1, "mask") if what in ("mask", "both") else None
    bias = _expanded(shape, "bfloat16", 2, "bias") if what in ("bias", "both") else None
    _run_and_check(q, k, v, "bfloat16", mask=mask, bias=bias)


def test_expand_views_are_read_in_place():
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "float16", seed=5)
    bias = torch.randn(1, 1, 1, SK, device="cuda", dtype=torch.float16).expand(B, H, SQ, SK)
    mask = (torch.rand(B, 1, 1, SK, device="cuda") > 0.2).expand(B, H, SQ, SK)
    assert bias.stride()[:3] == (0, 0, 0)
    _run_and_check(q, k, v, "float16", mask=mask, bias=bias)


def test_float32_bias_with_bf16_inputs():
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "bfloat16", seed=6)
    bias = torch.randn(B, H, SQ, SK, device="cuda", dtype=torch.float32)
    _run_and_check(q, k, v, "bfloat16", bias=bias)


@pytest.mark.parametrize("window", [(16, 0), (0, 16), (40, 7), (-1, 3), (5, -1)], ids=str)
@pytest.mark.parametrize("sq,sk", [(100, 100), (60, 130), (130, 60)], ids=str)
def test_sliding_window(window, sq, sk):
    q, k, v = _qkv(2, sq, sk, 2, 2, 64, "bfloat16", seed=sum(window) + sq)
    _run_and_check(q, k, v, "bfloat16", window_size=window)


@pytest.mark.parametrize("cap", [5.0, 30.0])
def test_softcap_and_scale(cap):
    q, k, v = _qkv(2, 50, 77, 4, 2, 128, "float16", seed=int(cap))
    bias = torch.randn(2, 4, 50, 77, device="cuda", dtype=torch.float16)
    _run_and_check(q, k, v, "float16", bias=bias, softcap=cap, softmax_scale=0.3)


def test_fully_masked_rows_give_zero_and_neg_inf():
    q, k, v = _qkv(2, 40, 50, 2, 2, 64, "bfloat16", seed=9)
    mask = torch.rand(2, 2, 40, 50, device="cuda") > 0.5
    mask[:, :, ::3] = False
    out, lse = _run_and_check(q, k, v, "bfloat16", mask=mask)
    assert (out[:, ::3] == 0).all()
    assert torch.isneginf(lse[:, :, ::3]).all()
    # causal with Sq > Sk: the first Sq - Sk rows see no key at all
    q, k, v = _qkv(1, 90, 30, 2, 2, 64, "bfloat16", seed=10)
    out, lse = _run_and_check(q, k, v, "bfloat16", is_causal=True)
    assert (out[:, :60] == 0).all() and torch.isneginf(lse[:, :, :60]).all()


def test_empty_keys():
    q, k, v = _qkv(1, 5, 0, 2, 2, 64, "float16", seed=11)
    out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_non_contiguous_views_batch3():
    big = torch.randn(3, 80, 6, 2 * 64, device="cuda", dtype=torch.bfloat16)
    q = big[:, 5:69, ::2, :64]              # strided heads, offset rows, half of last dim
    kv = torch.randn(3, 6, 90, 64, device="cuda", dtype=torch.bfloat16)
    k = kv[:, :3].transpose(1, 2)            # (3, 90, 3, 64) with head/row strides swapped
    v = kv[:, 3:].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    _run_and_check(q, k, v, "bfloat16", is_causal=True)


@pytest.mark.parametrize("how", ["odd_pointer", "odd_row_stride"])
def test_misaligned_rows_take_the_copy_path(how):
    """q/k/v rows the tensor-core kernel cannot read with 16-byte copies are copied once."""
    if how == "odd_pointer":  # storage offset of one element: rows start 2 bytes off
        flat = torch.randn(3 * 2 * 70 * 4 * 64 + 1, device="cuda", dtype=torch.float16)
        q, k, v = (flat[1 + i * 2 * 70 * 4 * 64:][:2 * 70 * 4 * 64].view(2, 70, 4, 64)
                   for i in range(3))
        assert q.data_ptr() % 16 != 0
    else:  # row stride 68 elements: not a multiple of 8
        q, k, v = (torch.randn(2, 70, 4, 68, device="cuda", dtype=torch.float16)[..., :64]
                   for _ in range(3))
    bias = torch.randn(2, 4, 70, 70, device="cuda", dtype=torch.float16)
    _run_and_check(q, k, v, "float16", bias=bias, is_causal=True)


def test_non_default_torch_stream():
    q, k, v = _qkv(2, 300, 300, 4, 4, 64, "float16", seed=12)
    s = torch.cuda.Stream()
    ref = dm.flash_dmattn_func(q, k, v)
    with torch.cuda.stream(s):
        out = dm.flash_dmattn_func(q, k, v)
    s.synchronize()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_cupy_inputs():
    cupy = pytest.importorskip("cupy")
    q, k, v = _qkv(2, 33, 47, 4, 2, 64, "float16", seed=13)
    cq, ck, cv = (cupy.from_dlpack(t) for t in (q, k, v))
    mask = cupy.random.rand(2, 1, 33, 47) > 0.3
    out, lse = dm.flash_dmattn_func(cq, ck, cv, attn_mask=mask, is_causal=True, return_lse=True)
    cupy.cuda.get_current_stream().synchronize()
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float16
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=cupy.asnumpy(mask), bias=None,
                    scale=1 / 8, window=(-1, 0))
    assert_fa_close(out, lse, ref_args, "float16")


def test_mask_with_more_than_2_pow_31_elements():
    sq, sk = 32768, 32800
    mask = torch.ones(2, 1, sq, sk, dtype=torch.bool, device="cuda")
    assert mask.numel() > 2**31
    rows = torch.tensor([0, 1, sq // 2, sq - 2, sq - 1], device="cuda")
    mask[1, 0, rows] = torch.rand(len(rows), sk, device="cuda") > 0.5
    q, k, v = _qkv(2, sq, sk, 1, 1, 32, "bfloat16", seed=14)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, return_lse=True)
    torch.cuda.synchronize()
    # Rows are independent without causal: check the last batch's selected rows exactly.
    sel = rows.cpu().numpy()
    ref_args = dict(q=f64(q[1:, sel]), k=f64(k[1:]), v=f64(v[1:]), mask=f64(mask[1:, :, sel]),
                    bias=None, scale=1 / np.sqrt(32), window=(-1, -1))
    assert_fa_close(out[1:, sel], lse[1:, :, sel], ref_args, "bfloat16")
    del mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_lse_only_when_asked(dtype):
    q, k, v = _qkv(1, 10, 10, 2, 2, 32, dtype, seed=15)
    out = dm.flash_dmattn_func(q, k, v)
    assert isinstance(out, torch.Tensor)


SPARSE = {
    "causal": lambda sq, sk: dm.CausalMask(sq, sk),
    "window": lambda sq, sk: dm.WindowMask((40, 9), sq, sk),
    "causal_window": lambda sq, sk: dm.CausalWindowMask(33, sq, sk),
    "and": lambda sq, sk: dm.CausalMask(sq, sk) & dm.WindowMask(50, sq, sk),
}


@pytest.mark.parametrize("name", list(SPARSE))
@pytest.mark.parametrize("sq,sk", [(200, 200), (90, 260), (260, 90)], ids=str)
def test_parametric_sparse_masks(name, sq, sk):
    q, k, v = _qkv(2, sq, sk, 4, 2, 64, "bfloat16", seed=sq + sk)
    mask = SPARSE[name](sq, sk)
    bias = torch.randn(2, 4, 1, sk, device="cuda", dtype=torch.bfloat16)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, sparse_mask=mask, return_lse=True)
    torch.cuda.synchronize()
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=mask.to_dense()[None, None],
                    bias=f64(bias), scale=1 / 8, window=(-1, -1))
    assert_fa_close(out, lse, ref_args, "bfloat16")
