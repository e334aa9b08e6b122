"""FLOP and byte rules, and the pure helpers that count allowed elements and visited tiles of
the masks the cases use (no torch)."""

from __future__ import annotations

import random
from collections.abc import Sequence

BWD_FACTOR = 3.5          # fwd + bwd FLOPs = forward FLOPs * 3.5 (bwd = 2.5 x fwd)

FLOP_CONVENTION = (
    "FLOPs: forward = 4*B*H*Sq*Sk*D (FlashAttention convention), halved for causal; "
    "fwd+bwd = forward*3.5 (bwd = 2.5x fwd); varlen = sum over sequences. Sparse cases: "
    "'TFLOP/s' counts only allowed (unmasked) elements, 'tile TFLOP/s' counts every "
    "visited block tile (block-sparse kernels) or every tile (SDPA, dense masks). "
    "decode GB/s = bytes of K+V+mask+bias read / time (same bytes for every row); "
    "'%copy' = that GB/s over the measured device-to-device copy bandwidth. "
    "Host cases: 'host us' = wall time per call of back-to-back calls with one synchronize "
    "at the end (median of 5 runs)."
)
RATIO_CONVENTION = (
    "dmattn/x = dmattn throughput / row throughput (= row ms / dmattn ms for the same work); "
    ">1 means dmattn is faster (host cases: row us / dmattn us)."
)


def attn_fwd_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, headdim: int,
                   causal: bool = False) -> float:
    """Forward FLOPs, FlashAttention convention: ``4*B*H*Sq*Sk*D``, halved for causal."""
    f = 4.0 * batch * heads * seqlen_q * seqlen_k * headdim
    return f / 2 if causal else f


def fwd_bwd_flops(fwd_flops: float) -> float:
    """Forward + backward FLOPs: forward * 3.5 (the backward costs 2.5 forwards)."""
    return fwd_flops * BWD_FACTOR


def varlen_fwd_flops(lens_q: Sequence[int], lens_k: Sequence[int], heads: int, headdim: int,
                     causal: bool = False) -> float:
    """Sum of the per-sequence forward FLOPs."""
    return sum(attn_fwd_flops(1, heads, lq, lk, headdim, causal) for lq, lk in
               zip(lens_q, lens_k, strict=True))


def elements_flops(allowed: int, batch: int, heads: int, headdim: int) -> float:
    """FLOPs of ``allowed`` (query, key) pairs per (batch, head): 4*D each (QK^T and PV)."""
    return 4.0 * allowed * batch * heads * headdim


def visited_tile_flops(n_tiles: int, block_m: int, block_n: int, batch: int, heads: int,
                       headdim: int) -> float:
    """FLOPs of ``n_tiles`` full ``block_m x block_n`` tiles per (batch, head)."""
    return 4.0 * n_tiles * block_m * block_n * batch * heads * headdim


def causal_window_allowed(seqlen_q: int, seqlen_k: int, window: int) -> int:
    """Number of (i, j) with ``0 <= i + Sk - Sq - j < window`` (CausalWindowMask)."""
    off = seqlen_k - seqlen_q
    total = 0
    for i in range(seqlen_q):
        c = i + off
        lo = max(c - window + 1, 0)
        hi = min(c, seqlen_k - 1)
        if hi >= lo:
            total += hi - lo + 1
    return total


def causal_window_tiles(seqlen_q: int, seqlen_k: int, window: int, block_m: int,
                        block_n: int) -> int:
    """Number of ``block_m x block_n`` tiles holding at least one CausalWindowMask element."""
    off = seqlen_k - seqlen_q
    n = 0
    for r0 in range(0, seqlen_q, block_m):
        r1 = min(r0 + block_m, seqlen_q)
        for c0 in range(0, seqlen_k, block_n):
            c1 = min(c0 + block_n, seqlen_k)
            dmin = r0 + off - (c1 - 1)
            dmax = r1 - 1 + off - c0
            if max(dmin, 0) <= min(dmax, window - 1):
                n += 1
    return n


def block_table_allowed(table: Sequence[Sequence[bool]], seqlen_q: int, seqlen_k: int,
                        block_m: int, block_n: int) -> int:
    """Elements covered by the kept blocks of a block table (edge blocks clipped)."""
    total = 0
    for bi, row in enumerate(table):
        rows = min(block_m, seqlen_q - bi * block_m)
        for bj, keep in enumerate(row):
            if keep:
                total += rows * min(block_n, seqlen_k - bj * block_n)
    return total


def random_block_table(n_rows: int, n_cols: int, density: float, seed: int,
                       diagonal: bool = True) -> list[list[bool]]:
    """Random block table (fixed seed); with ``diagonal`` every block row keeps its diagonal
    block so that no query row is fully masked (SDPA would return NaN there)."""
    rng = random.Random(seed)
    table = [[rng.random() < density for _ in range(n_cols)] for _ in range(n_rows)]
    if diagonal:
        for i in range(n_rows):
            j = min(n_cols - 1, (i * n_cols) // max(n_rows, 1))
            table[i][j] = True
    return table


def varlen_lengths(n: int, lo: int, hi: int, seed: int) -> list[int]:
    """``n`` sequence lengths drawn uniformly from ``[lo, hi]`` with a fixed seed; the first
    two are pinned to ``lo`` and ``hi`` so the range is always covered."""
    rng = random.Random(seed)
    lens = [rng.randint(lo, hi) for _ in range(n)]
    if n >= 1:
        lens[0] = hi
    if n >= 2:
        lens[1] = lo
    return lens


def tflops(flops: float | None, ms: float | None) -> float | None:
    if not flops or not ms:
        return None
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float | None, ms: float | None) -> float | None:
    if not nbytes or not ms:
        return None
    return nbytes / (ms * 1e-3) / 1e9


