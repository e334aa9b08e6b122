"""The Hopper forward family (fwd_sm90, compute capability 9.0) against the float64 reference:
every mask/bias broadcast pattern on a layout TMA can read, the boundary where the selector
falls back to the portable family, tile classes from the debug counters (all-false mask tiles
never load K/V: NaN-poisoned keys there change nothing; all-true tiles do no masking)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy import env, row_bias, runtime
from dmattn_cupy import forward as fwd_module
from dmattn_cupy.forward import collapsed_broadcasts, run_forward, select_fwd_spec
from dmattn_cupy.validate import check_dense

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]


def _qkv(b, sq, sk, h, hk, d, dtype="bfloat16", seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    return tuple(torch.randn(b, s, n, d, generator=g).to("cuda", dt)
                 for s, n in ((sq, h), (sk, hk), (sk, hk)))


def _family(q, k, v, mask=None, bias=None, **kw):
    """The family of the attention launch that runs (a bias of one value per query row: the
    forward without it, then the lse shift, as forward_call decides)."""
    pb = check_dense(q, k, v, mask, bias, kw.get("softmax_scale"), kw.get("is_causal", False),
                     kw.get("window_size", (-1, -1)), kw.get("softcap", 0.0), "cuda")
    collapsed = collapsed_broadcasts(pb)
    if row_bias.shifts_bias(collapsed, runtime.device_props(pb.q.device)):
        return select_fwd_spec(dataclasses.replace(collapsed, bias=None)).family
    return select_fwd_spec(pb).family


# where a bias broadcast over keys runs: an lse shift after the Hopper forward (row_bias,
# DMATTN_FWD_ROW_BIAS=1, the default) or the portable kernel
PER_QUERY_BIAS_FAMILY = "fwd_sm90" if env.fwd_row_bias() else "fwd_mma"


def _check(q, k, v, mask=None, bias=None, family="fwd_sm90", **kw):
    if family is not None:
        assert _family(q, k, v, mask, bias, **kw) == family
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True, **kw)
    torch.cuda.synchronize()
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0 if window[1] < 0 else min(window[1], 0)
    scale = kw.get("softmax_scale") or 1.0 / np.sqrt(q.shape[-1])
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias),
                                   scale=scale, softcap=kw.get("softcap", 0.0),
                                   window=tuple(window)), str(q.dtype).removeprefix("torch."))
    return out, lse


B, H, HK, SQ, SK = 2, 4, 2, 150, 256
PATTERNS = {
    "full": (B, H, SQ, SK), "b1": (1, H, SQ, SK), "h1": (B, 1, SQ, SK), "hk": (B, HK, SQ, SK),
    "q1": (B, H, 1, SK), "k1": (B, H, SQ, 1), "kside_hk": (B, HK, 1, SK),
    "kside_111": (1, 1, 1, SK), "scalar": (1, 1, 1, 1),
}


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("pattern", list(PATTERNS), ids=list(PATTERNS))
@pytest.mark.parametrize("what", ["mask", "bias", "both"])
def test_every_broadcast_pattern(what, pattern, d):
    if d == 256 and what == "both":
        pytest.skip("d256 with mask and bias stays on the portable family (shared memory)")
    q, k, v = _qkv(B, SQ, SK, H, HK, d, seed=sum(map(ord, pattern)) + d)
    g = torch.Generator().manual_seed(7)
    shape = PATTERNS[pattern]
    mask = (torch.rand(*shape, generator=g) > 0.3).cuda() if what != "bias" else None
    bias = torch.randn(*shape, generator=g).to("cuda", torch.bfloat16) if what != "mask" else None
    per_query_bias = bias is not None and shape[-1] == 1
    _check(q, k, v, mask, bias, family=PER_QUERY_BIAS_FAMILY if per_query_bias else "fwd_sm90")


def _families_run(monkeypatch):
    """The families forward_call selects from now on (after any padded copies)."""
    seen = []
    real = fwd_module.select_fwd_spec

    def spy(pb, *a, **kw):
        spec = real(pb, *a, **kw)
        seen.append(spec.family)
        return spec

    monkeypatch.setattr(fwd_module, "select_fwd_spec", spy)
    return seen


@pytest.mark.parametrize("sk,padded", [(248, False), (250, True), (256, False)])
def test_tma_boundary_on_bias_rows(sk, padded, monkeypatch):
    """A bias row of Sk bf16 values is a TMA row only when Sk * 2 is a multiple of 16 bytes;
    otherwise the bias is first copied into 16-byte rows (forward.operands_to_pad), and the
    Hopper family runs either way, with the same results."""
    q, k, v = _qkv(1, 130, sk, 2, 2, 128, seed=sk)
    bias = torch.randn(1, 2, 130, sk, device="cuda", dtype=torch.bfloat16)
    pb = check_dense(q, k, v, None, bias, None, False, (-1, -1), 0.0, "cuda")
    assert fwd_module.operands_to_pad(pb) == (("bias",) if padded else ())
    seen = _families_run(monkeypatch)
    _check(q, k, v, bias=bias, family="fwd_mma" if padded else "fwd_sm90")
    assert seen == ["fwd_sm90"]


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}], ids=str)
@pytest.mark.parametrize("layout", ["hf_mask", "bias_tile", "mask_and_bias", "key_row_mask",
                                    "expanded_mask", "misaligned_mask", "strided_mask"])
def test_unaligned_mask_bias_rows_are_padded_for_hopper(layout, kw, monkeypatch):
    """Layouts TMA cannot read (rows of an odd number of bytes, a view starting off 16 bytes,
    a stride-0 head dimension beside such rows) are copied into 16-byte rows once per call
    and run on fwd_sm90 (they ran on the portable family, ~3x slower): an HF-style
    (B, 1, Sq, Sk) bool mask at Sk = 1001, a bias tile, both, a key-row mask, a mask expanded
    over heads, a misaligned mask view (one pitched copy), a mask with keys 2 apart (copied
    element by element)."""
    b, sq, sk, h = 2, 200, 1001, 4
    q, k, v = _qkv(b, sq, sk, h, 2, 128, seed=len(layout))
    g = torch.Generator().manual_seed(31)
    mask = bias = None
    if layout in ("hf_mask", "mask_and_bias"):
        mask = (torch.rand(b, 1, sq, sk, generator=g) > 0.2).cuda()
    if layout in ("bias_tile", "mask_and_bias"):
        bias = torch.randn(b, h, sq, sk, generator=g).to("cuda", torch.bfloat16)
    if layout == "key_row_mask":
        mask = (torch.rand(b, 1, 1, sk, generator=g) > 0.2).cuda()
    if layout == "expanded_mask":
        mask = (torch.rand(b, 1, sq, sk, generator=g) > 0.2).cuda().expand(b, h, sq, sk)
    if layout == "strided_mask":  # keys 2 apart: copied element by element
        mask = (torch.rand(b, 1, sq, 2 * sk, generator=g) > 0.2).cuda()[..., ::2]
    if layout == "misaligned_mask":
        mask = (torch.rand(b, 1, sq, 1024 + 3, generator=g) > 0.2).cuda()[..., 3:sk + 3]
        assert mask.data_ptr() % 16 != 0
    pb = fwd_module.collapsed_broadcasts(check_dense(
        q, k, v, mask, bias, None, kw.get("is_causal", False), (-1, -1), 0.0, "cuda"))
    assert fwd_module.operands_to_pad(pb) == tuple(
        n for n, x in (("mask", mask), ("bias", bias)) if x is not None)
    seen = _families_run(monkeypatch)
    _check(q, k, v, mask, bias, family="fwd_mma", **kw)
    assert seen == ["fwd_sm90"]


def test_fp32_bias_tiles_fall_back_and_per_query_biases_shift():
    q, k, v = _qkv(2, 100, 128, 2, 2, 64, seed=3)
    _check(q, k, v, bias=torch.randn(2, 2, 100, 128, device="cuda"), family="fwd_mma")
    _check(q, k, v, bias=torch.randn(2, 2, 100, 1, device="cuda"), family=PER_QUERY_BIAS_FAMILY)


@pytest.mark.parametrize("value", [float("-inf"), float("inf"), float("nan")], ids=str)
def test_non_finite_per_query_bias_matches_the_reference(value):
    """A (B, H, Sq, 1) bias of -inf drops its row (out 0, lse -inf); +inf or NaN makes the row
    NaN, as on the reference backend."""
    q, k, v = _qkv(1, 130, 256, 2, 2, 128, seed=13)
    bias = torch.zeros(1, 2, 130, 1, device="cuda", dtype=torch.bfloat16)
    bias[0, 1, 7] = value
    assert _family(q, k, v, bias=bias) == PER_QUERY_BIAS_FAMILY
    out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True)
    ref, ref_lse = dm.flash_dmattn_func(q.cpu(), k.cpu(), v.cpu(), attn_bias=bias.cpu(),
                                        return_lse=True, backend="reference")
    row_out, row_lse = out[0, 7, 1].float().cpu(), lse[0, 1, 7].cpu()
    if value == float("-inf"):
        assert (row_out == 0).all() and torch.isneginf(row_lse)
    else:
        assert torch.isnan(row_out).all() and torch.isnan(row_lse)
    assert torch.isnan(ref[0, 7, 1].float()).all() == torch.isnan(row_out).all()


def test_misaligned_views_are_copied_then_served():
    """A q whose base is not 16-byte aligned cannot be a tensor map: the forward copies it
    once to an aligned buffer, which this family then reads."""
    q, k, v = _qkv(1, 200, 300, 2, 2, 128, seed=4)
    n = q.numel()
    q2 = torch.empty(n + 8, device="cuda", dtype=q.dtype)[1:n + 1].view(q.shape)
    q2.copy_(q)
    assert q2.data_ptr() % 16 != 0 and _family(q2, k, v) == "fwd_mma"
    _check(q2, k, v, family=None, is_causal=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kw", [{"is_causal": True}, {"window_size": (200, 30)},
                                {"softcap": 8.0}, {"softmax_scale": 0.05}], ids=str)
def test_long_rows_gqa(kw, dtype):
    q, k, v = _qkv(2, 1000, 1300, 8, 2, 128, dtype, seed=11)
    _check(q, k, v, **kw)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"window_size": (200, 30)},
                                {"softcap": 8.0}, {"softmax_scale": 0.05},
                                {"softmax_scale": 0.125}, {"softmax_scale": 2e-5}], ids=str)
def test_key_row_bias_long_rows(kw, dtype):
    """A (B, H|1, 1, Sk) bias over 8 key tiles, the last partial (Sk % 128 != 0), with -inf
    keys: the key-row path, and what the DM_SM90_KBIAS_F32 variants change (an fp32 row
    stored by the producer; with 2 folded into S's accumulator, except under a softcap; with 4,
    the default, added by one more k16 step of S = Q K^T: 1 / scale in three parts, of which
    0.125's second and third are 0 (1 / scale = 8: their columns must stay 0 beside -inf keys);
    under a softcap, and in fp16 where 1 / scale >= 2^15 (2e-5), the consumers add the row
    instead)."""
    q, k, v = _qkv(2, 300, 1000, 4, 2, 128, dtype, seed=13)
    g = torch.Generator().manual_seed(14)
    bias = (2 * torch.randn(2, 4, 1, 1000, generator=g)).to("cuda", getattr(torch, dtype))
    bias[..., 17::97] = float("-inf")
    _check(q, k, v, bias=bias, **kw)
    _check(q, k, v, bias=bias[:1, :1], **kw)  # (1, 1, 1, Sk): batch and heads broadcast


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"window_size": (100, 7)},
                                {"softcap": 8.0}], ids=str)
@pytest.mark.parametrize("layout", ["sk_odd", "misaligned", "strided_keys", "gqa_hk"])
def test_key_row_bias_any_layout_stays_hopper(layout, kw):
    """A key-row bias without a mask is read by the producer's plain loads (no tensor map):
    rows of an odd key count (2 * Sk bytes, not a 16-byte multiple), a view starting off 16
    bytes, keys 2 apart and a (B, Hk, 1, Sk) one all run on fwd_sm90 (they went to the
    portable family while the row came by TMA), against the reference."""
    sk = 1001 if layout != "strided_keys" else 1000
    q, k, v = _qkv(2, 260, sk, 4, 2, 128, seed=len(layout))
    g = torch.Generator().manual_seed(21)
    if layout == "misaligned":  # element 3 of each padded row: 6 bytes past 16
        bias = torch.randn(2, 4, 1, sk + 5, generator=g).to("cuda", torch.bfloat16)[..., 3:sk + 3]
        assert bias.data_ptr() % 16 != 0
    elif layout == "strided_keys":
        bias = torch.randn(2, 4, 1, 2 * sk, generator=g).to("cuda", torch.bfloat16)[..., ::2]
        assert bias.stride(-1) == 2
    else:
        bias = torch.randn(2, 2 if layout == "gqa_hk" else 4, 1, sk,
                           generator=g).to("cuda", torch.bfloat16)
    bias[..., 5::113] = float("-inf")
    _check(q, k, v, bias=bias, **kw)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}], ids=str)
def test_mask_bias_long_rows(kw, d):
    """A full (B, H, Sq, Sk) mask + bias over 16 key tiles of 64 (the last partial), with
    all-false and all-true tiles: the mask ring and the K/V/bias stages wrap several times
    (what DM_SM90_MB_STAGES / DM_SM90_MB_MASK_SLOTS change)."""
    q, k, v = _qkv(2, 300, 1008, 4, 2, d, seed=15)
    g = torch.Generator().manual_seed(16)
    mask = torch.rand(2, 4, 300, 1008, generator=g) > 0.1
    mask[0, 1, :, 128:320] = False  # key tiles 2-4 all false: skipped
    mask[1, 2, :, 448:576] = True   # key tiles 7-8 all true: no per-element masking
    bias = torch.randn(2, 4, 300, 1008, generator=g).to(torch.bfloat16)
    _check(q, k, v, mask.cuda(), bias.cuda(), **kw)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("step", [0.0, 5.0, 7.0, 40.0], ids=lambda x: f"step{x:g}")
def test_row_max_rising_tile_by_tile(step, d, dtype):
    """Key tiles run from the last to the first; a full bias rising by `step` (natural log)
    per 64 keys toward key 0 raises every row's max tile by tile. DM_SM90_LAZY_RESCALE keeps a
    row's max while a tile raises it by at most 8 in log2 units (5.5 natural: steps 5 per 64
    keys stay within it on 64-key tiles; 128-key tiles see 10 and 14), probabilities up to
    2^8 then reach the P V product; larger rises rescale O as before. Output and lse match the
    reference either way, with the query row bias beside it (some rows far above the rest)."""
    sq, sk = 200, 1024
    q, k, v = _qkv(1, sq, sk, 2, 2, d, dtype, seed=21)
    keys = torch.arange(sk, dtype=torch.float32)
    bias = (-(step / 64) * keys).expand(1, 2, sq, sk).clone()
    bias[0, 1, ::7] += 30.0 * torch.randn(bias[0, 1, ::7].shape,
                                          generator=torch.Generator().manual_seed(22))
    _check(q, k, v, bias=bias.to("cuda", getattr(torch, dtype)))
    # without a bias: scores rising over the tiles (keys scaled up toward key 0)
    kk = k * torch.linspace(4.0, 0.5, sk, device="cuda").to(k.dtype)[None, :, None, None]
    _check(q, kk, v)


def _counters(q, k, v, mask):
    pb = check_dense(q, k, v, mask, None, None, False, (-1, -1), 0.0, "cuda")
    spec = select_fwd_spec(pb, debug_counters=True)
    assert spec.family == "fwd_sm90"
    nm = math.ceil(q.shape[1] / spec.block_m)
    counters = torch.zeros(q.shape[0], q.shape[2], nm, 2, dtype=torch.int32, device="cuda")
    out, lse = run_forward(pb, q, tile_counters=counters)
    torch.cuda.synchronize()
    return out, counters.cpu().numpy(), spec


def test_all_false_tiles_never_load_and_full_tiles_are_not_masked():
    sq, sk = 256, 1024
    q, k, v = _qkv(1, sq, sk, 2, 2, 64, seed=8)
    mask = torch.zeros(1, 2, sq, sk, dtype=torch.bool, device="cuda")
    mask[..., 512:640] = True            # key tile 4 all true
    mask[..., 700:710] = True            # key tile 5 partly true
    k[:, :512] = float("nan")            # tiles 0-3 are all false: never loaded
    v[:, :512] = float("nan")
    out, c, spec = _counters(q, k, v, mask)
    assert spec.block_n == 128
    assert (c[..., 0] == 2).all() and (c[..., 1] == 1).all()  # tiles 4 and 5; only 5 masked
    assert torch.isfinite(out).all()
    k[:, :512] = 0
    v[:, :512] = 0
    _check(q, k, v, mask)


def test_query_row_mask_keeps_or_drops_rows():
    q, k, v = _qkv(2, 130, 256, 2, 2, 128, seed=12)
    rows = torch.rand(2, 2, 130, 1, device="cuda") > 0.2   # a mask per query row: keep / drop
    out, lse = _check(q, k, v, rows)
    dropped = ~rows[..., 0]
    assert (out.transpose(1, 2)[dropped] == 0).all() and torch.isneginf(lse[dropped]).all()
