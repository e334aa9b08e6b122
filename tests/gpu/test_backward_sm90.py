"""The Hopper backward (bwd_sm90, sm_90a, phase 1) against float64 autograd with the factor-3
rule of test_backward.py: d64/d128, bf16/fp16, none/causal/window, GQA groups 1/4, lengths
that are not tile multiples, full (B, H, Sq, Sk) and key-side (B, H, 1, Sk) biases with their
gradients, softcap, rows and keys that see nothing. DMATTN_BWD_FAMILY=bwd_sm90 names the
family (the default on compute capability 9.0 too) and every test asserts that it ran."""

from __future__ import annotations

import pytest
from test_backward import _last_place, _qkv, _run_dense

import dmattn_cupy as dm
from dmattn_cupy import backward

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _hopper_backward(monkeypatch):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a backward runs on compute capability 9.0 only")
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_sm90")
    before = backward.launches["bwd_sm90"]
    yield
    assert backward.launches["bwd_sm90"] > before, "the sm_90a backward did not run"


MODES = {"none": {}, "causal": {"is_causal": True}, "window": {"window_size": (50, 20)}}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("h,hk", [(4, 4), (4, 1)], ids=["g1", "g4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_dense(d, dtype, h, hk, mode):
    q, k, v = _qkv(2, 200, 200, h, hk, d, dtype, seed=d + h + hk)
    _run_dense(q, k, v, seed=1, **MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_ragged_lengths(d, mode):
    """Sq = 130, Sk = 300: partial query and key tiles, several key tiles per head."""
    q, k, v = _qkv(2, 130, 300, 4, 2, d, "bfloat16", seed=d)
    _run_dense(q, k, v, seed=2, **MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("h,hk", [(4, 4), (4, 1)], ids=["g1", "g4"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_full_bias_grad(d, h, hk, mode):
    """dbias = dS per element (Sk = 264: 16-byte bias rows, a partial last key tile)."""
    q, k, v = _qkv(2, 200, 264, h, hk, d, "bfloat16", seed=3 + d)
    bias = torch.randn(2, h, 200, 264, generator=torch.Generator().manual_seed(4)).to(
        "cuda", torch.bfloat16)
    _run_dense(q, k, v, bias=bias, seed=5, **MODES[mode])


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "det"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", ["sk263", "view"])
def test_full_bias_grad_rows_not_16_byte_multiples(layout, mode, deterministic):
    """A bias tile whose rows alone keep it from a tensor map (Sk = 263: 526-byte rows; a view
    starting 2 bytes into its storage) is read from a copy in 16-byte rows (backward.bias_to_pad,
    row_pad); dbias keeps the bias's own shape. Twice: the second step takes the cached plan,
    which repeats the copy."""
    sk = 263 if layout == "sk263" else 264
    q, k, v = _qkv(2, 200, sk, 4, 2, 128, "bfloat16", seed=sk)
    g = torch.Generator().manual_seed(12)
    if layout == "sk263":
        bias = torch.randn(2, 4, 200, sk, generator=g).to("cuda", torch.bfloat16)
    else:
        bias = torch.randn(2, 4, 200, sk + 1, generator=g).to("cuda", torch.bfloat16)[..., 1:]
        assert bias.data_ptr() % 16 == 2
    for _ in range(2):
        _run_dense(q, k, v, bias=bias, seed=13, deterministic=deterministic, **MODES[mode])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("h,hk", [(4, 4), (4, 1)], ids=["g1", "g4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_key_side_bias_grad(d, dtype, h, hk, mode):
    """dbias (B, H, 1, Sk) = the column sums over every query tile of a head."""
    q, k, v = _qkv(2, 300, 200, h, hk, d, dtype, seed=6 + d)
    bias = torch.randn(2, h, 1, 200, generator=torch.Generator().manual_seed(7)).to(
        "cuda", getattr(torch, dtype))
    _run_dense(q, k, v, bias=bias, seed=8, **MODES[mode])


@pytest.mark.parametrize("kw", [{"softcap": 5.0}, {"softcap": 10.0, "is_causal": True}],
                         ids=["softcap", "softcap_causal"])
def test_softcap(kw):
    q, k, v = _qkv(2, 130, 200, 4, 2, 128, "bfloat16", seed=9)
    bias = torch.randn(2, 4, 130, 200, device="cuda", dtype=torch.bfloat16)
    _run_dense(q, k, v, bias=bias, seed=10, **kw)


@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_rows_and_keys_that_see_nothing(d):
    """Causal with Sq > Sk: the first Sq - Sk rows keep nothing (lse -inf): zero dQ and zero
    dbias there, no NaN; a left window leaves early keys unseen: zero dK/dV."""
    q, k, v = _qkv(1, 300, 130, 4, 2, d, "bfloat16", seed=11)
    dq, dk, dv, _ = _run_dense(q, k, v, seed=12, is_causal=True)
    assert (dq[:, :170] == 0).all()
    q, k, v = _qkv(1, 30, 300, 2, 2, d, "bfloat16", seed=13)
    dq, dk, dv, _ = _run_dense(q, k, v, seed=14, window_size=(10, 0))
    assert (dk[:, :260] == 0).all() and (dv[:, :260] == 0).all()


def test_fully_masked_rows_with_bias_grad():
    q, k, v = _qkv(2, 300, 136, 4, 4, 64, "float16", seed=15)
    bias = torch.randn(2, 4, 300, 136, device="cuda", dtype=torch.float16)
    dq, dk, dv, db = _run_dense(q, k, v, bias=bias, seed=16, is_causal=True)
    assert (dq[:, :164] == 0).all() and (db[:, :, :164] == 0).all()


@pytest.mark.parametrize("rows", ["full", "key_row"])
@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
def test_dbias_written_whole_without_zero_fill(d, rows):
    """Without a mask, block lists, causal or window the dbias buffer is not zero-filled
    (backward.py: every tile is visited): poison the caching allocator's blocks of its size with
    NaN first, so any element the kernel left unwritten shows up as NaN against the reference."""
    q, k, v = _qkv(2, 200, 264, 4, 2, d, "bfloat16", seed=17 + d)
    shape = (2, 4, 200 if rows == "full" else 1, 264)
    bias = torch.randn(*shape, generator=torch.Generator().manual_seed(18)).to(
        "cuda", torch.bfloat16)
    junk = [torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)
            for _ in range(8)]
    del junk
    _, _, _, db = _run_dense(q, k, v, bias=bias, seed=19)
    assert torch.isfinite(db).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_shared_key_row_bias_grad_is_rounded_once(dtype):
    """A key row shared by the batch and by groups of heads (1, Hk, 1, Sk): its dbias is the
    float32 sum of every (batch, head) partial, rounded once to the bias's dtype. Expected: dS
    = P (dP - D) in float64 with D from the output the backward read (the library's own), summed
    over rows, batch and group; allowed: one unit in the last place of the result plus float32
    noise of the summed magnitudes. Partials rounded per head first (each to its own last place,
    larger than the sum's where heads cancel) miss it in bf16 and fp16 alike."""
    b, sq, sk, h, hk, d = 3, 300, 200, 8, 2, 64
    q, k, v = _qkv(b, sq, sk, h, hk, d, dtype, seed=31)
    bias = torch.randn(1, hk, 1, sk, generator=torch.Generator().manual_seed(32)).to(q)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(33)).to(q)
    leaf = bias.clone().requires_grad_(True)
    out = dm.flash_dmattn_func(q, k, v, attn_bias=leaf)
    out.backward(dout)
    got = leaf.grad.double()

    g = h // hk
    qd, kd, vd, od, dd = (x.double() for x in (q, k, v, out.detach(), dout))
    kd, vd = kd.repeat_interleave(g, 2), vd.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * d ** -0.5 + bias.double().repeat_interleave(g, 1)
    p = torch.softmax(s, -1)
    dp = torch.einsum("bqhd,bkhd->bhqk", dd, vd)
    big_d = (dd * od).sum(-1).transpose(1, 2)[..., None]   # (b, h, sq, 1)
    ds = p * (dp - big_d)

    def per_bias_element(x):   # (b, h, sq, sk) -> (1, hk, 1, sk)
        return x.sum((0, 2)).reshape(hk, g, sk).sum(1)[None, :, None, :]
    want, size = per_bias_element(ds), per_bias_element(ds.abs())
    ulp = _last_place(want, getattr(torch, dtype))
    excess = (got - want).abs() - (ulp + 1e-5 * size)
    assert excess.max().item() <= 0, (
        f"dbias off by more than one ulp: worst excess {excess.max().item():.3e} at "
        f"{divmod(int(excess.argmax()), sk)} (got {got.flatten()[excess.argmax()].item():.6g},"
        f" want {want.flatten()[excess.argmax()].item():.6g})")
