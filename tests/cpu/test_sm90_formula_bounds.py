"""The Hopper forward's exclusion by formula on a partial tile (cuda_src/sm90/fwd.cu, transform):
per row half two bounds on the key's place in the tile instead of in_window's rule per element.
The model here is the kernel's arithmetic line for line (32-bit ints, the saturating window
edges, the clamps); it must exclude exactly the keys that the per-element rule excludes (the
key end len_k and the bottom-right aligned causal/window edges of block_info.cuh's in_window),
for any window size (INT32_MAX included: the kernel never adds a window that could overflow).
The GPU tests check the kernel itself against the float64 reference."""

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


def bounds(n0: int, t: int, row: int, off: int, len_k: int, wl: int, wr: int,
           block_n: int = BLOCK_N) -> tuple[int, int]:
    """(lo, hi) of the kernel: key n0 + 2t + kk passes iff lo <= kk <= hi."""
    key0 = n0 + 2 * t
    d = row + off - key0  # the diagonal's kk
    h = len_k - 1 - key0
    if wr >= 0 and wr <= block_n - d:
        h = min(h, d + wr)
    hi = max(-1, min(h, block_n))
    lo = min(d - wl, block_n) if wl >= 0 and wl <= d + 1 else -1
    for v in (key0, d, h, hi, lo):  # every intermediate fits the kernel's int32
        assert -(2**31) <= v <= INT32_MAX
    if wr >= 0 and wr <= block_n - d:
        assert -(2**31) <= d + wr <= INT32_MAX
    return lo, hi


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
