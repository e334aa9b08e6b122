"""KV-cache API on the CPU: the float64 reference (paged = dense, appends, key-based mask/bias,
causal over the updated length), the NumPy backend's in-place append, validation errors, and
the append kernel's compile."""

from __future__ import annotations

import numpy as np
import pytest

import dmattn_cupy as dm
from dmattn_cupy import kvcache, reference, reference_kvcache

RNG = np.random.default_rng(0)


def _dense_case(b=3, sq=2, h=4, hk=2, d=16, s_max=48, s_new=0):
    q = RNG.standard_normal((b, sq, h, d))
    kc = RNG.standard_normal((b, s_max, hk, d))
    vc = RNG.standard_normal((b, s_max, hk, d))
    kn = RNG.standard_normal((b, s_new, hk, d)) if s_new else None
    vn = RNG.standard_normal((b, s_new, hk, d)) if s_new else None
    return q, kc, vc, kn, vn


def _to_paged(x, page_size, n_extra=3, seed=1):
    """A dense (B, S_max, ...) cache as shuffled pages + a block table."""
    b, s_max = x.shape[:2]
    per = -(-s_max // page_size)
    pad = np.zeros((b, per * page_size - s_max) + x.shape[2:], dtype=x.dtype)
    pages = np.concatenate([x, pad], 1).reshape((b * per, page_size) + x.shape[2:])
    perm = np.random.default_rng(seed).permutation(b * per + n_extra)
    store = np.zeros((b * per + n_extra, page_size) + x.shape[2:], dtype=x.dtype)
    store[perm[: b * per]] = pages
    table = perm[: b * per].reshape(b, per).astype(np.int32)
    return store, table


@pytest.mark.parametrize("s_new", [0, 3])
def test_reference_paged_equals_dense(s_new):
    q, kc, vc, kn, vn = _dense_case(s_max=64, s_new=s_new)
    seqlens = np.array([0, 17, 61 - s_new])
    mask = RNG.random((3, 64, 4)) < 0.7
    bias = RNG.standard_normal((3, 64, 2))
    args = dict(scale=0.3, softcap=0.0, window=(-1, 0))
    out_d, lse_d = reference_kvcache.kvcache_forward(q, kc, vc, seqlens, kn, vn, None, mask,
                                                     bias, **args)
    kp, table = _to_paged(kc, 16)
    vp, _ = _to_paged(vc, 16)
    mp, _ = _to_paged(mask, 16)
    bp, _ = _to_paged(bias, 16)
    out_p, lse_p = reference_kvcache.kvcache_forward(q, kp, vp, seqlens, kn, vn, table, mp, bp,
                                                     **args)
    np.testing.assert_allclose(out_p, out_d, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse_p), np.isneginf(lse_d))


def test_reference_matches_dense_forward_on_the_updated_cache():
    """Sequence b sees its first cache_seqlens[b] + S_new keys, the new ones last; causal is
    bottom-right aligned over that length; mask/bias are per key, shared by its queries."""
    q, kc, vc, kn, vn = _dense_case(sq=3, s_new=2)
    seqlens = np.array([5, 0, 40])
    bias = RNG.standard_normal((1, 48, 4))  # broadcast over the batch, per query head
    out, lse = reference_kvcache.kvcache_forward(q, kc, vc, seqlens, kn, vn, None, None, bias,
                                                 scale=0.25, window=(4, 0))
    for b in range(3):
        n = seqlens[b] + 2
        k = np.concatenate([kc[b, : seqlens[b]], kn[b]])[None]
        v = np.concatenate([vc[b, : seqlens[b]], vn[b]])[None]
        bb = np.transpose(bias[0, :n], (1, 0))[None, :, None, :]
        o, ls = reference.dense_forward(q[b:b + 1], k, v, None, bb, 0.25, window=(4, 0))
        np.testing.assert_allclose(out[b], o[0], atol=1e-12)
        np.testing.assert_allclose(lse[b], ls[0], atol=1e-12)


def test_reference_empty_sequence_gives_zero_and_neg_inf():
    q, kc, vc, _, _ = _dense_case()
    out, lse = reference_kvcache.kvcache_forward(q, kc, vc, np.array([0, 3, 0]), scale=1.0)
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all() and np.isfinite(lse[1]).all()


@pytest.mark.parametrize("paged", [False, True])
def test_numpy_backend_appends_in_place(paged):
    q, kc, vc, kn, vn = _dense_case(s_new=5)
    kc, vc = kc.astype(np.float32), vc.astype(np.float32)
    seqlens = np.array([0, 10, 43], dtype=np.int32)
    table = None
    if paged:
        kc, table = _to_paged(kc, 16)
        vc, _ = _to_paged(vc, 16)
    k_before, v_before = kc.copy(), vc.copy()
    want, want_lse = reference_kvcache.kvcache_forward(q, k_before, v_before, seqlens, kn, vn,
                                                       table, scale=0.25, window=(-1, 0))
    out, lse = dm.flash_dmattn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens,
                                            block_table=table, is_causal=True,
                                            return_lse=True)
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse.astype(np.float32), rtol=1e-6)
    expect_k, expect_v = k_before.copy(), v_before.copy()
    reference_kvcache.append(expect_k, expect_v, kn, vn, seqlens, table)
    np.testing.assert_array_equal(kc, expect_k)
    np.testing.assert_array_equal(vc, expect_v)
    for b in range(3):  # the new rows sit at cache_seqlens[b] + i
        p, r = reference_kvcache.cache_rows(table, kc.shape[1], b, seqlens[b] + 5)
        np.testing.assert_allclose(kc[p[-5:], r[-5:]], kn[b].astype(np.float32))
    # everything else is untouched
    changed = np.any(kc != k_before, axis=(-1, -2))
    assert changed.sum() <= 3 * 5


def test_int_cache_seqlens_and_none():
    q, kc, vc, _, _ = _dense_case()
    a = dm.flash_dmattn_with_kvcache(q, kc, vc, cache_seqlens=20)
    b = dm.flash_dmattn_with_kvcache(q, kc, vc, cache_seqlens=np.full(3, 20, np.int32))
    np.testing.assert_array_equal(a, b)
    full = dm.flash_dmattn_with_kvcache(q, kc, vc)  # None: the whole cache
    ref, _ = reference.dense_forward(q, kc, vc, None, None, 16 ** -0.5)
    np.testing.assert_allclose(full, ref, atol=1e-12)


def _call(**kw):
    q, kc, vc, _, _ = _dense_case()
    args = dict(query=q, k_cache=kc, v_cache=vc, cache_seqlens=np.zeros(3, np.int32))
    args.update(kw)
    return dm.flash_dmattn_with_kvcache(**args)


@pytest.mark.parametrize("kw, err, match", [
    (dict(k_cache=np.zeros((6, 24, 2, 16)), v_cache=np.zeros((6, 24, 2, 16)),
          block_table=np.zeros((3, 2), np.int32)), ValueError, "page_size"),
    (dict(k_cache=np.zeros((6, 0, 2, 16)), v_cache=np.zeros((6, 0, 2, 16)),
          block_table=np.zeros((3, 2), np.int32)), ValueError, "page_size"),
    (dict(k_cache=np.zeros((6, 16, 2, 16)), v_cache=np.zeros((6, 16, 2, 16)),
          block_table=np.zeros((3, 2), np.int64)), TypeError, "block_table dtype"),
    (dict(k_cache=np.zeros((6, 16, 2, 16)), v_cache=np.zeros((6, 16, 2, 16)),
          block_table=np.zeros((2, 2), np.int32)), ValueError, "block_table must be 2-D"),
    (dict(cache_seqlens=49), ValueError, "capacity=48"),
    (dict(cache_seqlens=-1), ValueError, "cache_seqlens"),
    (dict(cache_seqlens=np.zeros(3, np.int64)), TypeError, "int32"),
    (dict(cache_seqlens=np.zeros(2, np.int32)), ValueError, r"cache_seqlens must be 1-D"),
    (dict(cache_seqlens=np.array([0, 0, 48], np.int32), k=np.zeros((3, 1, 2, 16)),
          v=np.zeros((3, 1, 2, 16))), ValueError, r"cache_seqlens\[2\] = 48"),
    (dict(k=np.zeros((3, 1, 2, 16))), ValueError, "together"),
    (dict(k=np.zeros((3, 1, 1, 16)), v=np.zeros((3, 1, 1, 16))), ValueError, "kv_heads=2"),
    (dict(cache_seqlens=None, k=np.zeros((3, 1, 2, 16)), v=np.zeros((3, 1, 2, 16))),
     ValueError, "cache_seqlens is required"),
    (dict(k_cache=np.zeros((2, 48, 2, 16)), v_cache=np.zeros((2, 48, 2, 16))), ValueError,
     "block_table"),
    (dict(attn_mask=np.ones((3, 47, 2), bool)), ValueError, "key-based 3-D"),
    (dict(attn_mask=np.ones((3, 48, 3), bool)), ValueError, "key-based 3-D"),
    (dict(attn_mask=np.ones((3, 1, 48, 2), bool)), ValueError, "key-based 3-D"),
    (dict(attn_mask=np.ones((3, 48, 2))), TypeError, "attn_mask dtype"),
    (dict(num_splits=-1), ValueError, "num_splits"),
    (dict(k_cache=np.zeros((3, 48, 3, 16)), v_cache=np.zeros((3, 48, 3, 16))), ValueError,
     "multiple"),
])
def test_validation_errors(kw, err, match):
    with pytest.raises(err, match=match):
        _call(**kw)


def test_block_table_pages_checked_on_host():
    with pytest.raises(ValueError, match="block_table"):
        kvcache.check_seqlens_values(np.array([20]), 0, 32, np.array([[0, 7]]), 4, 16)
    kvcache.check_seqlens_values(np.array([16]), 0, 32, np.array([[0, 7]]), 4, 16)  # page 7 unused


def test_append_kernel_compiles():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy.compile import compile_spec

    for arch in ("sm_80", "sm_90"):
        ck = compile_spec(kvcache.append_spec(arch), use_disk_cache=False)
        assert not ck.spills and "kv_append" in ck.lowered_name


def test_exported():
    assert "flash_dmattn_with_kvcache" in dm.__all__


def test_kernel_fields_for_a_paged_cache():
    """What the decode kernel is told: page strides as batch strides, the key-based mask/bias
    as (pages, h', 1, page_size) with row stride 0, the lengths and the block table."""
    from dmattn_cupy import decode
    from dmattn_cupy.layout import build_fwd_params

    q = np.zeros((3, 1, 8, 64), np.float16)
    kc = np.zeros((10, 32, 2, 64), np.float16)
    mask = np.ones((10, 32, 2), bool)          # h' = Hk
    bias = np.zeros((10, 32, 8), np.float32)   # h' = H
    table = np.arange(6, dtype=np.int32).reshape(3, 2)
    kp = kvcache.check_kvcache(q, kc, kc, None, None, np.zeros(3, np.int32), table, mask, bias,
                               None, True, (-1, -1), 0.0, 0, False, "auto")
    assert (kp.page_size, kp.capacity, kp.pb.seqlen_k) == (32, 64, 64)
    rec = build_fwd_params(kp.pb, kp.pb.q, 0)
    for name, value in kvcache.decode_fields(kp).items():
        rec[0][name] = value
    r = rec[0]
    assert r["k_batch_stride"] == 32 * 2 * 64 and r["k_row_stride"] == 128
    assert (r["mask_batch_stride"], r["mask_head_stride"], r["mask_row_stride"],
            r["mask_col_stride"]) == (64, 1, 0, 2)
    assert (r["bias_batch_stride"], r["bias_head_stride"], r["bias_col_stride"]) == (256, 1, 8)
    assert (r["mask_head_ratio"], r["bias_head_ratio"], r["bias_is_fp32"]) == (4, 1, 1)
    assert (r["page_size"], r["seqlen_k_new"], r["window_right"]) == (32, 0, 0)
    spec = decode.decode_spec(kp.pb)
    smem = decode.launch_smem(spec, r)
    assert (r["mask_slot_mode"], r["bias_slot_mode"]) == (0, 1)  # one row; one per head (4)
    from dmattn_cupy.families import decode_smem
    assert smem == decode_smem(spec, 1, 4)


def test_int_seqlens_fix_the_key_count():
    q, kc, vc, kn, vn = _dense_case(s_new=2)
    kp = kvcache.check_kvcache(q, kc, vc, kn, vn, 30, None, None, None, None, False, (-1, -1),
                               0.0, 0, True, "auto")
    assert kp.pb.seqlen_k == 32 and kp.seqlens is None and kp.seqlens_int == 30
    assert kvcache.decode_fields(kp)["cache_seqlens"] == 0


def test_cpu_torch_tensors_append_in_place():
    torch = pytest.importorskip("torch")
    q, kc, vc, kn, vn = _dense_case(s_new=3)
    t = {n: torch.tensor(x, dtype=torch.bfloat16) for n, x in
         dict(q=q, kc=kc, vc=vc, kn=kn, vn=vn).items()}
    kc_before = t["kc"].clone()
    seqlens = torch.tensor([4, 0, 45], dtype=torch.int32)
    out = dm.flash_dmattn_with_kvcache(t["q"], t["kc"], t["vc"], t["kn"], t["vn"],
                                       cache_seqlens=seqlens, is_causal=True)
    assert out.dtype == torch.bfloat16 and out.shape == t["q"].shape
    for b, s in enumerate([4, 0, 45]):
        assert torch.equal(t["kc"][b, s:s + 3], t["kn"][b])
        assert torch.equal(t["vc"][b, s:s + 3], t["vn"][b])
        assert torch.equal(t["kc"][b, :s], kc_before[b, :s])
