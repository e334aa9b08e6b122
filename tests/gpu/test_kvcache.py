"""``flash_dmattn_with_kvcache`` on the GPU against the float64 reference (reference_kvcache):
dense and paged caches (page sizes 16/64/256), appends in place (cache contents checked),
every key-based mask/bias layout over the cache (h' 1/Hk/H), GQA/MQA, causal/window/softcap,
split-KV on and off, ragged cache_seqlens including 0 and a full cache, longer query chunks,
return_lse, CuPy inputs."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import f64

import dmattn_cupy as dm
from dmattn_cupy import reference_kvcache, runtime

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

PAGES = [0, 16, 64, 256]  # 0 = dense cache
B, S_MAX = 4, 320


def record_launches(monkeypatch, view) -> list:
    """A list that receives ``view(kernel, args)`` of every kernel launch from now on: plain
    launches and launches with attributes (``launch_ex``: the split-KV combine is a
    programmatic launch on sm_90+; without attributes ``launch_ex`` goes through ``launch``
    and is seen there)."""
    seen: list = []
    real, real_ex = runtime.launch, runtime.launch_ex

    def spy(kernel, grid, args, *a, **kw):
        seen.append(view(kernel, args))
        return real(kernel, grid, args, *a, **kw)

    def spy_ex(kernel, grid, args, *a, **kw):
        if kw.get("cluster") is not None or kw.get("programmatic"):
            seen.append(view(kernel, args))
        return real_ex(kernel, grid, args, *a, **kw)

    monkeypatch.setattr(runtime, "launch", spy)
    monkeypatch.setattr(runtime, "launch_ex", spy_ex)
    return seen


def record_launch_families(monkeypatch) -> list[str]:
    """``record_launches`` of each launch's kernel family."""
    return record_launches(monkeypatch, lambda kernel, args: kernel.spec.family)


@pytest.fixture
def launches(monkeypatch):
    """Records the family of every kernel launch (append, decode, combine)."""
    return record_launch_families(monkeypatch)


def _rand(shape, g, dtype="bfloat16"):
    return torch.randn(*shape, generator=g).to("cuda", getattr(torch, dtype))


def _paged(x, page_size, table):
    """A dense (B, S_max, ...) tensor scattered into a page pool by ``table`` (B, max_pages)."""
    b, s_max = x.shape[:2]
    per = table.shape[1]
    pad = per * page_size - s_max
    xp = torch.cat([x, x.new_zeros((b, pad) + tuple(x.shape[2:]))], 1)
    pool = x.new_zeros((int(table.max()) + 3, page_size) + tuple(x.shape[2:]))
    pool[table.reshape(-1).long()] = xp.reshape((b * per, page_size) + tuple(x.shape[2:]))
    return pool


def _table(page_size, seed):
    per = -(-S_MAX // page_size)
    perm = torch.randperm(B * per + 5, generator=torch.Generator().manual_seed(seed))
    return perm[: B * per].reshape(B, per).to(torch.int32).cuda()


def _mb(kind, heads, g, dtype):
    if kind == "mask":
        return (torch.rand(B, S_MAX, heads, generator=g) < 0.7).cuda()
    return _rand((B, S_MAX, heads), g, dtype)


def run_case(page=0, sq=1, h=8, hk=2, d=64, s_new=1, seqlens=(0, 1, 150, None), mask_h=None,
             bias_h=None, dtype="bfloat16", bias_dtype=None, num_splits=0, seed=0, lib="torch",
             return_lse=True, **kw):
    """One call checked against the reference, then the cache contents after the append."""
    g = torch.Generator().manual_seed(seed)
    q = _rand((B, sq, h, d), g, dtype)
    kc, vc = _rand((B, S_MAX, hk, d), g, dtype), _rand((B, S_MAX, hk, d), g, dtype)
    kn = _rand((B, s_new, hk, d), g, dtype) if s_new else None
    vn = _rand((B, s_new, hk, d), g, dtype) if s_new else None
    lens = [S_MAX - s_new if s is None else s for s in seqlens]
    cache_seqlens = torch.tensor(lens, dtype=torch.int32).cuda()
    mask = _mb("mask", mask_h, g, dtype) if mask_h else None
    bias = _mb("bias", bias_h, g, bias_dtype or dtype) if bias_h else None
    table = None
    if page:
        table = _table(page, seed)
        kc, vc = _paged(kc, page, table), _paged(vc, page, table)
        mask = _paged(mask, page, table) if mask is not None else None
        bias = _paged(bias, page, table) if bias is not None else None
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0 if window[1] < 0 else min(window[1], 0)
    ref_args = dict(q=f64(q), k_cache=f64(kc), v_cache=f64(vc), cache_seqlens=np.array(lens),
                    k_new=f64(kn), v_new=f64(vn),
                    block_table=None if table is None else table.cpu().numpy(),
                    mask=f64(mask), bias=f64(bias), scale=kw.get("softmax_scale") or d ** -0.5,
                    softcap=kw.get("softcap", 0.0), window=tuple(window))
    expect_k, expect_v = ref_args["k_cache"].copy(), ref_args["v_cache"].copy()
    if s_new:
        reference_kvcache.append(expect_k, expect_v, ref_args["k_new"], ref_args["v_new"],
                                 np.array(lens), ref_args["block_table"])
    args = [q, kc, vc, kn, vn, cache_seqlens, table, mask, bias]
    if lib == "cupy":
        cp = pytest.importorskip("cupy")
        args = [None if a is None else cp.from_dlpack(a) for a in args]
    res = dm.flash_dmattn_with_kvcache(*args[:3], k=args[3], v=args[4], cache_seqlens=args[5],
                                       block_table=args[6], attn_mask=args[7],
                                       attn_bias=args[8], num_splits=num_splits,
                                       return_lse=return_lse, **kw)
    torch.cuda.synchronize()
    out, lse = res if return_lse else (res, None)
    assert tuple(out.shape) == (B, sq, h, d)
    ref, ref_lse = reference_kvcache.kvcache_forward(**ref_args)
    low, _ = reference_kvcache.kvcache_forward(**ref_args, lowprec=dtype)
    o = f64(out)
    assert np.isfinite(o).all(), "output has NaN/inf"
    err, tol = np.abs(o - ref).max(), 2 * np.abs(low - ref).max() + 1e-4
    assert err <= tol, f"max|out-ref| = {err:.3e} > {tol:.3e}"
    if lse is not None:
        got = f64(lse)
        assert got.shape == (B, h, sq)
        assert (np.isneginf(got) == np.isneginf(ref_lse)).all(), "lse -inf rows differ"
        fin = np.isfinite(ref_lse)
        assert np.abs(got[fin] - ref_lse[fin]).max(initial=0) <= 2e-3 * (
            1 + np.abs(ref_lse[fin]).max(initial=0))
    # The caches after the call: the new rows at cache_seqlens[b] + i, nothing else changed.
    np.testing.assert_array_equal(f64(args[1]), expect_k)
    np.testing.assert_array_equal(f64(args[2]), expect_v)
    return out, lse


LAYOUTS = [(None, None)] + [(m, b) for m in (None, "1", "hk", "h") for b in (None, "1", "hk", "h")
                            if (m, b) != (None, None)]


def _heads(spec, h, hk):
    return {None: None, "1": 1, "hk": hk, "h": h}[spec]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"mask{x[0]}_bias{x[1]}")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: f"page{p}")
def test_mask_bias_layouts(page, layout):
    h, hk = 8, 2
    run_case(page=page, h=h, hk=hk, mask_h=_heads(layout[0], h, hk),
             bias_h=_heads(layout[1], h, hk), seed=page + len(str(layout)))


@pytest.mark.parametrize("combine", ["grid", "kernel"])
@pytest.mark.parametrize("splits", [1, 4], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("s_new", [1, 5], ids=lambda s: f"new{s}")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: f"page{p}")
def test_append_in_place(page, s_new, splits, combine, launches, monkeypatch):
    """(``combine``: who merges the split partials, DMATTN_SPLIT_COMBINE.)"""
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", combine)
    run_case(page=page, sq=s_new, s_new=s_new, mask_h=2, bias_h=8, is_causal=True,
             num_splits=splits, seed=s_new * 7 + splits)
    assert launches[0] == "kv_append" and launches.count("kv_append") == 1
    assert launches[1] == "fwd_decode"
    assert ("fwd_combine" in launches) == (splits > 1 and combine == "kernel")


OPTIONS = [dict(is_causal=True), dict(window_size=(32, 0)), dict(window_size=(20, 5)),
           dict(softcap=5.0), dict(is_causal=True, softcap=3.0, softmax_scale=0.3)]


@pytest.mark.parametrize("splits", [1, 4], ids=lambda s: f"splits{s}")
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "_".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("page", [0, 16], ids=lambda p: f"page{p}")
def test_causal_window_softcap(page, opts, splits):
    run_case(page=page, sq=3, s_new=2, mask_h=8, bias_h=1, num_splits=splits, seed=splits,
             **opts)


@pytest.mark.parametrize("heads", [(8, 2), (8, 1), (4, 4), (32, 8), (32, 1)],
                         ids=lambda x: f"h{x[0]}hk{x[1]}")
@pytest.mark.parametrize("page", [0, 64], ids=lambda p: f"page{p}")
def test_gqa_mqa(heads, page):
    h, hk = heads
    run_case(page=page, h=h, hk=hk, mask_h=h, bias_h=h, seed=h + hk)
    run_case(page=page, h=h, hk=hk, mask_h=hk, bias_h=1, seed=h + hk + 1)


@pytest.mark.parametrize("sq", [1, 4, 20], ids=lambda s: f"sq{s}")
def test_query_chunks(sq):
    """Longer query chunks (a prefill continuing a cache) run the same kernel."""
    run_case(page=64, sq=sq, s_new=sq, mask_h=2, bias_h=8, is_causal=True,
             seqlens=(0, 7, 100, None), seed=sq)


@pytest.mark.parametrize("splits", [0, 1, 3], ids=lambda s: f"splits{s}")
def test_ragged_lengths_splits(splits):
    run_case(page=16, seqlens=(0, 0, 319, 17), s_new=1, mask_h=8, bias_h=2, num_splits=splits)
    run_case(page=0, seqlens=(0, 0, 0, 0), s_new=0, mask_h=8, num_splits=splits)  # no keys


@pytest.mark.parametrize("d", [32, 96, 128, 256])
def test_head_dims_fp16_fp32_bias(d):
    run_case(page=64, d=d, dtype="float16", bias_dtype="float32", mask_h=2, bias_h=8, seed=d)


def test_cupy_inputs():
    run_case(page=16, mask_h=2, bias_h=2, lib="cupy", is_causal=True)
    run_case(page=0, lib="cupy", s_new=0)


def test_no_lse_and_int_seqlens():
    out = run_case(page=0, return_lse=False)[0]
    assert isinstance(out, torch.Tensor)
    g = torch.Generator().manual_seed(3)
    q = _rand((B, 1, 8, 64), g)
    kc, vc = _rand((B, 64, 2, 64), g), _rand((B, 64, 2, 64), g)
    kn, vn = _rand((B, 2, 2, 64), g), _rand((B, 2, 2, 64), g)
    want = dm.flash_dmattn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn,
                                        cache_seqlens=torch.full((B,), 10, dtype=torch.int32,
                                                                 device="cuda"))
    got = dm.flash_dmattn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=10)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(kc[:, 10:12], kn, rtol=0, atol=0)


def test_matches_the_varlen_decode_path():
    """The KV-cache kernel on a full dense cache equals the existing decode call (same kernel)."""
    g = torch.Generator().manual_seed(5)
    q = _rand((B, 1, 8, 128), g)
    kc, vc = _rand((B, 256, 2, 128), g), _rand((B, 256, 2, 128), g)
    bias = _rand((B, 256, 2), g)
    a = dm.flash_dmattn_with_kvcache(q, kc, vc, cache_seqlens=256, attn_bias=bias)
    b = dm.flash_dmattn_func(q, kc, vc, attn_bias=bias.permute(0, 2, 1)[:, :, None, :])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reference_backend_on_gpu_arrays():
    """backend="reference" with CUDA tensors: exact float64 math, the append done in place on
    the device; the CUDA backend agrees within the tolerance."""
    g = torch.Generator().manual_seed(9)
    q = _rand((B, 2, 8, 64), g)
    kc, vc = _rand((B, 64, 2, 64), g), _rand((B, 64, 2, 64), g)
    kn, vn = _rand((B, 2, 2, 64), g), _rand((B, 2, 2, 64), g)
    lens = torch.tensor([0, 5, 30, 62], dtype=torch.int32, device="cuda")
    kc2, vc2 = kc.clone(), vc.clone()
    ref = dm.flash_dmattn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, is_causal=True,
                                       backend="reference")
    out = dm.flash_dmattn_with_kvcache(q, kc2, vc2, kn, vn, cache_seqlens=lens, is_causal=True)
    assert ref.device == q.device and ref.dtype == q.dtype
    torch.testing.assert_close(kc, kc2, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc2, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=0)
