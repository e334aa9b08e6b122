"""A bias broadcast over keys as an lse shift after the Hopper forward (``row_bias``,
``DMATTN_FWD_ROW_BIAS``), on the CPU: the shift's rules (a NumPy model of
cuda_src/fwd_row_bias.cu) against the float64 reference with the bias, edge values included;
which problems take it; and the plan it builds, GPU stubbed (the ``cap`` fixture of
test_fastpath): the forward without the bias, then the shift reading the forward's lse, the
bias and out, on the validated path and on the thin path alike."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import test_fastpath as tf  # noqa: E402  (tests/cpu is on sys.path: pytest's rootdir import)

import dmattn_cupy as dm  # noqa: E402
from dmattn_cupy import backward_sm90, fastpath, reference, reference_bwd, row_bias  # noqa: E402
from dmattn_cupy.arrays import ArrayInfo  # noqa: E402
from dmattn_cupy.device import PRESETS  # noqa: E402
from dmattn_cupy.validate import Problem  # noqa: E402

cap = tf.cap   # the fixture


def shift_model(lse0: np.ndarray, out0: np.ndarray, bias: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """fwd_row_bias.cu on (B, H, Sq) lse and (B, Sq, H, D) out of the forward without the bias;
    ``bias`` broadcastable to (B, H, Sq)."""
    b = np.broadcast_to(np.asarray(bias, dtype=np.float64), lse0.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        low = b.astype(np.float32) * np.float32(np.log2(np.e)) == -np.inf
    live = lse0 != -np.inf
    nan = live & (np.isnan(b) | (b == np.inf))
    dropped = live & ~nan & low
    lse = np.where(live & ~nan & ~low, lse0 + np.where(np.isfinite(b), b, 0.0), lse0)
    lse = np.where(nan, np.nan, np.where(dropped, -np.inf, lse))
    rows = lambda x: np.transpose(x, (0, 2, 1))[..., None]  # noqa: E731
    out = np.where(rows(nan), np.nan, np.where(rows(dropped), 0.0, out0))
    return lse, out


@pytest.mark.parametrize("softcap,window", [(0.0, (-1, -1)), (20.0, (-1, -1)), (0.0, (3, 0))])
@pytest.mark.parametrize("scalar", [False, True])
def test_shift_rules_match_the_reference(softcap, window, scalar):
    """Forward without the bias + the shift == the reference with the bias: finite values up
    to +-1e6 shift lse and leave out; NaN and +inf make the row NaN; -inf and a value below
    LOWEST_LOGIT drop it (out 0, lse -inf); a row the mask already drops stays dropped,
    whatever its bias. The rules as a NumPy model of fwd_row_bias.cu against the reference:
    the kernel itself is held to them by tests/gpu/test_row_bias.py."""
    rng = np.random.default_rng(7)
    B, H, Sq, Sk, D = 2, 3, 6, 9, 4
    q, k, v = (rng.standard_normal((B, s, H, D)) for s in (Sq, Sk, Sk))
    mask = rng.random((B, H, Sq, Sk)) < 0.8
    mask[0, 1, 2] = False                       # a row with no allowed key
    if scalar:
        cases = (np.array([[[[3.5]]]]), np.array([[[[np.nan]]]]), np.array([[[[-np.inf]]]]))
    else:
        bias = rng.uniform(-1e4, 1e4, (B, H, Sq, 1))
        bias[0, 0, :4, 0] = (np.nan, np.inf, -np.inf, -3e38)   # -3e38 < LOWEST_LOGIT
        bias[1, 2, 0, 0] = -1e6       # larger ones the float64 reference itself absorbs
        bias[0, 1, 2, 0] = np.nan                              # on the dropped row
        cases = (bias,)
    seen = np.zeros(3, dtype=bool)   # the cases reach NaN, dropped and finite rows
    for bias in cases:
        ref_out, ref_lse = reference.dense_forward(q, k, v, mask, bias, 0.5, softcap, window)
        seen |= [np.isnan(ref_lse).any(), np.isneginf(ref_lse).any(),
                 np.isfinite(ref_lse).any()]
        out0, lse0 = reference.dense_forward(q, k, v, mask, None, 0.5, softcap, window)
        lse, out = shift_model(lse0, out0, bias[..., 0])
        np.testing.assert_array_equal(np.isnan(lse), np.isnan(ref_lse))
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
        np.testing.assert_allclose(lse, ref_lse, rtol=1e-12, atol=1e-9)
        np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))
        np.testing.assert_allclose(out, ref_out, rtol=1e-9, atol=1e-12)
    assert seen.all()


def _problem(bias_shape, dtype="bfloat16", d=128, varlen=False):
    b, h, sq, sk = 2, 4, 300, 520

    def info(shape, dt="bfloat16"):
        st = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
        return ArrayInfo("torch", dt, tuple(shape), tuple(st), 0, 1 << 20)

    return Problem(kind="torch", backend="cuda", varlen=varlen, batch=b, seqlen_q=sq,
                   seqlen_k=sk, heads=h, kv_heads=2, head_dim=d, dtype="bfloat16", scale=1.0,
                   softcap=0.0, window=(-1, -1), q=info((b, sq, h, d)), k=info((b, sk, 2, d)),
                   v=info((b, sk, 2, d)), mask=None,
                   bias=None if bias_shape is None else info(bias_shape, dtype))


def test_which_problems_shift(monkeypatch):
    """DMATTN_FWD_ROW_BIAS=1: a dense bias of one value per query row or a scalar, any bias
    dtype, on the Hopper family; not a key row, a tile, a varlen call, another family (A100,
    forced) or with the switch off."""
    h100, a100 = PRESETS["sm_90"], PRESETS["sm_80"]
    rows = ((2, 4, 300, 1), (1, 1, 300, 1), (1, 1, 1, 1), (2, 1, 300, 1))
    monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", "0")
    assert not any(row_bias.shifts_bias(_problem(s), h100) for s in rows)
    monkeypatch.delenv("DMATTN_FWD_ROW_BIAS")     # on by default
    for shape in rows:
        for dt in ("bfloat16", "float32"):
            for d in (64, 128, 256):
                assert row_bias.shifts_bias(_problem(shape, dt, d), h100), (shape, dt, d)
    for shape in ((2, 4, 1, 520), (2, 4, 300, 520), None):
        assert not row_bias.shifts_bias(_problem(shape), h100), shape
    assert not row_bias.shifts_bias(_problem((2, 4, 300, 1)), a100)
    monkeypatch.setenv("DMATTN_FWD_FAMILY", "fwd_mma")
    assert not row_bias.shifts_bias(_problem((2, 4, 300, 1)), h100)
    monkeypatch.delenv("DMATTN_FWD_FAMILY")
    pb = _problem((2, 4, 300, 1))
    assert not row_bias.shifts_bias(dataclasses.replace(pb, varlen=True), h100)
    monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", "2")
    with pytest.raises(ValueError, match="DMATTN_FWD_ROW_BIAS"):
        row_bias.shifts_bias(pb, h100)


@pytest.mark.parametrize("lse", [False, True])
@pytest.mark.parametrize("shape,mask", [((2, 4, 40, 1), None), ((1, 1, 1, 1), None),
                                        ((2, 4, 40, 1), "shared"), ((2, 4, 40, 1), "block")],
                         ids=["rows", "scalar", "rows_shared_mask", "rows_block_mask"])
def test_plan_runs_the_forward_then_the_shift(cap, monkeypatch, lse, shape, mask):
    """The forward launches without the bias (after the attn_mask route's two launches for a
    shared mask; beside a block mask, on its lists), then fwd_row_bias with the bias, out and
    the forward's lse (made for it when the caller did not ask for lse); a repeated call's thin
    launches equal a fresh validated build's, pointers included."""
    monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", "1")
    B, S, Sk, H, Hk, D = 2, 40, 48, 4, 2, 64
    route = [("mask_pack",), ("mask_lists",)] if mask == "shared" else []
    block = dm.BlockBitsetMask(np.array([[True]]), S, Sk, block_size=(128, 128))

    def call(seed):
        q = tf._rand(B, S, H, D, seed=seed)
        k, v = tf._rand(B, Sk, Hk, D, seed=seed + 1), tf._rand(B, Sk, Hk, D, seed=seed + 2)
        bias = tf._rand(*shape, seed=seed + 3)
        kw = ({"attn_mask": torch.rand(B, 1, S, Sk) > 0.2} if mask == "shared"
              else {"sparse_mask": block} if mask == "block" else {})
        return (q, k, v, bias, kw), dm.flash_dmattn_func(q, k, v, attn_bias=bias,
                                                          return_lse=lse, **kw)

    (q, _, _, bias, _), res = call(0)
    first = cap.take()
    assert [(f,) for _, f, *_ in first] == [*route, ("fwd_sm90",), ("fwd_row_bias",)]
    assert all(p == "slow" for p, *_ in first)
    first = first[len(route):]
    fwd = tf._record(first[0][3][0], "FwdParams")
    shift = tf._record(first[1][3][0], "FwdParams")
    assert int(fwd["bias"][0]) == 0 and int(shift["bias"][0]) == bias.data_ptr()
    assert (int(fwd["sp_full_idx"][0]) != 0) == (mask is not None)    # on block lists
    assert int(fwd["lse"][0]) != 0 and int(shift["lse"][0]) == int(fwd["lse"][0])
    out = res[0] if lse else res
    assert isinstance(out, torch.Tensor) and int(shift["o"][0]) == out.data_ptr()
    if lse:
        assert int(shift["lse"][0]) == res[1].data_ptr()
    assert first[1][2] == (-(-B * H * S // 128), 1, 1)
    (q2, k2, v2, bias2, kw2), res2 = call(10)
    thin = cap.take()
    assert [(f,) for _, f, *_ in thin] == [*route, ("fwd_sm90",), ("fwd_row_bias",)]
    assert all(p == "thin" for p, *_ in thin)
    rec = tf._record(thin[-1][3][0], "FwdParams")
    out2 = res2[0] if lse else res2
    assert int(rec["bias"][0]) == bias2.data_ptr() and int(rec["o"][0]) == out2.data_ptr()
    assert int(rec["lse"][0]) == int(tf._record(thin[-2][3][0], "FwdParams")["lse"][0]) != 0
    fastpath.clear()
    dm.flash_dmattn_func(q2, k2, v2, attn_bias=bias2, return_lse=lse, **kw2)
    slow = cap.take()
    assert tf._masked(thin, cap) == tf._masked(slow, cap)


@pytest.mark.parametrize("grad", ["no_bias_grad", "bias_grad_lse"])
@pytest.mark.parametrize("switch", ["1", "0"])
def test_backward_runs_without_the_row_bias_on_lse_minus_it(cap, monkeypatch, switch, grad):
    """A training step with a bias of one value per query row: under DMATTN_FWD_ROW_BIAS=1 the
    Hopper backward runs without it (no bias map), after the pre kernel has written the
    forward's lse minus the row's value into the workspace (BwdParams.lse_shifted: the saved
    lse; f.lse: the workspace's copy, past dsum); the thin path repeats the validated plan.
    With the switch off the portable backward takes the bias, lse as it is."""
    monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", switch)
    B, S, Sk, H, Hk, D = 2, 40, 48, 4, 2, 64
    q0 = tf._rand(B, S, H, D, seed=1)
    k0, v0 = tf._rand(B, Sk, Hk, D, seed=2), tf._rand(B, Sk, Hk, D, seed=3)
    bias0, dout = tf._rand(B, H, S, 1, seed=4), tf._rand(B, S, H, D, seed=5)
    with_bias_grad = grad == "bias_grad_lse"

    def step():
        q, k, v, bias = (x.clone().requires_grad_(x is not bias0 or with_bias_grad)
                         for x in (q0, k0, v0, bias0))
        leaves = (q, k, v, bias) if with_bias_grad else (q, k, v)
        if with_bias_grad:
            out, lse = dm.flash_dmattn_func(q, k, v, attn_bias=bias, return_lse=True)
            grads = torch.autograd.grad((out, lse), leaves, (dout, torch.ones_like(lse)))
        else:
            out = dm.flash_dmattn_func(q, k, v, attn_bias=bias)
            grads = torch.autograd.grad(out, leaves, dout)
        return q, bias, grads

    q, bias, grads = step()
    bwd = [x for x in cap.take() if x[1].startswith("bwd")]
    main = "bwd_sm90" if switch == "1" else "bwd_dkdv"
    assert [x[1] for x in bwd] == ["bwd_pre", main, "bwd_post"], bwd
    pre = tf._record(bwd[0][3][0], "BwdParams")
    assert all(x[3][0] == bwd[0][3][0] for x in bwd)            # one record for all three
    assert int(pre["bias"][0]) == bias.data_ptr()               # the pre kernel reads it
    if switch == "1":
        dsum_at = -(-q.numel() // 64) * 64
        lse_at = -(-(dsum_at + B * H * S) // 64) * 64
        assert int(pre["lse"][0]) - int(pre["dq_accum"][0]) == 4 * lse_at
        assert int(pre["lse_shifted"][0]) not in (0, int(pre["lse"][0]))
        args = np.frombuffer(bwd[1][3][1], dtype=backward_sm90.ARGS_DTYPE)
        assert int(args["bias_mode"][0]) == 0                     # no bias map, no bias spec
        at = 128 * backward_sm90.MAP_NAMES.index("bias")
        assert not args["maps"][0][at:at + 128].any()
    else:
        assert int(pre["lse_shifted"][0]) == 0 and int(pre["lse"][0]) != 0
    if with_bias_grad:   # from dlse after the launches (backward.row_shift_grad: GPU-tested)
        assert grads[3].shape == bias0.shape
    else:
        step()
        again = [x for x in cap.take() if x[1].startswith("bwd")]
        assert [x[1] for x in again] == [x[1] for x in bwd] and all(
            p == "thin" for p, *_ in again)
        rec = tf._record(again[0][3][0], "BwdParams")
        if switch == "1":   # the saved lse moves with the call; the workspace's follows dsum
            assert int(rec["lse"][0]) - int(rec["dsum"][0]) == \
                int(pre["lse"][0]) - int(pre["dsum"][0])


def kernel_backward_model(q, k, v, mask, bias, dout, scale, softcap, window, lse, dlse,
                          unshift):
    """The backward kernels' math in float64: P = exp(x + b - lse) where a position is kept
    and lse is not -inf (the kernels read -inf as +inf), else 0; with ``unshift`` the Hopper
    path for a bias of one value per query row: no bias, on lse_b = lse - b from the pre
    kernel (rows at -inf stay -inf)."""
    b_, sq, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    row_b = np.broadcast_to(reference._heads_to(bias, 1, h)[..., 0], lse.shape)
    with np.errstate(invalid="ignore"):
        lse_k = np.where(lse == -np.inf, -np.inf, lse - row_b) if unshift else lse
    kk, vv = reference._heads_to(k, 2, h), reference._heads_to(v, 2, h)
    s0 = np.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    t = np.tanh(s0 / softcap) if softcap > 0 else None
    x = (softcap * t if t is not None else s0) + (0.0 if unshift else row_b[..., None])
    keep = reference.keep_positions(b_, h, sq, sk, window, mask, None)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.where(keep & (lse_k[..., None] != -np.inf), np.exp(x - lse_k[..., None]), 0.0)
    out = np.einsum("bhqk,bkhd->bqhd", p, vv)
    dsum = np.einsum("bqhd,bqhd->bhq", dout, out) - dlse
    dx = p * (np.einsum("bqhd,bkhd->bhqk", dout, vv) - dsum[..., None])
    ds = dx * (1.0 - t * t) if t is not None else dx
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kk) * scale
    dk = (np.einsum("bhqk,bqhd->bkhd", ds, q) * scale).reshape(b_, sk, hk, h // hk, -1).sum(3)
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout).reshape(b_, sk, hk, h // hk, -1).sum(3)
    return dq, dk, dv


@pytest.mark.parametrize("softcap,window", [(0.0, (-1, -1)), (20.0, (-1, -1)), (0.0, (3, 0))])
@pytest.mark.parametrize("bias_heads", [3, 1])
def test_unshift_gives_the_gradients_of_the_bias(softcap, window, bias_heads):
    """The unshift (backward.py; the pre kernel in cuda_src/sm80/bwd.cu) against the kernels'
    math with the bias (the portable backward), in float64: the same gradients and the same
    NaN positions for finite values, rows dropped by -inf or by a value below LOWEST_LOGIT, a
    row the mask drops (whatever its bias) and a NaN or +inf value; and, where no value is
    NaN, the reference backward's gradients; where one is, its NaN positions (an excluded
    key's P is 0 beside a NaN row in both). A NumPy model of the kernels' math, checked
    against the reference: the host's record is checked by
    test_backward_runs_without_the_row_bias_on_lse_minus_it, the kernels by
    tests/gpu/test_row_bias.py."""
    rng = np.random.default_rng(11)
    B, H, Hk, Sq, Sk, D = 2, 3, 3, 6, 9, 4
    q = rng.standard_normal((B, Sq, H, D))
    k, v = rng.standard_normal((B, Sk, Hk, D)), rng.standard_normal((B, Sk, Hk, D))
    dout = rng.standard_normal((B, Sq, H, D))
    dlse = rng.standard_normal((B, H, Sq))
    mask = rng.random((B, H, Sq, Sk)) < 0.8
    mask[0, 1, 2] = False                                         # a row with no allowed key
    bias = rng.uniform(-30, 30, (B, bias_heads, Sq, 1))
    bias[1, 0, 1, 0], bias[1, 0, 3, 0] = -np.inf, -3e38            # dropped rows
    if bias_heads > 1:
        bias[0, 1, 2, 0] = np.nan                                 # on the mask's dropped row
    for bad in (None, np.nan, np.inf):
        bb = bias.copy()
        if bad is not None:
            bb[1, 0, 4, 0] = bad
        _, lse = reference.dense_forward(q, k, v, mask, bb, 0.5, softcap, window)
        args = (q, k, v, mask, bb, dout, 0.5, softcap, window, lse, dlse)
        got = kernel_backward_model(*args, unshift=True)
        want = kernel_backward_model(*args, unshift=False)
        ref = reference_bwd.dense_backward(q, k, v, mask, bb, dout, 0.5, softcap, window,
                                           dlse=dlse)[:3]
        for g, w, r in zip(got, want, ref, strict=True):
            np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
            ok = ~np.isnan(w)
            np.testing.assert_allclose(g[ok], w[ok], rtol=1e-9, atol=1e-9)
            np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
            assert np.isnan(g).any() == (bad is not None)
            if bad is None:
                np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-9)


def test_training_step_beside_a_block_mask(cap, monkeypatch):
    """Beside a block mask (its lists): the forward runs without the bias then shifts lse, the
    Hopper backward runs without it on lse minus it, and a second step repeats both on the
    thin path."""
    monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", "1")
    B, S, Sk, H, Hk, D = 2, 40, 48, 4, 2, 64
    q0 = tf._rand(B, S, H, D, seed=1)
    k0, v0 = tf._rand(B, Sk, Hk, D, seed=2), tf._rand(B, Sk, Hk, D, seed=3)
    bias, dout = tf._rand(B, H, S, 1, seed=4), tf._rand(B, S, H, D, seed=5)
    block = dm.BlockBitsetMask(np.array([[True]]), S, Sk, block_size=(128, 128))

    def step():
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = dm.flash_dmattn_func(q, k, v, attn_bias=bias, sparse_mask=block)
        torch.autograd.grad(out, (q, k, v), dout)
        return cap.take()

    for path in ("slow", "thin"):
        launched = step()
        fams = [x[1] for x in launched]
        fwd = [f for f in fams if f.startswith("fwd")]
        assert fwd[-2:] == ["fwd_sm90", "fwd_row_bias"], fams
        assert "bwd_sm90" in fams and "bwd_dkdv" not in fams, fams
        rec = tf._record(launched[fams.index("fwd_sm90")][3][0], "FwdParams")
        assert int(rec["bias"][0]) == 0 and int(rec["sp_full_idx"][0]) != 0
        pre = tf._record(launched[fams.index("bwd_pre")][3][0], "BwdParams")
        assert int(pre["lse_shifted"][0]) not in (0, int(pre["lse"][0]))
        args = np.frombuffer(launched[fams.index("bwd_sm90")][3][1],
                             dtype=backward_sm90.ARGS_DTYPE)
        assert int(args["bias_mode"][0]) == 0
        assert all(x[0] == path for x in launched), [(x[0], x[1]) for x in launched]
