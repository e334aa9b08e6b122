"""The CUDA backward against float64 autograd of the dense formulation, with FlashAttention's
rule for gradients: max|g - g_ref| <= 3 * max|g_lowprec - g_ref| + eps, where g_lowprec is the
same formulation run by torch autograd in the input precision. Bias broadcast shapes, causal,
window, softcap, GQA, head dims, varlen with key-/query-based bias, sparse masks, fully masked
rows, deterministic mode, CuPy's functional API and torch.compile."""

from __future__ import annotations

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy.reference import allowed_positions

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


def _attention(q, k, v, mask, bias, scale, softcap, window, keep_extra=None, with_lse=False):
    """Dense formulation; computes in q's dtype like FlashAttention's reference (softmax in fp32,
    probabilities rounded to q's dtype). Rows with nothing allowed give 0. ``with_lse``:
    returns (out, lse) with lse as (b, q, h) rows (0 where nothing is allowed)."""
    h = q.shape[2]
    kk = k.repeat_interleave(h // k.shape[2], dim=2)
    vv = v.repeat_interleave(h // v.shape[2], dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + (bias if bias.shape[1] in (1, h) else bias.repeat_interleave(h // bias.shape[1], 1))
    keep = torch.from_numpy(allowed_positions(q.shape[1], k.shape[1], window)).to(q.device)
    if mask is not None:  # a mask per kv head serves its group's query heads
        keep = keep & (mask if mask.shape[1] in (1, h) else
                       mask.repeat_interleave(h // mask.shape[1], 1))
    if keep_extra is not None:
        keep = keep & keep_extra
    s = s.float().masked_fill(~keep, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    ell = p.sum(-1, keepdim=True)
    p = (p / torch.where(ell > 0, ell, torch.ones_like(ell))).to(q.dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    if not with_lse:
        return out
    lse = m + torch.log(torch.where(ell > 0, ell, torch.ones_like(ell)))
    return out, lse[..., 0].transpose(1, 2)


def _ref_grads(inputs, dout, fn):
    """Gradients of fn(*inputs) . dout w.r.t. every input that is not None (``fn`` may return
    a tuple, e.g. (out, lse), and ``dout`` then the tuple of their cotangents)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    outs, douts = (out, dout) if isinstance(out, tuple) else ((out,), (dout,))
    torch.autograd.backward(outs, [d.to(o.dtype) for o, d in zip(outs, douts, strict=True)])
    return [None if x is None else x.grad for x in leaves]


def _double(dout):
    return tuple(d.double() for d in dout) if isinstance(dout, tuple) else dout.double()


def _output_rounding_terms(inputs, dout, lse_fn, stored_out):
    """FlashAttention's backward takes D_i = dO_i . O_i from the output as stored
    (``stored_out``: the library's own forward, which its backward read) and sums it in
    float32 apart from dP_ij = dO_i . V_j; the autograd references use the exact output and
    cancel sum_j P_ij dP_ij - D_i exactly. An error dD_i of D moves dS_ij by -P_ij dD_i =
    -dD_i d(lse_i)/dS_ij, so each gradient by that of -sum_i dD_i lse_i, computed here in
    float64 (``lse_fn``: the formulation returning (out, lse rows)). Largest where a row's
    weight sits on few keys (P ~ 1). Two such terms, each signed, per input (None where
    absent, 0.0 where the input does not reach lse):
    - the stored output's error (dD = dO . (stored - exact)): the exact output rounded to the
      input dtype understates it (P is rounded before PV; a random call at d256 with two keys
      measured 2.3x);
    - the float32 rounding of D's own sum (dD = fl32(dO . stored) - dO . stored, summed
      sequentially over the head dim as a thread does), a sample of the rounding noise that
      D and dP leave in their difference: with one key per row the references' gradients
      are exactly 0 and this noise is the kernel's whole error (a random call at d256, one
      key, 260 rows: dK err 1.33e-4, 3.6x this sample)."""
    leaves = [None if x is None else x.detach().double().requires_grad_(True) for x in inputs]
    out, lse = lse_fn(*leaves)
    out = out.detach()
    dout = dout[0] if isinstance(dout, tuple) else dout   # (D takes out's cotangent only)
    stored = stored_out.detach()
    dd = (dout.double() * (stored.double() - out)).sum(-1)
    d32 = torch.zeros(dd.shape, dtype=torch.float32, device=dd.device)
    for j in range(stored.shape[-1]):   # sequential, in float32
        d32 = d32 + dout[..., j].float() * stored[..., j].float()
    noise = d32.double() - (dout.double() * stored.double()).sum(-1)
    present = [x for x in leaves if x is not None]
    terms = []
    for weights in (dd, noise):
        grads = iter(torch.autograd.grad((weights * lse).sum(), present, allow_unused=True,
                                         retain_graph=True))
        per_input = []
        for x in leaves:
            g = None if x is None else next(grads)   # None also where x does not reach lse
            per_input.append(None if x is None else 0.0 if g is None else g)
        terms.append(per_input)
    return terms


def _shifted_rounding_bound(term, ref, dtype):
    """max |term| plus, where the term moves an element, half a last place of ``dtype`` at that
    element: the stored output shifts the gradient before its own rounding to ``dtype``, so
    that rounding can add half a place, which the low-precision reference (whose D is exact
    and whose rounding may happen to land on ref's nearest value) does not account for (a
    random call's fp16 dbias: D term 3.24e-3, err 4.08e-3, one place of 3.9e-3 off)."""
    if not torch.is_tensor(term):
        return 0.0
    half_place = _last_place(ref.abs() + term.abs(), dtype) / 2
    return (term.abs() + torch.where(term != 0, half_place, 0.0)).max().item()


def _last_place(x, dtype):
    """The spacing of ``dtype``'s values at |x| (below the smallest normal: the subnormals')."""
    finfo = torch.finfo(dtype)
    return finfo.eps * torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(finfo.tiny))))


def _max_abs(term):
    return term.abs().max().item() if torch.is_tensor(term) else 0.0


def _check_grads(got, inputs, dout, fn, names=("q", "k", "v", "bias"), eps=1e-4, lse_fn=None,
                 stored_out=None):
    """FlashAttention's rule per gradient; with ``lse_fn`` (``fn`` also returning lse rows) and
    ``stored_out`` (the library's output, which its backward read) the tolerance adds the
    terms of FlashAttention's D (``_output_rounding_terms``): the stored output's, with half a
    last place where it moves an element (``_shifted_rounding_bound``), and 3x the float32
    sum's sample, the rule's factor for a reference of the same error. ``dout``:
    out's cotangent, or (out's, lse's) when ``fn`` returns (out, lse)."""
    ref = _ref_grads([None if x is None else x.double() for x in inputs], _double(dout), fn)
    low = _ref_grads(inputs, dout, fn)
    rounding, noise = ([[0.0] * len(inputs)] * 2 if lse_fn is None
                       else _output_rounding_terms(inputs, dout, lse_fn, stored_out))
    for name, g, r, lo, dd, dn in zip(names, got, ref, low, rounding, noise, strict=True):
        if r is None:
            continue
        assert g is not None, f"{name}: no gradient"
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: NaN/inf in gradient"
        err = (g.double() - r).abs().max().item()
        tol = (3 * (lo.double() - r).abs().max().item() + eps
               + _shifted_rounding_bound(dd, r, g.dtype) + 3 * _max_abs(dn))
        assert err <= tol, f"d{name}: max err {err:.3e} > {tol:.3e}"


def _qkv(b, sq, sk, h, hk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    return (torch.randn(b, sq, h, d, generator=g).to("cuda", dt),
            torch.randn(b, sk, hk, d, generator=g).to("cuda", dt),
            torch.randn(b, sk, hk, d, generator=g).to("cuda", dt))


def _run_dense(q, k, v, mask=None, bias=None, seed=0, deterministic=False, **kw):
    """dm's gradients through autograd and the reference check; returns the gradients."""
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(q)
    leaves = [x.detach().clone().requires_grad_(True) if x is not None else None
              for x in (q, k, v, bias)]
    out = dm.flash_dmattn_func(leaves[0], leaves[1], leaves[2], attn_mask=mask,
                               attn_bias=leaves[3], deterministic=deterministic, **kw)
    out.backward(dout)
    torch.cuda.synchronize()
    got = [x.grad if x is not None else None for x in leaves]
    scale = kw.get("softmax_scale") or q.shape[-1] ** -0.5
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0 if window[1] < 0 else min(window[1], 0)
    extra = kw.get("sparse_mask")
    extra = None if extra is None else torch.from_numpy(
        np.array(extra.to_dense(), dtype=bool)).cuda()

    def fn(q_, k_, v_, b_):
        return _attention(q_, k_, v_, mask, b_, scale, kw.get("softcap", 0.0), tuple(window),
                          extra)

    _check_grads(got, [q, k, v, bias], dout, fn)
    return got


B, H, HK, SQ, SK = 2, 4, 2, 70, 91
BIAS = {"full": (B, H, SQ, SK), "bh1k": (B, H, 1, SK), "hk": (B, HK, SQ, SK),
        "kside_111": (1, 1, 1, SK), "b1": (1, H, SQ, SK), "h1": (B, 1, SQ, SK),
        "k1": (B, H, SQ, 1), "hk1k": (B, HK, 1, SK)}


@pytest.mark.parametrize("shape", list(BIAS), ids=list(BIAS))
def test_bias_broadcast_shapes(shape):
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "bfloat16", seed=len(shape))
    bias = torch.randn(*BIAS[shape], generator=torch.Generator().manual_seed(3)).to(
        "cuda", torch.bfloat16)
    _run_dense(q, k, v, bias=bias, seed=4)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("shape", [(B, H, SQ, 1), (1, HK, SQ, 1), (B, 1, 1, 1), (1, 1, 1, 1)],
                         ids=["per_row", "kv_heads_rows", "per_batch", "scalar"])
def test_a_bias_constant_over_keys_has_its_exact_gradient(shape, deterministic):
    """A bias with key dim 1 shifts whole softmax rows: out does not depend on it, lse moves one
    for one. Through autograd its gradient is exactly 0 when the loss does not use lse, and the
    sum of dlse over the rows it serves that have an allowed key when it does (backward's
    row_shift; a fully masked row has lse -inf and contributes nothing)."""
    q, k, v = _qkv(B, SQ, SK, H, HK, 64, "bfloat16", seed=51)
    g = torch.Generator().manual_seed(52)
    mask = (torch.rand(B, H, SQ, SK, generator=g) < 0.8).cuda()
    mask[0, 1, 5] = False                                    # a row with no allowed key
    bias = torch.randn(*shape, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True,
                                    deterministic=deterministic)
    out.float().square().sum().backward()
    assert bias.grad.shape == bias.shape and not bias.grad.any()
    bias.grad = None
    dlse = torch.randn(lse.shape, generator=g).cuda()
    out, lse = dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias, return_lse=True,
                                    deterministic=deterministic)
    assert torch.isinf(lse[0, 1, 5]) and torch.isfinite(lse[0, 1, :5]).all()
    (out.float().sum() + (lse * dlse).sum()).backward()
    want = torch.where(torch.isfinite(lse), dlse, 0.0).reshape(B, shape[1], -1, SQ)
    axes = (2,) + ((0,) if shape[0] == 1 else ()) + ((3,) if shape[2] == 1 else ())
    want = want.sum(axes, keepdim=True).reshape(shape)
    torch.testing.assert_close(bias.grad.float(), want, rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("shape", [(1, 8, 300, 256), (2, 1, 300, 256), (1, 1, 300, 257),
                                   (1, 8, 1, 256), (1, 1, 1, 257), (2, 2, 300, 256),
                                   (1, 2, 1, 257)],
                         ids=["b1", "h1", "b1h1_odd", "b1_row", "b1h1_row_odd", "hk",
                              "b1_hk_row_odd"])
def test_bias_broadcast_over_batch_and_heads_with_grad(shape, deterministic,
                                                       both_backward_families):
    """A learnable bias shared by the batch and/or groups of heads (one head for all or one per
    kv head; tile or key row; Sk odd too): the Hopper backward writes a widened dbias and sums
    it over the shared axes; GQA (8 query heads on 2 kv heads)."""
    q, k, v = _qkv(2, 300, shape[-1], 8, 2, 128, "bfloat16", seed=30)
    bias = torch.randn(*shape, generator=torch.Generator().manual_seed(31)).to(
        "cuda", torch.bfloat16)
    g1 = _run_dense(q, k, v, bias=bias, seed=32, deterministic=deterministic, is_causal=True)
    assert g1[3].shape == bias.shape
    if deterministic:
        g2 = _run_dense(q, k, v, bias=bias, seed=32, deterministic=True, is_causal=True)
        for a, b in zip(g1, g2, strict=True):
            assert torch.equal(a, b)


def test_long_bias_row_broadcast_over_query_tiles():
    q, k, v = _qkv(1, 300, 200, 4, 2, 64, "float16", seed=5)
    bias = torch.randn(1, 2, 1, 200, device="cuda", dtype=torch.float16)
    _run_dense(q, k, v, bias=bias, seed=6, is_causal=True)


def test_float32_bias_and_mask():
    q, k, v = _qkv(2, 65, 130, 4, 4, 64, "bfloat16", seed=7)
    bias = torch.randn(2, 4, 65, 130, device="cuda", dtype=torch.float32)
    mask = torch.rand(2, 1, 65, 130, device="cuda") > 0.3
    _run_dense(q, k, v, mask=mask, bias=bias, seed=8)


def _sm90_declines(family, declined, why):
    """Skips the bwd_sm90 run of a problem the Hopper backward's phase 1 does not take (it
    would repeat the portable run: both_backward_families asserts which family ran)."""
    if family == "bwd_sm90" and declined:
        pytest.skip(f"bwd_sm90 declines {why}")


HEAD_DIMS = [32, 40, 64, 96, 128, 192, 256]


@pytest.mark.parametrize("d", HEAD_DIMS, ids=[f"d{d}" for d in HEAD_DIMS])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head_dims(d, dtype, both_backward_families):
    """Sk = 104: 16-byte bias rows, which the sm_90a backward's TMA can read."""
    _sm90_declines(both_backward_families, d > 128, "head dims above 128")
    q, k, v = _qkv(2, 77, 104, 2, 1, d, dtype, seed=d)
    bias = torch.randn(2, 2, 77, 104, device="cuda").to(getattr(torch, dtype))
    _run_dense(q, k, v, bias=bias, seed=d + 1, is_causal=True)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(window_size=(20, 5)),
                                dict(softcap=5.0), dict(softcap=10.0, is_causal=True),
                                dict(window_size=(-1, 3), softmax_scale=0.2)],
                         ids=["causal", "window", "softcap", "softcap_causal", "right_window"])
@pytest.mark.parametrize("sq,sk", [(136, 136), (60, 200), (200, 56)], ids=str)
def test_causal_window_softcap(kw, sq, sk, both_backward_families):
    """Sk a multiple of 8 (16-byte bias rows) but not of the tiles."""
    q, k, v = _qkv(2, sq, sk, 4, 2, 64, "bfloat16", seed=sq + sk)
    bias = torch.randn(2, 4, sq, sk, device="cuda", dtype=torch.bfloat16)
    _run_dense(q, k, v, bias=bias, seed=9, **kw)


@pytest.mark.parametrize("bias_heads", ["q", "kv"], ids=["bias_qheads", "bias_kvheads"])
@pytest.mark.parametrize("h,hk", [(8, 8), (8, 2), (8, 1)], ids=str)
def test_gqa(h, hk, bias_heads, both_backward_families):
    """A bias per query head, or one per kv head (broadcast over the group: its dbias sums the
    group's heads; the sm_90a backward writes it per head and sums each group afterwards)."""
    if bias_heads == "kv" and hk == h:
        pytest.skip("the same problem as bias_qheads")
    q, k, v = _qkv(2, 96, 80, h, hk, 128, "float16", seed=h + hk)
    bias = torch.randn(2, h if bias_heads == "q" else hk, 96, 80, device="cuda",
                       dtype=torch.float16)
    _run_dense(q, k, v, bias=bias, seed=10, is_causal=True)


def test_fully_masked_rows_zero_grads():
    q, k, v = _qkv(2, 40, 50, 2, 2, 64, "bfloat16", seed=11)
    mask = torch.rand(2, 2, 40, 50, device="cuda") > 0.5
    mask[:, :, ::3] = False
    bias = torch.randn(2, 2, 40, 50, device="cuda", dtype=torch.bfloat16)
    dq, dk, dv, db = _run_dense(q, k, v, mask=mask, bias=bias, seed=12)
    assert (dq[:, ::3] == 0).all() and (db[:, :, ::3] == 0).all()
    # causal with Sq > Sk: the first rows see nothing; keys nobody sees get zero dK/dV
    q, k, v = _qkv(1, 90, 30, 2, 2, 64, "bfloat16", seed=13)
    dq, dk, dv, _ = _run_dense(q, k, v, seed=14, is_causal=True)
    assert (dq[:, :60] == 0).all()
    q, k, v = _qkv(1, 30, 90, 2, 2, 64, "bfloat16", seed=15)
    dq, dk, dv, _ = _run_dense(q, k, v, seed=16, window_size=(10, 0))
    assert (dk[:, :50] == 0).all() and (dv[:, :50] == 0).all()


def test_sparse_masks():
    q, k, v = _qkv(2, 200, 260, 4, 2, 64, "bfloat16", seed=17)
    bias = torch.randn(2, 4, 200, 260, device="cuda", dtype=torch.bfloat16)
    _run_dense(q, k, v, bias=bias, seed=18, sparse_mask=dm.CausalMask(200, 260))
    dense = np.random.default_rng(0).random((200, 260)) > 0.7
    dense[:, 64:128] = False
    _run_dense(q, k, v, bias=bias, seed=19,
               sparse_mask=dm.MixedMask.from_dense_mask(dense, block_size=(64, 64)))


@pytest.mark.parametrize("d", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"window_size": (40, 7)},
                                {"deterministic": True}], ids=["plain", "causal", "window", "det"])
def test_no_mask_no_bias_128_row_steps(d, kw, both_backward_families):
    """Without mask or bias the dK/dV kernel takes 128 query rows per step where shared memory
    allows: ragged lengths, several query tiles, GQA (and the sm_90a backward, its
    deterministic mode included)."""
    q, k, v = _qkv(2, 300, 257, 4, 2, d, "bfloat16", seed=50 + d)
    _run_dense(q, k, v, seed=51, **kw)


def _block_masks(sq, sk, block, seed):
    """One mask of every block class over the same random pattern (+ an intersection)."""
    rng = np.random.default_rng(seed)
    nrb, ncb = -(-sq // block[0]), -(-sk // block[1])
    pattern = rng.random((nrb, ncb)) < 0.45
    pattern[:, 1] = False  # a key block nobody lists
    pattern[0, 0] = True
    elems = rng.random((sq, sk)) > 0.3
    dense = np.kron(pattern, np.ones(block, dtype=bool))[:sq, :sk] & elems
    return {
        "bitset": dm.BlockBitsetMask.from_dense_mask(dense, block_size=block),
        "bcsr": dm.BCSRMask.from_dense_mask(dense, block_size=block),
        "mixed": dm.MixedMask.from_dense_mask(dense, block_size=block),
        "dynamic": dm.DynamicMask(pattern, sq, sk, block_size=block),
        "mixed_and_causal": dm.MixedMask.from_dense_mask(dense, block_size=block)
        & dm.CausalMask(sq, sk),
    }


@pytest.fixture
def no_dense_sparse_mask(monkeypatch):
    """Fails a test whose block mask would be materialized as a dense (Sq, Sk) mask."""
    from dmattn_cupy import sparse_plan

    def refuse(*args, **kwargs):
        raise AssertionError("block mask materialized densely")

    monkeypatch.setattr(sparse_plan, "dense_block_mask", refuse)


@pytest.mark.parametrize("kind", ["bitset", "bcsr", "mixed", "dynamic", "mixed_and_causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_block_masks_by_lists(kind, deterministic, no_dense_sparse_mask):
    """Block masks reach the forward and the backward as block lists (never a dense mask),
    with attn_mask, a (B,H,1,Sk) bias, GQA and ragged edges."""
    q, k, v = _qkv(2, 200, 330, 4, 2, 64, "bfloat16", seed=40)
    mask = _block_masks(200, 330, (64, 128), seed=41)[kind]
    attn_mask = torch.rand(2, 1, 200, 330, device="cuda") > 0.2
    bias = torch.randn(2, 4, 1, 330, device="cuda", dtype=torch.bfloat16)
    _run_dense(q, k, v, mask=attn_mask, bias=bias, seed=42, sparse_mask=mask,
               deterministic=deterministic)


def test_block_mask_lists_d256_and_multihead():
    """Head dim 256 (64x32 backward tiles) and a mask with its own (B, H) pattern."""
    q, k, v = _qkv(2, 130, 160, 2, 2, 256, "float16", seed=43)
    rng = np.random.default_rng(44)
    dense = rng.random((2, 2, 130, 160)) > 0.5
    dense[..., 64:128, :] = False
    mask = dm.MixedMask.from_dense_mask(dense, block_size=(64, 32))
    bias = torch.randn(2, 2, 130, 160, device="cuda", dtype=torch.float16)
    _run_dense(q, k, v, bias=bias, seed=45, sparse_mask=mask)


def _check_unlisted_blocks_never_reach_the_math(d, seed):
    """NaN keys/values in a key block no row lists change nothing (bitwise, deterministic):
    no product of the forward or backward touches that block."""
    q, k, v = _qkv(1, 256, 384, 2, 2, d, "bfloat16", seed=seed)
    pattern = np.ones((2, 3), dtype=bool)
    pattern[:, 1] = False
    mask = dm.BlockBitsetMask(pattern, 256, 384, block_size=(128, 128))
    grads = []
    for poison in (0.0, float("nan")):
        kk, vv = k.clone(), v.clone()
        kk[:, 128:256] = poison
        vv[:, 128:256] = poison
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, kk, vv)]
        out = dm.flash_dmattn_func(*leaves, sparse_mask=mask, deterministic=True)
        out.backward(torch.ones_like(out))
        grads.append([out.detach()] + [x.grad for x in leaves])
    for a, b in zip(*grads, strict=True):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


def test_unlisted_blocks_never_reach_the_math():
    _check_unlisted_blocks_never_reach_the_math(64, seed=46)


def test_dynamic_mask_update_after_forward_keeps_the_forward_pattern(no_dense_sparse_mask):
    """The gradient is that of the pattern the forward used, even if the DynamicMask is
    updated before backward()."""
    cupy = pytest.importorskip("cupy")
    q, k, v = _qkv(1, 128, 256, 2, 2, 64, "bfloat16", seed=47)
    first = np.array([[True, False, True, True], [False, True, True, False]])
    # CuPy buffers: the kernels would read them in place, so the forward must snapshot them
    mask = dm.DynamicMask(cupy.asarray(first), 128, 256, block_size=(64, 64))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(48)).to(q)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = dm.flash_dmattn_func(*leaves, sparse_mask=mask)
    mask.update(cupy.asarray(~first))
    out.backward(dout)
    got = [x.grad for x in leaves] + [None]
    keep = torch.from_numpy(np.kron(first, np.ones((64, 64), dtype=bool))).cuda()

    def fn(q_, k_, v_, b_):
        return _attention(q_, k_, v_, None, None, 1 / 8, 0.0, (-1, -1), keep)

    _check_grads(got, [q, k, v, None], dout, fn)


def test_deterministic_bitwise_and_correct():
    q, k, v = _qkv(2, 300, 257, 8, 2, 128, "bfloat16", seed=20)
    bias = torch.randn(2, 2, 300, 257, device="cuda", dtype=torch.bfloat16)
    g1 = _run_dense(q, k, v, bias=bias, seed=21, deterministic=True, is_causal=True)
    g2 = _run_dense(q, k, v, bias=bias, seed=21, deterministic=True, is_causal=True)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)
    bias_k = torch.randn(2, 8, 1, 257, device="cuda", dtype=torch.bfloat16)
    g1 = _run_dense(q, k, v, bias=bias_k, seed=22, deterministic=True)
    g2 = _run_dense(q, k, v, bias=bias_k, seed=22, deterministic=True)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(1, 8, 300, 257), (2, 1, 300, 257), (2, 8, 300, 1),
                                   (1, 1, 1, 257)], ids=["batch1", "head1", "key1", "kside111"])
def test_deterministic_bias_broadcast_across_blocks(shape):
    """Biases whose gradient several CTAs would add into (batch, a single head with several kv
    heads, keys) are widened and reduced in a fixed order: correct and bitwise repeatable."""
    q, k, v = _qkv(2, 300, 257, 8, 2, 128, "bfloat16", seed=26)
    bias = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    g1 = _run_dense(q, k, v, bias=bias, seed=27, deterministic=True)
    g2 = _run_dense(q, k, v, bias=bias, seed=27, deterministic=True)
    assert g1[3].shape == bias.shape
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def _packed(lens_q, lens_k, h, hk, d, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lens_q)]), dtype=torch.int32)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lens_k)]), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), h, d, generator=g).to("cuda", dtype)
    k = torch.randn(int(cu_k[-1]), hk, d, generator=g).to("cuda", dtype)
    v = torch.randn(int(cu_k[-1]), hk, d, generator=g).to("cuda", dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("layout", ["key", "key1", "query"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "det"])
def test_varlen(layout, deterministic):
    lens_q, lens_k = [5, 130, 0, 64], [70, 129, 33, 64]
    h, hk, d = 4, 2, 64
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, h, hk, d, seed=23)
    mq, mk = max(lens_q), max(lens_k)
    bshape = {"key": (k.shape[0], hk), "key1": (k.shape[0], 1), "query": (q.shape[0], h, mk)}[
        layout]
    bias = torch.randn(*bshape, generator=torch.Generator().manual_seed(24)).to("cuda", q.dtype)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(25)).to(q)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    out = dm.flash_dmattn_varlen_func(leaves[0], leaves[1], leaves[2], cu_q.cuda(), cu_k.cuda(),
                                      mq, mk, attn_bias=leaves[3], is_causal=True,
                                      deterministic=deterministic)
    out.backward(dout)
    torch.cuda.synchronize()
    got = [x.grad for x in leaves]
    cq, ck = cu_q.tolist(), cu_k.tolist()

    def fn(q_, k_, v_, b_):
        outs = []
        for i in range(len(lens_q)):
            qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
            if qe == qs:
                continue
            if layout.startswith("key"):
                bb = b_[ks:ke].T[None, :, None, :]
            else:
                bb = b_[qs:qe, :, : ke - ks].permute(1, 0, 2)[None]
            outs.append(_attention(q_[None, qs:qe], k_[None, ks:ke], v_[None, ks:ke], None, bb,
                                   d ** -0.5, 0.0, (-1, 0))[0])
        return torch.cat(outs)

    _check_grads(got, [q, k, v, bias], dout, fn)


def test_cupy_functional_backward():
    cupy = pytest.importorskip("cupy")
    q, k, v = _qkv(2, 33, 47, 4, 2, 64, "float16", seed=26)
    bias = torch.randn(2, 4, 1, 47, device="cuda", dtype=torch.float16)
    dout = torch.randn_like(q)
    cq, ck, cv, cb, cdo = (cupy.from_dlpack(t) for t in (q, k, v, bias, dout))
    out, lse = dm.flash_dmattn_func(cq, ck, cv, attn_bias=cb, is_causal=True, return_lse=True)
    dq, dk, dv, db = dm.flash_dmattn_backward(cdo, cq, ck, cv, out, lse, attn_bias=cb,
                                              is_causal=True)
    cupy.cuda.get_current_stream().synchronize()
    assert isinstance(dq, cupy.ndarray) and db.shape == (2, 4, 1, 47)
    got = [torch.from_dlpack(x) for x in (dq, dk, dv, db)]

    def fn(q_, k_, v_, b_):
        return _attention(q_, k_, v_, None, b_, 1 / 8, 0.0, (-1, 0))

    _check_grads(got, [q, k, v, bias], dout, fn)


@pytest.mark.parametrize("d", [72, 256])
def test_unaligned_out_rows(d):
    """The pre kernel reads O and dO by 16-byte loads only where their rows are 16-byte aligned:
    an `out` whose rows start 2 bytes off takes its element-by-element path, with the same
    gradients (sequence lengths not a multiple of the kernel's 4 rows per warp)."""
    q, k, v = _qkv(2, 37, 45, 4, 2, d, "bfloat16", seed=31 + d)
    dout = torch.randn_like(q)
    out, lse = dm.flash_dmattn_func(q, k, v, is_causal=True, return_lse=True)
    shifted = torch.empty(out.numel() + 1, device="cuda", dtype=out.dtype)[1:].view(out.shape)
    shifted.copy_(out)
    assert shifted.data_ptr() % 16 != 0
    got = list(dm.flash_dmattn_backward(dout, q, k, v, shifted, lse, is_causal=True))
    aligned = dm.flash_dmattn_backward(dout, q, k, v, out, lse, is_causal=True)
    for a, b in zip(got[:3], aligned[:3], strict=True):
        assert (a.double() - b.double()).abs().max().item() <= 1e-2 * max(
            1.0, b.double().abs().max().item())

    def fn(q_, k_, v_, b_):
        return _attention(q_, k_, v_, None, None, d ** -0.5, 0.0, (-1, 0))

    _check_grads(got[:3] + [None], [q, k, v, None], dout, fn)


def test_torch_func_grad():
    """torch.func.grad over the API on CUDA: the eager autograd Function (autograd._EagerAttention;
    the thin path does not take wrapped tensors) gives the same gradients as torch.autograd in
    deterministic mode, bit for bit, and they pass the reference check."""
    q, k, v = _qkv(2, 40, 70, 4, 2, 64, "bfloat16", seed=37)
    bias = torch.randn(2, 4, 40, 70, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn_like(q)

    def f(q_, k_, v_, b_):
        out = dm.flash_dmattn_func(q_, k_, v_, attn_bias=b_, is_causal=True,
                                   deterministic=True)
        return (out.float() * dout.float()).sum()

    got = torch.func.grad(f, argnums=(0, 1, 2, 3))(q, k, v, bias)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, bias)]
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)

    def fn(q_, k_, v_, b_):
        return _attention(q_, k_, v_, None, b_, 1 / 8, 0.0, (-1, 0))

    _check_grads(list(got), [q, k, v, bias], dout, fn)


def test_expanded_output_gradient():
    """out.sum().backward() hands the kernel a stride-0 (expanded) dout."""
    q, k, v = _qkv(1, 50, 60, 2, 2, 64, "bfloat16", seed=29)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    dm.flash_dmattn_func(*leaves, is_causal=True).sum().backward()
    got = [x.grad for x in leaves] + [None]

    def fn(q_, k_, v_, b_):
        return _attention(q_, k_, v_, None, None, 1 / 8, 0.0, (-1, 0))

    _check_grads(got, [q, k, v, None], torch.ones_like(q), fn)


def test_bias_without_grad_still_shapes_gradients():
    q, k, v = _qkv(1, 50, 60, 2, 2, 64, "bfloat16", seed=27)
    bias = torch.randn(1, 2, 50, 60, device="cuda", dtype=torch.bfloat16) * 3
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    dout = torch.randn_like(q)
    dm.flash_dmattn_func(*leaves, attn_bias=bias).backward(dout)
    got = [x.grad for x in leaves] + [None]

    def fn(q_, k_, v_, b_):
        return _attention(q_, k_, v_, None, bias, 1 / 8, 0.0, (-1, -1))

    _check_grads(got, [q, k, v, None], dout, fn)


def test_torch_compile_fullgraph_attention_block():
    torch.manual_seed(28)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(128, 3 * 128, dtype=torch.bfloat16, device="cuda")
            self.bias = torch.nn.Parameter(torch.zeros(1, 2, 1, 64, device="cuda"))

        def forward(self, x):
            q, k, v = self.qkv(x).view(2, 64, 3, 2, 64).unbind(2)
            return dm.flash_dmattn_func(q, k, v, attn_bias=self.bias, is_causal=True).sum()

    block = Block()
    x = torch.randn(2, 64, 128, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    compiled(x).backward()
    got = [(n, p.grad.clone()) for n, p in block.named_parameters()]
    block.zero_grad()
    block(x).backward()
    for (name, a), b in zip(got, [p.grad for p in block.parameters()], strict=True):
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient under torch.compile"
        err = (a.float() - b.float()).abs().max().item()
        assert err <= 0.03 * b.float().abs().max().item() + 1e-3, (name, err)
