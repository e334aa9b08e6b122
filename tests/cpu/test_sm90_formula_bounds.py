"""The Hopper kernels' exclusion by formula on a partial tile (block_info.cuh,
window_line_bounds; called by cuda_src/sm90/fwd.cu's transform per query row over keys and by
cuda_src/sm90/bwd.cu's query_bounds per key over queries): per tile line two bounds on the place
in the tile instead of in_window's rule per element. The model here is the helper's arithmetic
line for line (32-bit ints, the saturating window edges, the clamps); it must exclude exactly
what the per-element rule excludes (the sequence ends and the bottom-right aligned
causal/window edges of in_window), for any window size (INT32_MAX included: the kernels never
add a window that could overflow). The GPU tests check the kernels against the float64
reference."""

from __future__ import annotations

import random

import pytest

INT32_MAX = 2**31 - 1
BLOCK_N = 128


def in_rule(key: int, row: int, off: int, len_k: int, wl: int, wr: int) -> bool:
    """block_info.cuh's in_window plus the key end, per element (the old path)."""
    if key >= len_k:
        return False
    if wl >= 0 and key < row + off - wl:
        return False
    return not (wr >= 0 and key > row + off + wr)


def line_bounds(d: int, last: int, w_hi: int, w_lo: int, tile: int) -> tuple[int, int]:
    """window_line_bounds<tile>(d, last, w_hi, w_lo): place kk passes iff lo <= kk <= hi."""
    h = last
    if w_hi >= 0 and w_hi <= tile - d:
        h = min(h, d + w_hi)
        assert -(2**31) <= d + w_hi <= INT32_MAX
    hi = max(-1, min(h, tile))
    lo = min(d - w_lo, tile) if w_lo >= 0 and w_lo <= d + 1 else -1
    for v in (d, last, h, hi, lo, tile - d, d + 1):  # every intermediate fits the kernel's int32
        assert -(2**31) <= v <= INT32_MAX
    return lo, hi


def bounds(n0: int, t: int, row: int, off: int, len_k: int, wl: int, wr: int,
           block_n: int = BLOCK_N) -> tuple[int, int]:
    """The forward's call (fwd.cu transform): key n0 + 2t + kk of query `row`."""
    key0 = n0 + 2 * t
    return line_bounds(row + off - key0, len_k - 1 - key0, wr, wl, block_n)


def bwd_bounds(m0: int, t: int, key: int, off: int, len_q: int, len_k: int, wl: int, wr: int,
               block_m: int) -> tuple[int, int]:
    """The backward's call (bwd.cu query_bounds): query m0 + 2t + kk of `key`."""
    q0 = m0 + 2 * t
    return line_bounds(key - off - q0, len_q - 1 - q0 if key < len_k else -1, wl, wr, block_m)


def _check(n0, row, off, len_k, wl, wr, block_n=BLOCK_N):
    for t in range(4):
        lo, hi = bounds(n0, t, row, off, len_k, wl, wr, block_n)
        for j in range(block_n // 8):
            for e in range(2):
                kk = 8 * j + e
                got = lo <= kk <= hi
                want = in_rule(n0 + 2 * t + kk, row, off, len_k, wl, wr)
                assert got == want, (n0, t, kk, row, off, len_k, wl, wr, lo, hi)


@pytest.mark.parametrize("seed", range(4))
def test_bounds_exclude_exactly_the_rules_keys(seed):
    rng = random.Random(seed)
    for _ in range(400):
        len_k, len_q = rng.randint(1, 5000), rng.randint(1, 5000)
        off = len_k - len_q  # bottom-right aligned
        n0 = BLOCK_N * rng.randint(0, len_k // BLOCK_N)
        if rng.random() < 0.75:  # the diagonal in or near the tile: where the bounds bind
            row = max(0, n0 - off + rng.randint(-300, 300))
        else:
            row = rng.randint(0, len_q - 1 + 130)  # rows past len_q too (never stored)
        wl = rng.choice([-1, 0, 1, 63, 1023, rng.randint(0, 300), rng.randint(0, 6000),
                         INT32_MAX])
        wr = rng.choice([-1, 0, 1, 127, rng.randint(0, 300), rng.randint(0, 6000), INT32_MAX])
        _check(n0, row, off, len_k, wl, wr, rng.choice([64, 128]))


@pytest.mark.parametrize("case", [
    # (n0, row, off, len_k, wl, wr): causal diagonal, window edges, key end, huge windows
    (0, 0, 0, 4096, -1, 0),
    (4096 - 128, 4095, 0, 4096, -1, 0),
    (1024, 1100, 0, 16384, 1023, 0),
    (1024, 2100, 0, 16384, 1023, 0),
    (512, 0, 520 - 300, 520, 150, 100),
    (0, 299, 520 - 300, 520, INT32_MAX, INT32_MAX),
    (0, 5, -3000, 100, INT32_MAX, 0),
    (384, 10, 0, 400, -1, -1),
])
def test_bounds_edge_cases(case):
    _check(*case)


def _check_bwd(m0, key, len_q, len_k, wl, wr, block_m):
    off = len_k - len_q
    for t in range(4):
        lo, hi = bwd_bounds(m0, t, key, off, len_q, len_k, wl, wr, block_m)
        for j in range(block_m // 8):
            for e in range(2):
                kk = 8 * j + e
                q = m0 + 2 * t + kk
                want = q < len_q and in_rule(key, q, off, len_k, wl, wr)
                assert (lo <= kk <= hi) == want, (m0, t, kk, key, len_q, len_k, wl, wr, lo, hi)


@pytest.mark.parametrize("seed", range(4))
def test_backward_bounds_exclude_exactly_the_rules_queries(seed):
    rng = random.Random(100 + seed)
    for _ in range(400):
        len_k, len_q = rng.randint(1, 5000), rng.randint(1, 5000)
        block_m = rng.choice([64, 128])
        m0 = block_m * rng.randint(0, (len_q - 1) // block_m)
        if rng.random() < 0.75:  # the diagonal in or near the tile
            key = max(0, m0 + len_k - len_q + rng.randint(-300, 300))
        else:
            key = rng.randint(0, len_k - 1 + 130)  # keys past len_k too
        wl = rng.choice([-1, 0, 1, 63, 1023, rng.randint(0, 300), rng.randint(0, 6000),
                         INT32_MAX])
        wr = rng.choice([-1, 0, 1, 127, rng.randint(0, 300), rng.randint(0, 6000), INT32_MAX])
        _check_bwd(m0, key, len_q, len_k, wl, wr, block_m)


@pytest.mark.parametrize("case", [
    # (m0, key, len_q, len_k, wl, wr, block_m)
    (0, 0, 4096, 4096, -1, 0, 64),
    (4032, 4095, 4096, 4096, -1, 0, 64),
    (1024, 1100, 16384, 16384, 1023, 0, 64),
    (0, 520, 300, 520, 150, 100, 128),  # a key past len_k
    (256, 10, 300, 520, INT32_MAX, INT32_MAX, 64),
    (0, 99, 3100, 100, INT32_MAX, 0, 64),
    (384, 10, 400, 400, -1, -1, 64),
])
def test_backward_bounds_edge_cases(case):
    _check_bwd(*case)
