"""The KV-cache API on the thin launch path, on the CPU with the GPU stubbed (the ``cap`` fixture
of test_fastpath: CPU torch tensors pose as CUDA device 0, launches captured byte for byte).

The property: a repeated ``flash_dmattn_with_kvcache`` call is served by its cached plan (append,
decode and combine launches) and launches exactly what the validated path builds for the same
arrays, pointers included: the caches, the block table, cache_seqlens, the new rows, the
mask/bias and the outputs. Calls the key cannot prove the same (an int cache_seqlens of
another value, host-side value checks, misaligned rows that need a copy) are built again."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import test_fastpath as tf  # noqa: E402  (tests/cpu is on sys.path: pytest's rootdir import)

import dmattn_cupy as dm  # noqa: E402
from dmattn_cupy import fastpath  # noqa: E402

cap = tf.cap   # the fixture
B, SQ, H, HK, D, PAGE, PAGES = 2, 1, 8, 2, 64, 64, 40


def _case(seed: int, paged: bool, append: bool, seqlens: str) -> tuple[tuple, dict]:
    """(query, k_cache, v_cache) and keyword arguments of one call (new arrays per seed)."""
    q = tf._rand(B, SQ, H, D, seed=seed)
    if paged:
        kc, vc = tf._rand(PAGES, PAGE, HK, D, seed=seed + 1), tf._rand(PAGES, PAGE, HK, D,
                                                                          seed=seed + 2)
        g = torch.Generator().manual_seed(seed)
        table = torch.randperm(PAGES, generator=g)[:B * 16].reshape(B, 16).to(torch.int32)
        lead = PAGES
        kw = {"block_table": table}
    else:
        kc, vc = tf._rand(B, 16 * PAGE, HK, D, seed=seed + 1), tf._rand(B, 16 * PAGE, HK, D,
                                                                         seed=seed + 2)
        lead, kw = B, {}
    rows = PAGE if paged else 16 * PAGE
    kw["attn_mask"] = torch.rand(lead, rows, HK, generator=torch.Generator().manual_seed(seed)) \
        > 0.3
    kw["attn_bias"] = tf._rand(lead, rows, H, seed=seed + 3)
    if append:
        kw["k"], kw["v"] = tf._rand(B, 3, HK, D, seed=seed + 4), tf._rand(B, 3, HK, D,
                                                                         seed=seed + 5)
    kw["cache_seqlens"] = 700 if seqlens == "int" else \
        torch.tensor([700, 1000][:B], dtype=torch.int32)
    return (q, kc, vc), kw


@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("append", [True, False])
@pytest.mark.parametrize("seqlens", ["int", "array"])
@pytest.mark.parametrize("lse", [False, True])
def test_kvcache_hits_launch_what_the_validated_path_builds(cap, paged, append, seqlens, lse):
    args, kw = _case(0, paged, append, seqlens)
    dm.flash_dmattn_with_kvcache(*args, return_lse=lse, **kw)
    first = cap.take()
    families = [f for _, f, *_ in first]
    assert all(p == "slow" for p, *_ in first) and "fwd_decode" in families
    assert ("kv_append" in families) == append
    res = dm.flash_dmattn_with_kvcache(*args, return_lse=lse, **kw)
    again = cap.take()
    assert [p for p, *_ in again] == ["thin"] * len(first)
    assert tf._masked(again, cap) == tf._masked(first, cap)
    out = res[0] if lse else res
    dec = next(r for _, f, _, r, _ in again if f == "fwd_decode")
    rec = tf._record(dec[0], "FwdParams")
    assert int(rec["o"][0]) == out.data_ptr() and int(rec["q"][0]) == args[0].data_ptr()
    if lse:
        assert int(rec["lse"][0]) == res[1].data_ptr()
    # the same shapes, new arrays: the cached plan with their pointers == a fresh validated build
    args2, kw2 = _case(20, paged, append, seqlens)
    dm.flash_dmattn_with_kvcache(*args2, return_lse=lse, **kw2)
    thin = cap.take()
    assert [p for p, *_ in thin] == ["thin"] * len(first)
    fastpath.clear()
    dm.flash_dmattn_with_kvcache(*args2, return_lse=lse, **kw2)
    slow = cap.take()
    assert [p for p, *_ in slow] == ["slow"] * len(first)
    assert tf._masked(thin, cap) == tf._masked(slow, cap)
    dec = tf._record(next(r for _, f, _, r, _ in thin if f == "fwd_decode")[0], "FwdParams")
    assert int(dec["k"][0]) == args2[1].data_ptr() and int(dec["bias"][0]) == \
        kw2["attn_bias"].data_ptr()
    assert int(dec["block_table"][0]) == (kw2["block_table"].data_ptr() if paged else 0)
    assert int(dec["cache_seqlens"][0]) == (0 if seqlens == "int" else
                                            kw2["cache_seqlens"].data_ptr())
    if append:
        app = tf._record(next(r for _, f, _, r, _ in thin if f == "kv_append")[0],
                         "KvAppendParams")
        assert int(app["k_new"][0]) == kw2["k"].data_ptr()
        assert int(app["v_cache"][0]) == args2[2].data_ptr()


def test_kvcache_keys_tell_apart_what_the_records_hold(cap, monkeypatch):
    args, kw = _case(0, True, True, "int")
    dm.flash_dmattn_with_kvcache(*args, **kw)
    assert cap.take()[0][0] == "slow"
    dm.flash_dmattn_with_kvcache(*args, **{**kw, "cache_seqlens": 701})   # another length
    assert cap.take()[0][0] == "slow"
    dm.flash_dmattn_with_kvcache(*args, **{**kw, "num_splits": 2})
    assert cap.take()[0][0] == "slow"
    dm.flash_dmattn_with_kvcache(*args, **{**kw, "cache_seqlens": 701})
    assert all(p == "thin" for p, *_ in cap.take())
    # host-side value checks run on every call: never cached
    monkeypatch.setenv("DMATTN_CHECK", "1")
    for _ in range(2):
        dm.flash_dmattn_with_kvcache(*args, **kw)
        assert all(p == "slow" for p, *_ in cap.take())


def test_kvcache_copies_are_never_cached(cap):
    """A query whose rows are not 16-byte aligned is copied per call: never a cached plan."""
    args, kw = _case(0, False, False, "int")
    wide = tf._rand(B, SQ, H, D + 4, seed=9)
    q = wide[..., 2:D + 2]                        # base pointer 4 bytes past alignment
    for _ in range(2):
        dm.flash_dmattn_with_kvcache(q, *args[1:], **kw)
        assert all(p == "slow" for p, *_ in cap.take())
