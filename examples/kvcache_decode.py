"""Decoding over a paged KV cache with a key-based "live keys" mask: each step appends one token
per sequence to the cache in place and attends to every cached key that is still live.

The cache is a pool of 64-row pages shared by the batch; a block table maps each sequence's
positions to pages (given here in shuffled order). The mask is paged like the cache, one bool
per cached key and kv head: a cache that drops keys (eviction, sparsity chosen per step) flips
them to False and the kernel never reads their values into the softmax. Every step is checked
against plain float64 NumPy attention over the same pages. On a GPU the arrays are CuPy's and
the CUDA backend runs (the append kernel, then the decode kernel with split-KV chosen from the
shapes); without one the same calls run on the float64 reference backend and say so.
"""

from __future__ import annotations

import math

import numpy as np

import dmattn_cupy as dm

PAGE = 64


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def cache_rows(block_table: np.ndarray, b: int, n: int) -> np.ndarray:
    """Rows of the flattened (num_pages * PAGE) cache that hold keys 0..n-1 of sequence b."""
    j = np.arange(n)
    return block_table[b, j // PAGE] * PAGE + j % PAGE


def naive_step(q, k_cache, v_cache, live, block_table, lens):
    """float64 attention of q (B, 1, H, D) over each sequence's first lens[b] cached keys."""
    b_count, _, h, d = q.shape
    hk = k_cache.shape[2]
    kf = k_cache.reshape(-1, hk, d).astype(np.float64)
    vf = v_cache.reshape(-1, hk, d).astype(np.float64)
    lf = live.reshape(-1, hk)
    out = np.zeros(q.shape)
    for b in range(b_count):
        rows = cache_rows(block_table, b, int(lens[b]))
        for head in range(h):
            g = head // (h // hk)
            s = kf[rows, g] @ q[b, 0, head].astype(np.float64) / math.sqrt(d)
            s[~lf[rows, g]] = -np.inf
            if np.isfinite(s).any():
                p = np.exp(s - s.max())
                out[b, 0, head] = p @ vf[rows, g] / p.sum()
    return out


def main() -> None:
    rng = np.random.default_rng(0)
    h, hk, d, steps = 16, 4, 128, 6
    prompt = np.array([700, 45, 1900], dtype=np.int32)   # cached keys per sequence
    b_count = len(prompt)
    max_pages = math.ceil((int(prompt.max()) + steps) / PAGE)
    num_pages = b_count * max_pages + 3                  # a pool with a few spare pages
    block_table = rng.permutation(num_pages)[:b_count * max_pages].reshape(
        b_count, max_pages).astype(np.int32)

    k_cache = np.zeros((num_pages, PAGE, hk, d), np.float16)
    v_cache = np.zeros_like(k_cache)
    live = np.ones((num_pages, PAGE, hk), bool)        # new keys are live
    for b, n in enumerate(prompt):                      # the prompts' keys and values
        rows = cache_rows(block_table, b, int(n))
        k_cache.reshape(-1, hk, d)[rows] = rng.standard_normal((n, hk, d))
        v_cache.reshape(-1, hk, d)[rows] = rng.standard_normal((n, hk, d))
        keep = rng.random((n, hk)) < 0.75              # evict ~25% of each prompt's keys,
        keep[:4] = True                                 # keeping the first 4 ("sinks")
        live.reshape(-1, hk)[rows] = keep

    if gpu_available():
        import cupy

        xp, where, to_host = cupy, "CUDA backend (append + decode kernels)", cupy.asnumpy
    else:
        print("no GPU found: running on the float64 reference backend")
        xp, where, to_host = np, "reference backend", np.asarray
    kc, vc, mask, table = (xp.asarray(a) for a in (k_cache, v_cache, live, block_table))

    lens = prompt.copy()
    worst = 0.0
    for _ in range(steps):
        q = rng.standard_normal((b_count, 1, h, d)).astype(np.float16)
        k_new = rng.standard_normal((b_count, 1, hk, d)).astype(np.float16)
        v_new = rng.standard_normal((b_count, 1, hk, d)).astype(np.float16)
        out = dm.flash_dmattn_with_kvcache(xp.asarray(q), kc, vc, k=xp.asarray(k_new),
                                           v=xp.asarray(v_new), cache_seqlens=xp.asarray(lens),
                                           block_table=table, attn_mask=mask)
        k_host, v_host = to_host(kc), to_host(vc)
        for b in range(b_count):                        # the append went to position lens[b]
            row = cache_rows(block_table, b, int(lens[b]) + 1)[-1]
            assert (k_host.reshape(-1, hk, d)[row] == k_new[b, 0]).all(), "append missing"
            assert (v_host.reshape(-1, hk, d)[row] == v_new[b, 0]).all(), "append missing"
        lens += 1
        ref = naive_step(q, k_host, v_host, live, block_table, lens)
        worst = max(worst, float(np.abs(to_host(out).astype(np.float64) - ref).max()))

    kept = sum(int(live.reshape(-1, hk)[cache_rows(block_table, b, int(n))].sum())
               for b, n in enumerate(lens))
    print(f"{where}: {steps} steps, batch {b_count}, {int(lens.sum())} cached keys per kv head "
          f"in pages of {PAGE} ({kept / (hk * int(lens.sum())):.0%} live), max |out - float64 "
          f"NumPy| = {worst:.2e}")
    assert worst < 2e-2, "result differs"
    print("kvcache_decode OK")


if __name__ == "__main__":
    main()
