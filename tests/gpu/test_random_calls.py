"""Random valid calls (tools/call_fuzz.good_case: dense, varlen and KV-cache calls over every
mask/bias layout, odd strides, head dims 8-256, lengths around the tile edges, causal, window,
softcap, sparse masks, paged caches) on the GPU against the float64 reference with
FlashAttention's tolerance rules: outputs and lse always; gradients (through autograd) for
every other dense and varlen call (half of those with lse in the loss too, where returned),
the rule's tolerance plus the errors FlashAttention's backward takes from its D (the output
as stored, D's float32 sum: test_backward._output_rounding_terms), with deterministic=True
also bitwise equal to a second run's; the caches after an append bit for bit; a forward
repeated gives the same bits, through the cached plan (fastpath.HITS) wherever the first call
left one (calls the thin path does not cache, e.g. copied inputs, take the validated path
again). Exploratory runs take other calls:
DMATTN_RANDOM_CALLS (default 240) calls from the seed DMATTN_RANDOM_CALLS_SEED (FIRST_SEED,
default 1000000). A failing ``test_random_call[N]`` is described by ``python
tools/call_fuzz.py --show-good $((FIRST_SEED + N))``."""

from __future__ import annotations

import os

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64

import dmattn_cupy as dm
from dmattn_cupy import fastpath, reference_kvcache
from dmattn_cupy.validate import check_options

torch = pytest.importorskip("torch")
from test_backward import _attention, _check_grads  # noqa: E402  (the grad rule's formulation)

pytestmark = pytest.mark.gpu

import call_fuzz  # noqa: E402  (tools/, on the path by tests/conftest.py)

CASES = int(os.environ.get("DMATTN_RANDOM_CALLS", "240"))
FIRST_SEED = int(os.environ.get("DMATTN_RANDOM_CALLS_SEED", "1000000"))


def _options(kw):
    """(scale, softcap, window) as the kernels see them (causal folded into the window)."""
    return check_options(kw.get("softmax_scale"), kw.get("softcap", 0.0),
                         kw.get("window_size", (-1, -1)), kw.get("is_causal", False),
                         kw["query"].shape[-1])


def _dtype(x):
    return str(x.dtype).removeprefix("torch.")


def _split(res, kw):
    return res if kw.get("return_lse") else (res, None)


def _leaves(kw, names):
    """``kw`` with each named float tensor replaced by a leaf that requires grad."""
    kw = dict(kw)
    for n in names:
        if kw.get(n) is not None:
            kw[n] = kw[n].detach().requires_grad_(True)
    return kw


def _assert_repeatable(call, kw, out, lse):
    """The same call again gives the same out and lse bit for bit; where the first call (the
    test's only call so far: ``fresh_plans`` emptied the cache) left a cached plan, the
    repeat is served by it (the thin launch path, pointers patched), else by the validated
    path again."""
    cached = any(e is not None for e in fastpath.forward_plans.values())
    hits = fastpath.HITS[0]
    out2, lse2 = _split(call(**kw), kw)
    assert fastpath.HITS[0] - hits == int(cached), (
        f"a plan cached: {cached}, cached forwards run by the repeat: {fastpath.HITS[0] - hits}")
    assert torch.equal(out2, out), "a repeated call's out differs"
    assert lse is None or torch.equal(lse2, lse), "a repeated call's lse differs"


def _cotangents(out, lse, use_lse):
    """out's cotangent, and lse's (the kernel's lse layout) when the loss uses lse."""
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    if not use_lse or lse is None:
        return dout, None
    return dout, torch.randn(lse.shape, generator=torch.Generator().manual_seed(4)).to(lse)


def _backward(out, lse, dout, dlse):
    if dlse is None:
        out.backward(dout)
    else:
        torch.autograd.backward([out, lse], [dout, dlse])


def _assert_reproducible(call, kw, names, dout, dlse):
    """With deterministic=True, a second forward + backward on the same data gives the same
    gradients bit for bit (``kw``: the first call's leaves, their ``.grad`` set)."""
    if not kw.get("deterministic"):
        return
    again = _leaves(kw, names)
    _backward(*_split(call(**again), again), dout, dlse)
    for n in names:
        if kw.get(n) is not None:
            assert torch.equal(again[n].grad, kw[n].grad), f"d{n} differs run to run"


def _check_dense(kw, grad, use_lse=False):
    q, k, v = kw["query"], kw["key"], kw["value"]
    mask, bias, sparse = kw.get("attn_mask"), kw.get("attn_bias"), kw.get("sparse_mask")
    scale, cap, window = _options(kw)
    keep = None if sparse is None else np.asarray(sparse.to_dense())
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(mask), bias=f64(bias), scale=scale,
                    softcap=cap, window=window, sparse=keep)
    if not grad:
        out, lse = _split(dm.flash_dmattn_func(**kw), kw)
        assert_fa_close(out, lse, ref_args, _dtype(q))
        _assert_repeatable(dm.flash_dmattn_func, kw, out, lse)
        return
    names = ("query", "key", "value", "attn_bias")
    kw = _leaves(kw, names)
    out, lse = _split(dm.flash_dmattn_func(**kw), kw)
    assert_fa_close(out, lse, ref_args, _dtype(q))
    dout, dlse = _cotangents(out, lse, use_lse)
    _backward(out, lse, dout, dlse)
    keep_t = None if keep is None else torch.from_numpy(keep.copy()).to(q.device)

    def dense(q_, k_, v_, b_, with_lse=False):
        return _attention(q_, k_, v_, mask, b_, scale, cap, window, keep_extra=keep_t,
                          with_lse=with_lse)

    with_lse = dlse is not None   # the reference's lse rows are (B, Sq, H)
    _check_grads([None if kw.get(n) is None else kw[n].grad for n in names], [q, k, v, bias],
                 (dout, dlse.transpose(1, 2)) if with_lse else dout,
                 lambda *x: dense(*x, with_lse=with_lse),
                 lse_fn=lambda *x: dense(*x, with_lse=True), stored_out=out)
    _assert_reproducible(dm.flash_dmattn_func, kw, names, dout, dlse)


def _sequence_slice(x, qs, qe, ks, ke):
    """A varlen mask/bias of one sequence as (1, h', len_q | 1, len_k), either layout."""
    if x is None:
        return None
    if x.dim() == 2:    # key-based (total_k, h')
        return x[ks:ke].T[None, :, None, :]
    return x[qs:qe, :, : ke - ks].permute(1, 0, 2)[None]   # query-based (total_q, h', max_k)


def _check_varlen(kw, grad, use_lse=False):
    q, k, v = kw["query"], kw["key"], kw["value"]
    mask, bias = kw.get("attn_mask"), kw.get("attn_bias")
    cu_q, cu_k = kw["cu_seqlens_q"].tolist(), kw["cu_seqlens_k"].tolist()
    scale, cap, window = _options(kw)
    ref_args = dict(q=f64(q), k=f64(k), v=f64(v), cu_q=np.array(cu_q), cu_k=np.array(cu_k),
                    mask=f64(mask), bias=f64(bias), scale=scale, softcap=cap, window=window)
    names = ("query", "key", "value", "attn_bias")
    grad = grad and q.shape[0] > 0
    if grad:
        kw = _leaves(kw, names)
    out, lse = _split(dm.flash_dmattn_varlen_func(**kw), kw)
    assert_fa_close(out, lse, ref_args, _dtype(q), varlen=True)
    if not grad:
        _assert_repeatable(dm.flash_dmattn_varlen_func, kw, out, lse)
        return
    dout, dlse = _cotangents(out, lse, use_lse)
    _backward(out, lse, dout, dlse)

    def packed(q_, k_, v_, b_, with_lse=False):
        outs, lses = [], []
        for i in range(len(cu_q) - 1):
            qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            if qe == qs:
                continue
            if ke == ks:   # no keys: out = 0, taken from q (gradient 0) so that a graph
                # exists even where no sequence has keys
                outs.append(torch.where(torch.zeros_like(q_[qs:qe], dtype=torch.bool),
                                        q_[qs:qe], 0.0))
                lses.append(outs[-1][..., 0])
                continue
            o, lse = _attention(q_[None, qs:qe], k_[None, ks:ke], v_[None, ks:ke],
                                _sequence_slice(mask, qs, qe, ks, ke),
                                _sequence_slice(b_, qs, qe, ks, ke), scale, cap, window,
                                with_lse=True)
            outs.append(o[0])
            lses.append(lse[0])
        return (torch.cat(outs), torch.cat(lses)) if with_lse else torch.cat(outs)

    with_lse = dlse is not None   # the reference's lse rows are (total_q, H)
    _check_grads([None if kw.get(n) is None else kw[n].grad for n in names], [q, k, v, bias],
                 (dout, dlse.T) if with_lse else dout, lambda *x: packed(*x, with_lse=with_lse),
                 lse_fn=lambda *x: packed(*x, with_lse=True), stored_out=out)
    _assert_reproducible(dm.flash_dmattn_varlen_func, kw, names, dout, dlse)


def _check_kv(kw):
    q, k_cache, v_cache = kw["query"], kw["k_cache"], kw["v_cache"]
    k_new, v_new, bt = kw.get("k"), kw.get("v"), kw.get("block_table")
    seqlens = kw["cache_seqlens"]
    seqlens = (np.full(q.shape[0], seqlens, np.int64) if isinstance(seqlens, int)
               else seqlens.cpu().numpy().astype(np.int64))
    bt_host = None if bt is None else bt.cpu().numpy()
    scale, cap, window = _options(kw)
    ref_args = dict(q=f64(q), k_cache=f64(k_cache), v_cache=f64(v_cache), cache_seqlens=seqlens,
                    k_new=f64(k_new), v_new=f64(v_new), block_table=bt_host,
                    mask=f64(kw.get("attn_mask")), bias=f64(kw.get("attn_bias")), scale=scale,
                    softcap=cap, window=window)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    if k_new is not None:
        reference_kvcache.append(want_k, want_v, k_new, v_new, seqlens, bt_host)
    out, lse = _split(dm.flash_dmattn_with_kvcache(**kw), kw)
    assert_fa_close(out, lse, ref_args, _dtype(q), forward=reference_kvcache.kvcache_forward)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), "append differs"
    _assert_repeatable(dm.flash_dmattn_with_kvcache, kw, out, lse)   # appends the same again


@pytest.mark.parametrize("seed", range(CASES))
def test_random_call(seed):
    case = call_fuzz.good_case(FIRST_SEED + seed, "cuda")
    # every other call checks gradients; every other of those (with return_lse) puts lse into
    # the loss too (the backward's dlse path)
    if case.api == "dense":
        _check_dense(case.kwargs, grad=seed % 2 == 0, use_lse=seed % 4 == 0)
    elif case.api == "varlen":
        _check_varlen(case.kwargs, grad=seed % 2 == 0, use_lse=seed % 4 == 0)
    else:
        _check_kv(case.kwargs)
    torch.cuda.synchronize()   # a device fault of this call fails this test, not a later one


def test_the_reference_rule_rejects_a_wrong_output():
    """The checks above can fail: a call's output with one row perturbed is rejected."""
    case = call_fuzz.good_case(FIRST_SEED, "cuda", apis=("dense",))
    kw = dict(case.kwargs, return_lse=False)
    kw.pop("deterministic", None)
    q = kw["query"]
    out = dm.flash_dmattn_func(**kw).clone()
    out[0, 0] += 0.05 * (1 + out[0, 0].abs())
    scale, cap, window = _options(kw)
    sparse = kw.get("sparse_mask")
    with pytest.raises(AssertionError, match="max\\|out-ref\\|"):
        assert_fa_close(out, None, dict(
            q=f64(q), k=f64(kw["key"]), v=f64(kw["value"]), mask=f64(kw.get("attn_mask")),
            bias=f64(kw.get("attn_bias")), scale=scale, softcap=cap, window=window,
            sparse=None if sparse is None else np.asarray(sparse.to_dense())), _dtype(q))
