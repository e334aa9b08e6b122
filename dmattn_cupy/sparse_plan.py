"""How a ``sparse_mask`` reaches the CUDA kernels: the one place for sparse routing.

Parametric masks (causal, window, causal-window) are diagonal bands: they fold into the
kernel's (left, right) window, cost zero bytes and have their tiles classed by formula.
Block masks (bitset, BCSR, dynamic, mixed) reach the kernel as per-row block lists at the
mask's own block size, which must be a multiple of the kernel tile; each listed block expands
to whole kernel tiles and unlisted blocks are never touched. A ``MixedMask``'s partial blocks
also carry their element bits. An ``&`` of two (immutable) block masks reaches the kernel as
one exact ``MixedMask`` built from their blocks. A block mask whose blocks do not tile the
backward kernels reaches them as its dense form ANDed into ``attn_mask`` (``fold_backward``).
Device uploads of immutable masks are cached on the mask (through the ``arrays`` adapter).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import arrays
from .arrays import array_kind, describe
from .device import PRESETS, DeviceProps
from .families import padded_head_dim, sparse_supported
from .masks import DynamicMask, IntersectionMask, MixedMask, SparseMask
from .select import backward as select_backward
from .spec import KernelSpec
from .validate import Problem


def bound_min(a: int, b: int) -> int:
    """The tighter of two window bounds, where -1 means unbounded."""
    if a < 0:
        return b
    return a if b < 0 else min(a, b)


def tighter_window(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """The (left, right) window both ``a`` and ``b`` keep (bound_min per side)."""
    return bound_min(a[0], b[0]), bound_min(a[1], b[1])


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
        return tighter_window(a, b)
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
        window = tighter_window(wa, wb)
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
            if ba is mask.first and bb is mask.second:  # exactly two block masks: merge them
                block = tuple(max(x, y) for x, y in zip(ba.block_size, bb.block_size,
                                                        strict=True))
                merged = MixedMask.from_mask(mask, block)
            else:  # merged (and cached) on the intersection of the two block parts
                merged = split_sparse(ba & bb)[1]
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


def block_size_of(sparse: SparseMask | SparseArrays | None) -> bool | tuple[int, int]:
    """What the family selection is told of block lists: False (none) or their
    (block_m, block_n), which decides whether a family's tiles fit them."""
    if sparse is None:
        return False
    if isinstance(sparse, SparseArrays):
        return (sparse.block_m, sparse.block_n)
    bm, bn = sparse.block_size
    return (int(bm), int(bn))


def check_block_fits(block_size: tuple[int, int], spec: KernelSpec) -> None:
    bm, bn = block_size
    if bm % spec.block_m or bn % spec.block_n:
        raise ValueError(
            f"sparse_mask block_size {tuple(block_size)} must be a multiple of the kernel tile "
            f"({spec.block_m}, {spec.block_n}) for head dim {spec.head_dim}; build the mask "
            f"with block_size=({spec.block_m * max(1, bm // spec.block_m)}, "
            f"{spec.block_n * max(1, bn // spec.block_n)}) or use backend='reference'")


# fwd_sm90 addresses a MixedMask's element bits by 32-bit word offsets (sm90/fwd.cu: the
# stage's info word, an int32)
MAX_SM90_PARTIAL_WORDS = 2**31 - 1


def check_partial_words(arrays: SparseArrays, spec: KernelSpec) -> None:
    """A ValueError when fwd_sm90 could not address the lists' element bits (more than 2^31 - 1
    words, i.e. ~6.9e10 elements of partial blocks) instead of an overflowed offset."""
    if spec.family != "fwd_sm90" or arrays.partial_bits is None:
        return
    words = math.prod(int(n) for n in arrays.partial_bits.shape)   # any array module
    if words > MAX_SM90_PARTIAL_WORDS:
        raise ValueError(
            f"sparse_mask: a MixedMask whose partial blocks hold {words * 32} elements "
            f"({words} words of bits) is more than the Hopper forward addresses "
            f"({MAX_SM90_PARTIAL_WORDS} words); use larger full/empty blocks, split the batch, "
            "or DMATTN_FWD_FAMILY=fwd_mma")


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


def fold_window(pb: Problem, sparse_mask: SparseMask | None) -> tuple[Problem, SparseMask | None]:
    """Parametric masks become the kernel's window (zero bytes, tiles classed by formula);
    returns the problem with the window folded in and the block mask left, or None."""
    if sparse_mask is None:
        return pb, None
    win, block = split_sparse(sparse_mask)
    return dataclasses.replace(pb, window=tighter_window(pb.window, win)), block


def forward_takes_lists(head_dim: int, has_mask: bool) -> bool:
    """Whether the CUDA forward walks a block mask's lists at ``head_dim`` (beside an attn_mask
    with ``has_mask``); else the mask's dense form is ANDed into attn_mask
    (``dense_block_mask``), with a gradient (``lists_fit``) or without."""
    return sparse_supported(padded_head_dim(head_dim), has_mask, False)


def fits_backward(block_size: tuple[int, int], dtype: str, head_dim: int,
                  dev: DeviceProps = PRESETS["sm_80"]) -> bool:
    """Whether a block mask of ``block_size`` tiles the backward kernels' (block_m, block_n)
    (otherwise the backward reads its dense form as ``attn_mask``). The masked dK/dV tile is
    the same on every device."""
    dkdv = select_backward(dtype, head_dim, True, False, False, False, True, dev)[1]
    return block_size[0] % dkdv.block_m == 0 and block_size[1] % dkdv.block_n == 0


def _device_array(arr: Any, like: Any, dtype: str) -> Any:
    """``arr`` as a contiguous device array beside ``like`` (GPU arrays in place). An empty
    array (no partial blocks: CuPy's boolean indexing may give it zero strides) is never read
    and counts as contiguous."""
    if arr is None:
        return None
    if isinstance(arr, np.ndarray):
        return arrays.upload(arr, like, dtype)
    info = describe(arr)
    contiguous = 0 in info.shape or all(
        st == int(np.prod(info.shape[i + 1:])) for i, st in enumerate(info.strides)
        if info.shape[i] > 1)
    if info.dtype != dtype or not contiguous:
        raise ValueError(f"sparse-mask buffers must be contiguous {dtype}, got {info.dtype} "
                         f"with strides {info.strides}")
    return arr


def _kept_on_mask(mask: SparseMask, attr: str, like: Any, make: Callable[[], Any],
                  fits: Callable[[Any], bool] = lambda value: True) -> Any:
    """``make()``, an upload of ``mask``'s data for ``like``'s library and device: an immutable
    mask keeps it in its ``attr`` dict per (library, device) where ``fits(it)`` and torch did
    not place it in a private pool (``arrays.in_private_pool``); a DynamicMask's is made at
    every call (its buffers change in place)."""
    if isinstance(mask, DynamicMask):
        return make()
    cache = mask.__dict__.setdefault(attr, {})
    key = _kept_key(like)
    value = cache.get(key)
    if value is None:
        value = make()
        if fits(value) and not upload_in_private_pool(value):
            cache[key] = value
    return value


def _kept_key(like: Any) -> tuple:
    return array_kind(like), describe(like).device


def upload_in_private_pool(value: Any) -> bool:
    """Whether an upload (an array, or a SparseArrays of them) sits in a private pool of
    torch's allocator (``arrays.in_private_pool``): then nothing may keep it past its call."""
    parts = ([getattr(value, f.name) for f in dataclasses.fields(value)]
             if isinstance(value, SparseArrays) else [value])
    return arrays.in_private_pool(*(p for p in parts if not isinstance(p, int)))


def device_lists(mask: SparseMask, like: Any) -> SparseArrays:
    """The mask's lists on the device of ``like``; uploads of immutable masks are cached on
    the mask, a DynamicMask's live buffers are read in place at every call."""
    def upload() -> SparseArrays:
        host = host_arrays(mask)
        return SparseArrays(
            *(_device_array(getattr(host, f), like, "int32")
              for f in ("full_count", "full_idx", "partial_count", "partial_idx",
                        "partial_slot")),
            partial_bits=_device_array(host.partial_bits, like, "uint32"),
            block_m=host.block_m, block_n=host.block_n)
    return _kept_on_mask(mask, _LISTS_ATTR, like, upload)


def lists_kept(mask: SparseMask, like: Any, lists: SparseArrays) -> bool:
    """Whether ``lists`` (from ``device_lists``) are the upload kept on the immutable ``mask``
    for ``like``'s library and device: only then may what holds them be kept past the call."""
    return mask.__dict__.get(_LISTS_ATTR, {}).get(_kept_key(like)) is lists


_LISTS_ATTR = "_dmattn_device_lists"


# The dense fallback's device form of an immutable mask is kept on the mask up to this size
# (its bytes on the device for the mask's lifetime); a larger one is uploaded per call.
DENSE_CACHE_BYTES = 64 << 20


def dense_block_mask(sparse_mask: SparseMask, attn_mask: Any, like: Any) -> Any:
    """The dense fallback: a block mask's exact elements as a bool array beside ``like``,
    ANDed with ``attn_mask`` (the backward reads it like any mask; all-false tiles are
    skipped). An immutable mask's upload of at most ``DENSE_CACHE_BYTES`` is made once per
    (library, device) and kept on the mask; a DynamicMask's is made from its buffers per
    call."""
    def upload() -> Any:
        dense = np.array(sparse_mask.to_dense(), dtype=bool)  # a writable copy
        return arrays.upload(dense[None, None] if dense.ndim == 2 else dense, like, "bool")

    m = _kept_on_mask(sparse_mask, "_dmattn_dense", like, upload,
                      lambda m: math.prod(describe(m).shape) <= DENSE_CACHE_BYTES)
    return m if attn_mask is None else (m & attn_mask)


def fold_backward(sparse_mask: SparseMask | None, pb: Problem, attn_mask: Any,
                  like: Any) -> tuple[Problem, Any, SparseArrays | None]:
    """Parametric masks fold into the window. A block mask whose blocks tile the backward
    kernels travels as its block lists (unlisted blocks are never touched); any other block
    mask becomes its dense form ANDed into ``attn_mask``. Returns (problem with the window
    folded, the mask to use (None when unchanged), the block lists or None)."""
    pb, block = fold_window(pb, sparse_mask)
    if block is None:
        return pb, None, None
    if fits_backward(block.block_size, pb.dtype, pb.head_dim):
        return pb, None, device_lists(block, like)
    return pb, dense_block_mask(block, attn_mask, like), None


def lists_fit(block_size: tuple[int, int], dtype: str, head_dim: int, has_mask: bool) -> bool:
    """Whether a block mask of ``block_size`` reaches the CUDA forward and backward as its
    lists (else as its dense form in ``attn_mask``); False for a head dim or dtype no
    kernel takes (validation then names it)."""
    try:
        return forward_takes_lists(head_dim, has_mask) and \
            fits_backward(block_size, dtype, head_dim)
    except ValueError:
        return False


def autograd_lists(block: SparseMask, attn_mask: Any, query: Any, on_cuda: bool,
                   head_dim: int, dtype: str) -> tuple[SparseArrays | None, Any]:
    """For a block mask on the autograd path: (its lists on the query's device, attn_mask)
    when its blocks tile the forward and backward kernels on CUDA, else (None, its dense form
    ANDed into attn_mask)."""
    if on_cuda and lists_fit(block.block_size, dtype, head_dim, attn_mask is not None):
        return device_lists(block, query), attn_mask
    return None, dense_block_mask(block, attn_mask, query)
