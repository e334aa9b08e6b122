"""Models of two pieces of cuda_src/sm90/bwd.cu on the CPU, written to mirror its index
arithmetic line by line:

- the mask transpose: producer warps 2-3 ballot 16 keys at a time over their 32 rows (one
  row per lane), lane e keeps key k0 + e's word, words[2 * key + w'] (w' = warp - 2); a
  consumer thread (g, t of warp w of consumer c) reads the 64-bit word of each of its keys,
  shifts it right by 2t and tests bit 8j + (e & 1) for element (j, e): that must be the mask
  byte of (row 8j + 2t + (e & 1), key);
- the deterministic mode's order: the key tiles whose item lists (query_range, as the kernel
  forms mb_begin / n_mb) hold a query tile are exactly n_lo .. n_hi with n_lo =
  key_range(tile rows).k_begin / 128, so key tile n's turn (n - n_lo) counts the tiles before
  it; and a simulation of CTAs taking tickets (limited residency, either grid order) that block
  on the counters ends with every CTA done and each query tile's adds in key-tile order.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dmattn_cupy.reference import allowed_positions

BLOCK_M, BLOCK_N = 64, 128


# ---- block_info.cuh, transcribed -------------------------------------------------------------

def key_range(wl: int, wr: int, row_begin: int, row_end: int, len_q: int, len_k: int):
    off = len_k - len_q
    kb, ke = 0, len_k
    if wl >= 0:
        kb = max(0, row_begin + off - wl)
    if wr >= 0:
        ke = min(len_k, row_end - 1 + off + wr + 1)
    return kb, ke


def query_range(wl: int, wr: int, n0: int, n_last: int, len_q: int, len_k: int):
    off = len_k - len_q
    b, e = 0, len_q
    if wr >= 0:
        b = max(0, n0 - off - wr)
    if wl >= 0:
        e = min(len_q, n_last - off + wl + 1)
    return b, e


def items_of(tile_n: int, wl: int, wr: int, len_q: int, len_k: int) -> list[int]:
    """bwd.cu: the query tiles (m0 / 64) key tile tile_n visits, in item order."""
    n0 = tile_n * BLOCK_N
    qb, qe = query_range(wl, wr, n0, min(n0 + BLOCK_N, len_k) - 1, len_q, len_k)
    mb_begin = qb // BLOCK_M
    n_mb = (qe - 1) // BLOCK_M + 1 - mb_begin if qb < qe else 0
    return [mb_begin + i for i in range(n_mb)]


def n_lo_of(m: int, wl: int, wr: int, len_q: int, len_k: int) -> int:
    m0 = m * BLOCK_M
    return key_range(wl, wr, m0, min(m0 + BLOCK_M, len_q), len_q, len_k)[0] // BLOCK_N


CASES = [(lq, lk, w) for lq, lk in ((64, 64), (200, 272), (330, 600), (700, 300), (1, 900),
                                    (900, 1), (129, 257), (1024, 1024))
         for w in ((-1, -1), (-1, 0), (70, 30), (150, 100), (200, -1), (0, 0), (10, 0),
                   (-1, 50), (5, -1))]


@pytest.mark.parametrize("len_q,len_k,window", CASES)
def test_visiting_key_tiles_are_n_lo_to_n_hi(len_q, len_k, window):
    wl, wr = window
    n_tiles = -(-len_k // BLOCK_N)
    m_tiles = -(-len_q // BLOCK_M)
    visitors = {m: [] for m in range(m_tiles)}
    for n in range(n_tiles):
        for m in items_of(n, wl, wr, len_q, len_k):
            assert 0 <= m < m_tiles
            visitors[m].append(n)
    allowed = allowed_positions(len_q, len_k, window)
    for m, ns in visitors.items():
        # the visits are what the window allows (never a tile with no visible pair, every tile
        # with one): exactly the work, and contiguous
        rows = allowed[m * BLOCK_M:(m + 1) * BLOCK_M]
        want = [n for n in range(n_tiles) if rows[:, n * BLOCK_N:(n + 1) * BLOCK_N].any()]
        assert ns == want, (m, ns, want)
        if ns:
            assert ns == list(range(ns[0], ns[-1] + 1))
            assert ns[0] == n_lo_of(m, wl, wr, len_q, len_k)
            for n in ns:  # the turn key tile n waits for: the visitors before it
                assert n - n_lo_of(m, wl, wr, len_q, len_k) == ns.index(n)


def _block_of(lin: int, grid: tuple[int, int, int], right_limited: bool):
    gx, gy, gz = grid
    if not right_limited:
        return lin % gx, lin // gx % gy, lin // (gx * gy)
    per_tile = gy * gz
    return lin // per_tile, lin % per_tile % gy, lin % per_tile // gy


@pytest.mark.parametrize("len_q,len_k,window", [c for c in CASES if c[2] in
                                                 ((-1, -1), (-1, 0), (150, 100), (200, -1))])
@pytest.mark.parametrize("resident", [1, 3])
@pytest.mark.parametrize("q_per_kv", [1, 3])
def test_ticket_schedule_finishes_in_key_tile_order(len_q, len_k, window, resident, q_per_kv):
    """CTAs start in ticket order, at most `resident` at a time (one more starts when one
    ends); each walks its items (head-major), waiting at an item until its query tile's
    counter reaches its turn (kDqWarps = 1 here), then adds and increments. Every CTA must
    finish, and each (head, query tile) must see its adds in increasing key-tile order."""
    wl, wr = window
    kv_heads, batch = 2, 2
    grid = (-(-len_k // BLOCK_N), kv_heads, batch)
    n_cta = grid[0] * grid[1] * grid[2]
    counter: dict = {}
    order: dict = {}
    pending = list(range(n_cta))  # tickets in order
    running: list = []            # [tile, kvh, b, items, next item]
    while pending or running:
        while pending and len(running) < resident:
            tile, kvh, b = _block_of(pending.pop(0), grid, wr >= 0)
            ms = items_of(tile, wl, wr, len_q, len_k)
            items = [(kvh * q_per_kv + hh, m) for hh in range(q_per_kv) for m in ms]
            running.append([tile, kvh, b, items, 0])
        progressed = False
        for cta in list(running):
            tile, kvh, b, items, i = cta
            while i < len(items):
                h, m = items[i]
                key = (b, h, m)
                turn = tile - n_lo_of(m, wl, wr, len_q, len_k)
                if counter.get(key, 0) < turn:
                    break
                assert counter.get(key, 0) == turn
                order.setdefault(key, []).append(tile)
                counter[key] = turn + 1
                i += 1
                progressed = True
            cta[4] = i
            if i == len(items):
                running.remove(cta)
                progressed = True
        assert progressed, "deadlock: every resident CTA waits"
    for key, tiles in order.items():
        assert tiles == sorted(tiles) and tiles == list(range(tiles[0], tiles[-1] + 1)), key


def _transpose_words(mask_tile: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The producer's words (uint32, 2 per key) of a 64 x 128 tile of mask bytes and its two
    warps' flags (bit 0: all kept, bit 1: some kept)."""
    words = np.zeros(2 * BLOCK_N, np.uint64)
    flags = []
    for wh in range(2):
        rows = mask_tile[32 * wh:32 * wh + 32]      # lane l: row 32 wh + l
        all_, any_ = 0xFFFFFFFF, 0
        for ch in range(BLOCK_N // 16):
            chunk = rows[:, 16 * ch:16 * ch + 16]   # lane l's 16 bytes (lo: keys 0-7)
            mine = np.zeros(32, np.uint64)
            for e in range(16):
                v = sum(int(chunk[lane, e] != 0) << lane for lane in range(32))  # ballot
                all_ &= v
                any_ |= v
                mine[e] = v                              # lane e keeps it
            for lane in range(16):
                words[2 * (16 * ch + lane) + wh] = mine[lane]
        flags.append((1 if all_ == 0xFFFFFFFF else 0) | (2 if any_ else 0))
    return words, flags


def test_mask_words_give_each_thread_its_elements():
    rng = np.random.default_rng(0)
    tile = (rng.random((BLOCK_M, BLOCK_N)) < 0.6).astype(np.uint8) * rng.integers(1, 4)
    words, flags = _transpose_words(tile)
    assert flags == [2, 2]
    for c, w, g, t in itertools.product(range(2), range(4), range(8), range(4)):
        key_l = [64 * c + 16 * w + g, 64 * c + 16 * w + g + 8]
        mword = [(int(words[2 * k]) | int(words[2 * k + 1]) << 32) >> (2 * t) for k in key_l]
        for j, e in itertools.product(range(8), range(4)):
            r, qq = e >> 1, 8 * j + 2 * t + (e & 1)
            assert ((mword[r] >> (8 * j + (e & 1))) & 1) == (tile[qq, key_l[r]] != 0)


def test_mask_flags_classify_the_tile():
    """Consumers: partial = edge or not (flags[0] & flags[1] & 1); skipped (no products) when
    neither warp's rows keep anything: (flags[0] | flags[1]) & 2 == 0."""
    full = np.ones((BLOCK_M, BLOCK_N), np.uint8)
    for tile, all_kept, some_kept in (
            (full, True, True), (full * 0, False, False),
            (np.pad(full[:1, :1], ((63, 0), (127, 0))), False, True),   # one element (63, 127)
            (np.pad(full[:1, :1], ((0, 63), (0, 127))), False, True),   # one element (0, 0)
            (np.where(np.arange(BLOCK_N) == 5, 0, full), False, True)):
        _, flags = _transpose_words(tile)
        assert bool(flags[0] & flags[1] & 1) == all_kept
        assert bool((flags[0] | flags[1]) & 2) == some_kept
