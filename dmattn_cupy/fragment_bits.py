"""A MixedMask's element bits in the Hopper forward's fragment order (``sp_partial_frag``).

The portable kernels read ``partial_bits`` row by row (bit ``k % 32`` of word ``k // 32`` of a
block's row-major elements). fwd_sm90's consumer threads instead hold S's accumulator
fragments: thread ``i`` (0..127) of a consumer warpgroup, ``w = i // 32``, ``g = i % 32 // 4``,
``t = i % 4``, owns rows ``16w + g`` and ``16w + g + 8`` of its 64 rows and keys
``8j + 2t + e`` (e = 0, 1) of each 64 keys. This copy stores exactly those bits in one word per
thread and 64 keys, so that a tile's bits are one load per thread and no gather:

- a block (``bm x bn``, bm % 64 == 0, bn % 64 == 0) is cut into units of 64 rows x ``U`` keys,
  ``U = 128`` when bn % 128 == 0 else 64, stored in row-major unit order (``2 * U`` words each);
- in a unit, thread ``i`` owns words ``(U // 64) * i + s``, one per 64-key half ``s``;
- bit ``2j + e`` of a word: key ``64s + 8j + 2t + e`` of row ``16w + g``; bit ``16 + 2j + e``:
  the same key of row ``16w + g + 8`` (j = 0..7).

A 128-key tile reads both halves of its unit by one 8-byte load, a 64-key tile one word. The
kernel's side of the arithmetic is ``listed_tile_word`` / ``listed_thread_word`` in sm90/fwd.cu
(tests/cpu/test_sm90_listed_bits.py ties both to this module).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def unit_keys(block_n: int) -> int:
    """``U``: the keys of one unit (128 when the block's columns allow it, else 64)."""
    return 128 if block_n % 128 == 0 else 64


def fragment_words(partial_bits: Any, block_m: int, block_n: int, xp: Any = np) -> Any:
    """``(P, bm*bn/32)`` uint32 row-major element bits -> the same bits in fragment order
    (same shape and module; see the module docstring)."""
    bm, bn = block_m, block_n
    if bm % 64 or bn % 64:
        raise ValueError(f"fragment order needs blocks of multiples of 64, got ({bm}, {bn})")
    u = unit_keys(bn)
    halves = u // 64
    n = partial_bits.shape[0]
    # rows 64 ur + 16 w + 8 h + g; a row's words (cu, s, ab): keys 64 (cu * halves + s) + 32 ab
    words = xp.ascontiguousarray(partial_bits).reshape(n, bm // 64, 4, 2, 8, bn // u, halves, 2)
    per_t = []
    for t in range(4):
        # keys 8j + 2t + e of each 32-key word as bits 2j + e of a byte (j = 0..3): the fields
        # 2t, 2t + 1 of each byte, moved together by one multiply (bits 24..31 of the product)
        f = ((words >> xp.uint32(2 * t)) & xp.uint32(0x03030303)) * xp.uint32(0x01041040)
        f = (f >> xp.uint32(24)) & xp.uint32(0xFF)
        half = f[..., 0] | (f[..., 1] << xp.uint32(8))         # (n, ur, w, h, g, cu, s)
        per_t.append(half[:, :, :, 0] | (half[:, :, :, 1] << xp.uint32(16)))  # rows g, g + 8
    frag = xp.stack(per_t, axis=4)                              # (n, ur, w, g, t, cu, s)
    frag = frag.transpose(0, 1, 5, 2, 3, 4, 6)                  # (n, ur, cu, w, g, t, s)
    return xp.ascontiguousarray(frag.reshape(n, bm * bn // 32)).astype(xp.uint32, copy=False)
