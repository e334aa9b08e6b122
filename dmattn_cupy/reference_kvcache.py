"""The float64 reference of the KV-cache API (``flash_dmattn_with_kvcache``), in NumPy.

The new keys/values are appended to copies of the caches at ``cache_seqlens`` (through the
block table for paged caches); each sequence's keys, values and key-based mask/bias are then
gathered into contiguous arrays and handed to ``reference.dense_forward``, so the KV-cache path
is checked against the same oracle as every other path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import set_rows
from .reference import dense_forward


def cache_rows(block_table: np.ndarray | None, page_size: int, b: int,
               length: int) -> tuple[np.ndarray, np.ndarray]:
    """(first index, second index) of keys 0 .. length-1 of sequence ``b`` in a cache-shaped
    array: (b, j) dense, (block_table[b, j // page_size], j % page_size) paged."""
    j = np.arange(length)
    if block_table is None:
        return np.full(length, b), j
    return np.asarray(block_table)[b, j // page_size].astype(np.int64), j % page_size


def append(k_cache: Any, v_cache: Any, k_new: Any, v_new: Any, cache_seqlens: np.ndarray,
           block_table: np.ndarray | None) -> None:
    """Writes row i of k_new/v_new (B, S_new, Hk, D) of sequence b at position
    cache_seqlens[b] + i of the caches, in place (cast to the caches' dtype); any array kind
    (NumPy, torch, CuPy), host index arrays."""
    page_size = k_cache.shape[1]
    s_new = k_new.shape[1]
    for b in range(k_new.shape[0]):
        start = int(cache_seqlens[b])
        p, r = cache_rows(block_table, page_size, b, start + s_new)
        set_rows(k_cache, p[start:], r[start:], k_new[b])
        set_rows(v_cache, p[start:], r[start:], v_new[b])


def _keyed(x: np.ndarray | None, p: np.ndarray, r: np.ndarray,
           dense: bool) -> np.ndarray | None:
    """A key-based cache mask/bias at cache positions (p, r) as (1, h', 1, length); a dense
    cache's (1, S_max, h') broadcasts over the batch."""
    if x is None:
        return None
    x = np.asarray(x)
    rows = x[np.zeros_like(p) if dense and x.shape[0] == 1 else p, r]
    return np.transpose(rows, (1, 0))[None, :, None, :]


def kvcache_forward(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                    cache_seqlens: np.ndarray, k_new: np.ndarray | None = None,
                    v_new: np.ndarray | None = None, block_table: np.ndarray | None = None,
                    mask: np.ndarray | None = None, bias: np.ndarray | None = None,
                    scale: float = 1.0, softcap: float = 0.0,
                    window: tuple[int, int] = (-1, -1),
                    lowprec: str | None = None,
                    key_block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """q (B, Sq, H, D); caches (B, S_max, Hk, D) or paged (num_pages, page_size, Hk, D) with
    block_table (B, max_pages); cache_seqlens (B,); k_new/v_new (B, S_new, Hk, D) or None;
    mask/bias key-based like the cache's first two dims, (B|1, S_max, h') or
    (num_pages, page_size, h'). The caches are not modified (``append`` does that).

    Returns out (B, Sq, H, D) and lse (B, H, Sq), float64: sequence b attends to its first
    cache_seqlens[b] + S_new keys, causal/window bottom-right aligned over that length.
    ``lowprec``, ``key_block``: as ``reference.dense_forward``'s."""
    q = np.asarray(q, dtype=np.float64)
    kc = np.array(k_cache, dtype=np.float64)
    vc = np.array(v_cache, dtype=np.float64)
    seqlens = np.asarray(cache_seqlens, dtype=np.int64).reshape(-1)
    s_new = 0
    if k_new is not None:
        append(kc, vc, np.asarray(k_new, np.float64), np.asarray(v_new, np.float64), seqlens,
               block_table)
        s_new = k_new.shape[1]
    b_, sq, h, d = q.shape
    page_size = kc.shape[1]
    out = np.zeros((b_, sq, h, d))
    lse = np.full((b_, h, sq), -np.inf)
    for b in range(b_):
        length = int(seqlens[b]) + s_new
        p, r = cache_rows(block_table, page_size, b, length)
        mk = _keyed(mask, p, r, block_table is None)
        bk = _keyed(bias, p, r, block_table is None)
        o, ls = dense_forward(q[b:b + 1], kc[p, r][None], vc[p, r][None], mk, bk, scale,
                              softcap, window, None, lowprec, key_block)
        out[b], lse[b] = o[0], ls[0]
    return out, lse
