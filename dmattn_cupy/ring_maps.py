"""Tensor maps of the sm_90a ring decode (sm90/fwd_decode_ring.cu): K and V read as TMA boxes.

A ring stage holds a K (and a V) tile as ``parts`` blocks of 64 rows x (part columns + 8)
16-bit elements: every row padded by 16 bytes, so the consumers' ldmatrix rows fall in
distinct banks. A box of (part columns + 8) columns over a map whose dim 0 is the true
head_dim writes exactly that block: TMA zero-fills the columns past head_dim (out of bounds),
so the padding is written by the same copy. One box per part and per 64 keys: 2 TMA
instructions per tile at d <= 192 (instead of 128 one-row bulk copies).

Maps (dim 0 first): dense ``(B, S, Hk, D)`` -> ``(D, S, Hk, B)``; packed varlen
``(total_k, Hk, D)`` -> ``(D, total_k, Hk, 1)`` (the kernel adds the sequence's first row);
a paged pool ``(num_pages, page_size, Hk, D)`` -> ``(D, page_size, Hk, num_pages)``. Box rows:
64, or for a pool gcd(page_size, 64) (a box never crosses a page; 16 <= rows since pages are
multiples of 16). Rows past the tensor come out as zeros; rows past a sequence inside the
tensor are whatever is stored there, which the kernel's consumers overwrite in V (P = 0 there,
but 0 x NaN is not 0).
"""

from __future__ import annotations

import math

import numpy as np

from .arrays import ArrayInfo
from .families import padded_head_dim, ring_parts
from .tensor_map import MAP_BYTES, TensorMapError, TensorMapSpec, dim_stride, encode, record_slots
from .validate import Problem

TILE_ROWS = 64           # keys per ring tile (fwd_decode_ring.cu kBlockN)
MAP_NAMES = ("k", "v")
BOX_ROWS_OFFSET = 2 * MAP_BYTES
# RingArgs: two 128-byte maps (k, v), the box rows (int32), padding to a 64-byte multiple.
ARGS_DTYPE = np.dtype({"names": ["maps", "box_rows"],
                       "formats": [(np.uint8, MAP_BYTES * len(MAP_NAMES)), np.int32],
                       "offsets": [0, BOX_ROWS_OFFSET], "itemsize": 320})


def box_rows(page_size: int) -> int:
    """Rows of one box: a whole tile, or for a paged pool the largest power of two dividing
    both the page size and the tile (gcd(page_size, 64))."""
    if page_size < 0:
        raise ValueError(f"page_size must be >= 0, got {page_size}")
    return TILE_ROWS if page_size == 0 else math.gcd(page_size, TILE_ROWS)


def kv_map(info: ArrayInfo, padded_head_dim: int, page_size: int = 0,
           varlen: bool = False) -> TensorMapSpec:
    """The map over one of K/V (16-bit elements, head dim contiguous); TensorMapError when TMA
    cannot read the layout (a broadcast or negative stride, misaligned strides)."""
    _, cols = ring_parts(padded_head_dim)
    box = (cols + 8, box_rows(page_size), 1, 1)
    if varlen and not page_size:
        if info.ndim != 3:
            raise TensorMapError(f"packed varlen K/V must be 3-D (total_k, kv_heads, head_dim), "
                                 f"got shape {info.shape}")
        t, h, d = info.shape
        st, sh, sd = info.strides
        dims, strides = (d, t, h, 1), (dim_stride(t, st, 2), dim_stride(h, sh, 2), 16)
    else:
        if info.ndim != 4:
            raise TensorMapError(f"K/V must be 4-D (batch or pages, rows, kv_heads, head_dim), "
                                 f"got shape {info.shape}")
        b, s, h, d = info.shape
        sb, ss, sh, sd = info.strides
        if page_size and s != page_size:
            raise TensorMapError(f"a paged pool of {s} rows per page, page_size {page_size}")
        dims = (d, s, h, b)
        strides = (dim_stride(s, ss, 2), dim_stride(h, sh, 2), dim_stride(b, sb, 2))
    if sd != 1 and d > 1:
        raise TensorMapError(f"head dim must be contiguous, got stride {sd}")
    if max(dims[1:]) >= 1 << 31:
        raise TensorMapError(f"dims {dims} exceed the int32 box coordinates")
    spec = TensorMapSpec(2, dims, strides, box)
    spec.check()
    return spec


def ring_maps(pb: Problem, page_size: int = 0) -> dict[str, TensorMapSpec]:
    """The K and V maps of a decode problem (``page_size`` > 0: K/V are a paged pool)."""
    hd = padded_head_dim(pb.head_dim)
    return {"k": kv_map(pb.k, hd, page_size, pb.varlen),
            "v": kv_map(pb.v, hd, page_size, pb.varlen)}


def build_args(pb: Problem, page_size: int = 0) -> np.ndarray:
    """The one-element RingArgs record (maps encoded by the driver)."""
    maps = ring_maps(pb, page_size)
    rec = np.zeros(1, dtype=ARGS_DTYPE)
    raw = b"".join(encode(maps[n], getattr(pb, n).ptr) for n in MAP_NAMES)
    rec["maps"][0] = np.frombuffer(raw, dtype=np.uint8)
    rec["box_rows"] = box_rows(page_size)
    return rec


def address_slots(pb: Problem, page_size: int = 0) -> tuple[tuple[str, int], ...] | None:
    """(operand, byte offset in RingArgs) of each map's global address, so that a cached plan
    patches new K/V pointers; None when the driver's map layout does not allow it."""
    return record_slots(dict(ring_maps(pb, page_size)), MAP_NAMES)
