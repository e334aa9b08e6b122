"""How a ``sparse_mask`` reaches the CUDA kernel (pure Python; no GPU objects).

Parametric masks (causal, window, causal-window) are diagonal bands: they fold into the
kernel's (left, right) window, cost zero bytes and have their tiles classed by formula.
Block masks (bitset, BCSR, dynamic, mixed) reach the kernel as per-row block lists at the
mask's own block size, which must be a multiple of the kernel tile; each listed block expands
to whole kernel tiles and unlisted blocks are never touched. A ``MixedMask``'s partial blocks
also carry their element bits. An ``&`` of two (immutable) block masks reaches the kernel as
one exact ``MixedMask`` built from their blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .masks import DynamicMask, IntersectionMask, MixedMask, SparseMask
from .spec import KernelSpec


def bound_min(a: int, b: int) -> int:
    """The tighter of two window bounds, where -1 means unbounded."""
    if a < 0:
        return b
    return a if b < 0 else min(a, b)


def diagonal_window(mask: SparseMask | None) -> tuple[int, int] | None:
    """The (left, right) window a parametric mask (or an intersection of them) keeps, or None
    when the mask is not of that form. Keeping ``lo <= d <= hi`` with d = i + Sk - Sq - j is
    the window left = hi, right = -lo (lo <= 0 <= hi for every parametric class)."""
    if mask is None:
        return (-1, -1)
    if isinstance(mask, IntersectionMask):
        a, b = diagonal_window(mask.first), diagonal_window(mask.second)
        if a is None or b is None:
            return None
        return (bound_min(a[0], b[0]), bound_min(a[1], b[1]))
    bounds = getattr(mask, "diag_bounds", None)
    if bounds is None or mask.batch_heads != (1, 1):
        return None
    lo, hi = bounds()
    if (lo is not None and lo > 0) or (hi is not None and hi < 0):
        return None
    return (-1 if hi is None else hi, -1 if lo is None else -lo)


def split_sparse(mask: SparseMask) -> tuple[tuple[int, int], SparseMask | None]:
    """(window, block mask or None) whose intersection is ``mask``. The kernel reads one set
    of block lists, so an ``&`` of two block masks becomes one exact ``MixedMask`` (built from
    the blocks, cached on the intersection: the operands are immutable). A ``DynamicMask``'s
    buffers must be read in place, so it cannot be merged: NotImplementedError."""
    win = diagonal_window(mask)
    if win is not None:
        return win, None
    if isinstance(mask, IntersectionMask):
        wa, ba = split_sparse(mask.first)
        wb, bb = split_sparse(mask.second)
        window = (bound_min(wa[0], wb[0]), bound_min(wa[1], wb[1]))
        if ba is None or bb is None:
            return window, ba if ba is not None else bb
        if isinstance(ba, DynamicMask) or isinstance(bb, DynamicMask):
            raise NotImplementedError(
                "the CUDA backend reads a DynamicMask's buffers in place, so it can be "
                "intersected ('&') with parametric masks only, not with another block mask; "
                "update the DynamicMask with the intersected pattern, or use "
                "backend='reference'")
        merged = mask.__dict__.get("_dmattn_merged_blocks")
        if merged is None:
            both = ba & bb
            block = tuple(max(x, y) for x, y in zip(ba.block_size, bb.block_size, strict=True))
            merged = MixedMask.from_mask(both, block)
            mask.__dict__["_dmattn_merged_blocks"] = merged
        return window, merged
    return (-1, -1), mask


@dataclass(frozen=True)
class SparseArrays:
    """The block lists (and Mixed element data) as arrays of one module, all int32/uint32."""
    full_count: Any
    full_idx: Any
    partial_count: Any
    partial_idx: Any
    partial_slot: Any | None
    partial_bits: Any | None
    block_m: int
    block_n: int


def check_block_fits(block_size: tuple[int, int], spec: KernelSpec) -> None:
    bm, bn = block_size
    if bm % spec.block_m or bn % spec.block_n:
        raise ValueError(
            f"sparse_mask block_size {tuple(block_size)} must be a multiple of the kernel tile "
            f"({spec.block_m}, {spec.block_n}) for head dim {spec.head_dim}; build the mask "
            f"with block_size=({spec.block_m * max(1, bm // spec.block_m)}, "
            f"{spec.block_n * max(1, bn // spec.block_n)}) or use backend='reference'")


_LIST_FIELDS = ("full_count", "full_idx", "partial_count", "partial_idx")
_MIXED_FIELDS = ("partial_slot", "partial_bits")


def arrays_to_list(arrays: SparseArrays) -> list[Any]:
    """The arrays in a fixed order (a MixedMask's two extra ones last), e.g. for an op's
    ``Tensor[]`` argument; ``arrays_from_list`` inverts it."""
    names = _LIST_FIELDS + (_MIXED_FIELDS if arrays.partial_slot is not None else ())
    return [getattr(arrays, n) for n in names]


def arrays_from_list(items: list[Any], block_m: int, block_n: int) -> SparseArrays:
    if len(items) not in (4, 6):
        raise ValueError(f"block-sparse arrays: expected 4 or 6, got {len(items)}")
    extra = list(items[4:]) or [None, None]
    return SparseArrays(*items[:4], *extra, block_m=block_m, block_n=block_n)


def host_arrays(mask: SparseMask) -> SparseArrays:
    """The mask's lists at its own block size, in the module its data lives in."""
    bm, bn = mask.block_size
    lists = mask.device_lists() if isinstance(mask, DynamicMask) else mask.block_lists(bm, bn)
    slot = bits = None
    if isinstance(mask, MixedMask):
        slot, bits = mask.partial_slot, mask.partial_bits
    return SparseArrays(lists.full_count, lists.full_idx, lists.partial_count, lists.partial_idx,
                        slot, bits, bm, bn)


def sparse_fields(arrays: SparseArrays) -> dict[str, int]:
    """The integer FwdParams fields describing ``arrays`` (pointers are set by the launcher)."""
    bm_dim, hm_dim, nrb = (int(n) for n in arrays.full_count.shape)
    ncb = int(arrays.partial_slot.shape[-1]) if arrays.partial_slot is not None else 0
    return {
        "sp_batches": bm_dim, "sp_heads": hm_dim, "sp_row_blocks": nrb, "sp_col_blocks": ncb,
        "sp_full_width": int(arrays.full_idx.shape[-1]),
        "sp_partial_width": int(arrays.partial_idx.shape[-1]),
        "sp_block_m": arrays.block_m, "sp_block_n": arrays.block_n,
    }
