"""Sparse attention masks: which (query tile, key tile) pairs the kernel visits, and how.

Every mask states its exact element semantics through ``to_dense()``: element ``(i, j)``
(query row ``i``, key column ``j``) is kept or not. For a kernel tile ``(block_m, block_n)``
each tile is one of three classes, computed from those semantics over the tile's in-range
elements only (a tile at the ragged edge of ``Sq``/``Sk`` is judged on what lies inside):

- empty (0): nothing kept; the kernel never touches it;
- partial (1): some kept; element masks applied;
- full (2): every in-range element kept; no per-element work.

``block_lists(block_m, block_n)`` turns the classes into what the kernel consumes: per
query-tile row, the ascending key-tile indices of its partial and of its full tiles.

Parametric masks (``CausalMask``, ``WindowMask``, ``CausalWindowMask``) hold no arrays: the
kernel evaluates ``lo <= d <= hi`` on ``d = i + Sk - Sq - j`` with ``diag_bounds()``.
Block-granular masks (``BlockBitsetMask``, ``BCSRMask``, ``DynamicMask``) keep whole mask
blocks; ``MixedMask`` is exact, with bit-packed element masks for its partial blocks.

This module is pure NumPy at import time. CuPy is imported only when an input is a CuPy
array (or a CUDA torch tensor, viewed as one without a copy); constructors, ``from_dense_mask``
and ``DynamicMask.update`` then run on the GPU with the same code, and only block-level arrays
(one entry per mask block) ever reach the host. Queries (``to_dense``, ``block_map``,
``block_lists``) always answer with NumPy arrays.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BCSRMask",
    "BlockBitsetMask",
    "BlockLists",
    "CausalMask",
    "CausalWindowMask",
    "DynamicMask",
    "IntersectionMask",
    "MixedMask",
    "SparseMask",
    "WindowMask",
    "calculate_memory_savings",
    "estimate_speedup",
]

Array = Any  # numpy.ndarray or cupy.ndarray

EMPTY, PARTIAL, FULL = 0, 1, 2

# Elements evaluated per chunk when tiles are classified element by element.
_CHUNK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------- helpers


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _positive_int(name: str, value: object) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


_MAX_LENGTH = 2**31 - 1  # the kernels keep lengths and block counts in int32 fields


def _length(name: str, value: object) -> int:
    n = _positive_int(name, value)
    if n > _MAX_LENGTH:
        raise ValueError(f"{name} must be <= {_MAX_LENGTH} (2**31 - 1, the kernels' int32 "
                         f"fields), got {n}")
    return n


def _block_pair(value: object, name: str = "block_size") -> tuple[int, int]:
    msg = f"{name} must be a pair of positive ints, got {value!r}"
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_int, value))):
        raise TypeError(msg)
    if value[0] < 1 or value[1] < 1:
        raise ValueError(msg)
    return int(value[0]), int(value[1])


def _native(x: object) -> object:
    """A torch tensor as the array it is: a CuPy view of a CUDA tensor (no copy, through
    ``__cuda_array_interface__``), a NumPy view of a CPU one. Anything else unchanged."""
    if type(x).__module__.split(".")[0] != "torch" or not hasattr(x, "detach"):
        return x
    t = x.detach()
    if t.is_cuda:
        import cupy

        return cupy.asarray(t)
    return t.numpy()


def _array_module(x: object, name: str) -> Any:
    """numpy for a NumPy array, cupy for a CuPy array (imported only then); else TypeError."""
    if isinstance(x, np.ndarray):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.get_array_module(x)
    raise TypeError(
        f"{name} must be a numpy.ndarray, cupy.ndarray or torch.Tensor, got {type(x).__name__}"
    )


def _to_host(x: Array) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.get()


def _bool_array(x: object, name: str) -> Any:
    """Checks ``x`` is a 2-D or 4-D bool array with no zero-sized dim; returns its module."""
    xp = _array_module(x, name)
    if x.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array, got dtype {x.dtype}")
    if x.ndim not in (2, 4):
        raise ValueError(f"{name} must be 2-D or 4-D (B|1, H|1, ., .), got shape {x.shape}")
    if 0 in x.shape:
        raise ValueError(f"{name} must have no zero-sized dimension, got shape {x.shape}")
    return xp


def _as4d(x: Array) -> Array:
    return x.reshape((1, 1) + x.shape) if x.ndim == 2 else x


def _leading(x: Array) -> tuple[int, int] | None:
    return (int(x.shape[0]), int(x.shape[1])) if x.ndim == 4 else None


def _overlaps(s: int, mb: int, t: int) -> np.ndarray:
    """In-range overlap lengths of blocks of ``mb`` with tiles of ``t`` over ``[0, s)``:
    ``(ceil(s/mb), ceil(s/t))`` int64."""
    b0 = np.arange(_cdiv(s, mb)) * mb
    t0 = np.arange(_cdiv(s, t)) * t
    lo = np.maximum(b0[:, None], t0[None, :])
    hi = np.minimum(np.minimum(b0 + mb, s)[:, None], np.minimum(t0 + t, s)[None, :])
    return np.maximum(hi - lo, 0)


def _inrange_sizes(sq: int, sk: int, bm: int, bn: int) -> np.ndarray:
    """In-range element count of each tile, ``(ceil(sq/bm), ceil(sk/bn))`` int32."""
    r0 = np.arange(_cdiv(sq, bm)) * bm
    c0 = np.arange(_cdiv(sk, bn)) * bn
    rows = np.minimum(r0 + bm, sq) - r0
    cols = np.minimum(c0 + bn, sk) - c0
    return (rows[:, None] * cols[None, :]).astype(np.int32)


def _classes(kept: Array, size: Array, xp: Any) -> Array:
    """Tile class from kept-element (or kept-block) count and in-range count."""
    return xp.where(kept == 0, EMPTY, xp.where(kept == size, FULL, PARTIAL)).astype(xp.int8)


def _dense_blocks(dense4: Array, bm: int, bn: int, xp: Any) -> Array:
    """``(B, H, Sq, Sk)`` -> ``(B, H, nrb, bm, ncb, bn)``, out-of-range elements False."""
    b, h, sq, sk = dense4.shape
    nrb, ncb = _cdiv(sq, bm), _cdiv(sk, bn)
    if (sq, sk) != (nrb * bm, ncb * bn):
        padded = xp.zeros((b, h, nrb * bm, ncb * bn), dtype=xp.bool_)
        padded[:, :, :sq, :sk] = dense4
        dense4 = padded
    return dense4.reshape(b, h, nrb, bm, ncb, bn)


def _dense_block_any(dense4: Array, bm: int, bn: int, xp: Any) -> Array:
    """``(B, H, nrb, ncb)``: whether each block keeps an element. A block longer than the mask
    along a dim (then the only block there) is reduced over the mask's extent alone: the rest
    would be padding, all False, as large as the block."""
    sq, sk = dense4.shape[-2:]
    return _dense_blocks(dense4, max(1, min(bm, sq)), max(1, min(bn, sk)), xp).any(axis=(3, 5))


def _ascending_indices(sel: Array, width: int, xp: Any) -> Array:
    """The first ``width`` indices where ``sel (..., n)`` is True, ascending, padded with 0."""
    n = sel.shape[-1]
    keys = xp.where(sel, xp.arange(n, dtype=xp.int32), xp.int32(n))
    keys = xp.sort(keys, axis=-1)[..., :width]
    return xp.where(keys < n, keys, 0).astype(xp.int32)


def _pack_words(flat: Array, xp: Any) -> Array:
    """``(P, 32*W)`` bool -> ``(P, W)`` uint32; element k: bit ``k % 32`` of word ``k // 32``."""
    # little bit order, then 4 bytes as one little-endian word; no temporary above a byte
    # per element (a shift-and-sum over uint32 made 32x the words' size). Packed flat: a row
    # is whole bytes, and CuPy's packbits takes no axis
    p, n = flat.shape
    packed = xp.packbits(xp.ascontiguousarray(flat).reshape(-1), bitorder="little")
    return packed.view(xp.uint32).reshape(p, n // 32)


_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _device_packed(dense4: Array, bm: int, bn: int) -> tuple[Array, Array] | None:
    """The first DENSE_PACKERS result for a GPU mask, or None (none registered takes it)."""
    for pack in DENSE_PACKERS:
        packed = pack(dense4, bm, bn)
        if packed is not None:
            return packed
    return None


def _dense_row_words(dense4: Array, bm: int, bn: int, xp: Any) -> Array:
    """``(B, H, Sq, Sk)`` bool -> ``(B, H, nrb*bm, ncb*bn/8)`` uint8 bit rows (bn % 8 == 0):
    element ``c`` of a row is bit ``c % 8`` of byte ``c // 8`` (so bit ``c % 32`` of uint32 word
    ``c // 32``); out-of-range elements 0. One pass over the mask (``packbits``), then work on
    the 8x smaller bit rows only."""
    b, h, sq, sk = dense4.shape
    nrb, ncb = _cdiv(sq, bm), _cdiv(sk, bn)
    sk8 = _cdiv(sk, 8)
    src = xp.ascontiguousarray(dense4)
    if sk % 8:  # rows must start at a byte: pad them (False) to a multiple of 8
        src = xp.zeros((b, h, sq, 8 * sk8), dtype=xp.bool_)
        src[..., :sk] = dense4
    rows = xp.packbits(src.reshape(-1), bitorder="little").reshape(b, h, sq, sk8)
    if (sq, sk8) != (nrb * bm, ncb * bn // 8):
        full = xp.zeros((b, h, nrb * bm, ncb * bn // 8), dtype=xp.uint8)
        full[:, :, :sq, :sk8] = rows
        rows = full
    return rows


def _unpack_words(words: Array, xp: Any) -> Array:
    """Inverse of ``_pack_words``: ``(P, W)`` uint32 -> ``(P, 32*W)`` bool."""
    p, w = words.shape
    as_bytes = xp.ascontiguousarray(words, dtype=xp.uint32).view(xp.uint8).reshape(-1)
    return xp.unpackbits(as_bytes, bitorder="little").view(xp.bool_).reshape(p, 32 * w)


# ----------------------------------------------------------------------------- lists


@dataclass(frozen=True, eq=False)
class BlockLists:
    """Per query-tile row, the key tiles a kernel with tile ``(block_m, block_n)`` visits.

    Arrays are int32 with leading ``(Bm, Hm)`` dims (1, 1 for a 2-D mask). For row block ``r``
    the partial tiles are ``partial_idx[b, h, r, :partial_count[b, h, r]]`` (ascending),
    likewise full ones; entries past the count are 0. The last dim of an idx array is at
    least ``max(1, max count)`` (``DynamicMask`` keeps it at its fixed capacity). Empty
    tiles appear in neither list; a tile is in at most one.
    """

    partial_count: Array  # (Bm, Hm, nrb)
    partial_idx: Array  # (Bm, Hm, nrb, >= max(1, partial_count.max()))
    full_count: Array  # (Bm, Hm, nrb)
    full_idx: Array  # (Bm, Hm, nrb, >= max(1, full_count.max()))
    block_m: int
    block_n: int
    num_row_blocks: int
    num_col_blocks: int


def _lists_from_classes(cls4: np.ndarray, bm: int, bn: int) -> BlockLists:
    lists = {}
    for name, value in (("partial", PARTIAL), ("full", FULL)):
        sel = cls4 == value
        count = sel.sum(axis=-1, dtype=np.int32)
        width = max(1, int(count.max(initial=0)))
        lists[f"{name}_count"] = count
        lists[f"{name}_idx"] = _ascending_indices(sel, width, np)
    return BlockLists(
        **lists, block_m=bm, block_n=bn,
        num_row_blocks=cls4.shape[-2], num_col_blocks=cls4.shape[-1],
    )


# ----------------------------------------------------------------------------- base

# Called with every mask a constructor (or a classmethod builder) has finished building.
# ``mask_tensors`` registers one when torch is installed: it attaches the torch form that
# torch.compile reads (traced code cannot run this module's NumPy/CuPy code). This module
# never imports torch.
BUILD_HOOKS: list[Callable[[SparseMask], None]] = []

# Device packers of ``MixedMask.from_dense_mask``: ``pack(dense4, bm, bn)`` of a 4-D GPU bool
# array gives (kept (B, H, nrb, ncb) int32, words (B*H*nrb*ncb, bm*bn/32) uint32, blocks in
# row-major order) where it takes the array, else None. ``mask_pack`` registers the packing
# kernel's; this module never imports it.
DENSE_PACKERS: list[Callable[[Any, int, int], tuple[Any, Any] | None]] = []


class _MaskType(ABCMeta):
    """Runs ``BUILD_HOOKS`` once a mask's whole ``__init__`` chain has run."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._built(super().__call__(*args, **kwargs))

    def _built(cls, mask: Any) -> Any:
        for hook in BUILD_HOOKS:
            hook(mask)
        return mask


class SparseMask(metaclass=_MaskType):
    """A mask over ``(seqlen_q, seqlen_k)``, optionally with leading ``(B|1, H|1)`` dims."""

    def __init__(
        self,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int],
        batch_heads: tuple[int, int] | None = None,
    ) -> None:
        self.seqlen_q = _length("seqlen_q", seqlen_q)
        self.seqlen_k = _length("seqlen_k", seqlen_k)
        self.block_size = _block_pair(block_size)
        # None: a 2-D mask (to_dense/block_map drop the leading dims)
        self._batch_heads = batch_heads

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, "
            f"block_size={self.block_size}, batch_heads={self.batch_heads})"
        )

    @property
    def batch_heads(self) -> tuple[int, int]:
        """``(Bm, Hm)`` of the leading dims; ``(1, 1)`` for a 2-D mask."""
        return self._batch_heads or (1, 1)

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of array storage the mask holds (0 for parametric masks)."""

    @abstractmethod
    def _elements(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Kept flags at in-range indices ``i``, ``j`` (broadcast): ``(Bm|1, Hm|1, *shape)``."""

    def _tile_error(self, bm: int, bn: int) -> str | None:
        """Why a kernel with tile ``(bm, bn)`` cannot consume this mask; None when it can."""
        return None

    def _tile_classes(self, bm: int, bn: int) -> np.ndarray:
        """Exact tile classes ``(Bm|1, Hm|1, nrb, ncb)`` int8; here element by element."""
        ncb = _cdiv(self.seqlen_k, bn)
        tr, tc = np.divmod(np.arange(_cdiv(self.seqlen_q, bm) * ncb), ncb)
        return self._classify_tiles(tr, tc, bm, bn).reshape(*self.batch_heads, -1, ncb)

    def _classify_tiles(self, tr: np.ndarray, tc: np.ndarray, bm: int, bn: int) -> np.ndarray:
        """Classes ``(Bm, Hm, K)`` of the K tiles ``(tr[k], tc[k])``, from the elements."""
        sq, sk = self.seqlen_q, self.seqlen_k
        out = np.empty((*self.batch_heads, len(tr)), dtype=np.int8)
        step = max(1, _CHUNK_ELEMS // (bm * bn * math.prod(self.batch_heads)))
        for s in range(0, len(tr), step):
            i = tr[s : s + step, None] * bm + np.arange(bm)  # (k, bm)
            j = tc[s : s + step, None] * bn + np.arange(bn)  # (k, bn)
            inr = (i < sq)[:, :, None] & (j < sk)[:, None, :]
            keep = self._elements(
                np.minimum(i, sq - 1)[:, :, None], np.minimum(j, sk - 1)[:, None, :]
            )
            kept = (keep & inr).sum(axis=(-2, -1))
            out[..., s : s + step] = _classes(kept, inr.sum(axis=(-2, -1)), np)
        return out

    def _shape_out(self, x4: np.ndarray) -> np.ndarray:
        return x4 if self._batch_heads else x4[0, 0]

    def to_dense(self) -> np.ndarray:
        """Exact element semantics: bool ``(Sq, Sk)``, or ``(Bm, Hm, Sq, Sk)`` with leading dims."""
        i = np.arange(self.seqlen_q)[:, None]
        j = np.arange(self.seqlen_k)[None, :]
        shape = (*self.batch_heads, self.seqlen_q, self.seqlen_k)
        return self._shape_out(np.ascontiguousarray(np.broadcast_to(self._elements(i, j), shape)))

    def block_map(self) -> np.ndarray:
        """int8 class per block of ``block_size``: 0 empty, 1 partial, 2 full."""
        bm, bn = self.block_size
        cls = self._tile_classes(bm, bn)
        return self._shape_out(np.broadcast_to(cls, (*self.batch_heads, *cls.shape[-2:])).copy())

    @property
    def density(self) -> float:
        """Fraction of blocks (of ``block_size``, over all leading dims) that are not empty."""
        bmap = self.block_map()
        return float(np.count_nonzero(bmap) / bmap.size)

    def block_lists(self, block_m: int, block_n: int) -> BlockLists:
        """The lists a kernel with tile ``(block_m, block_n)`` consumes (NumPy arrays; treat
        them as read-only: those at the mask's own block size are computed once and kept)."""
        bm, bn = _block_pair((block_m, block_n), "kernel tile (block_m, block_n)")
        own = (bm, bn) == self.block_size  # masks other than DynamicMask are immutable
        if own and "_own_block_lists" in self.__dict__:
            return self.__dict__["_own_block_lists"]
        error = self._tile_error(bm, bn)
        if error:
            raise ValueError(error)
        cls = self._tile_classes(bm, bn)
        lists = _lists_from_classes(
            np.broadcast_to(cls, (*self.batch_heads, *cls.shape[-2:])), bm, bn
        )
        if own:
            self.__dict__["_own_block_lists"] = lists
        return lists

    def visited_tiles(self, block_m: int, block_n: int) -> int:
        """Tiles the kernel visits (partial + full), summed over the leading dims."""
        lists = self.block_lists(block_m, block_n)
        return int(lists.partial_count.sum()) + int(lists.full_count.sum())

    def __and__(self, other: object) -> IntersectionMask:
        if not isinstance(other, SparseMask):
            return NotImplemented
        return IntersectionMask(self, other)


# ----------------------------------------------------------------------------- parametric


class _DiagonalMask(SparseMask):
    """Keeps ``lo <= d <= hi`` with ``d = i + Sk - Sq - j``; holds no arrays."""

    @abstractmethod
    def diag_bounds(self) -> tuple[int | None, int | None]:
        """``(lo, hi)``: kept iff ``lo <= d <= hi`` (None: unbounded on that side)."""

    @property
    def diag_offset(self) -> int:
        """``Sk - Sq``: ``d = i + diag_offset - j``."""
        return self.seqlen_k - self.seqlen_q

    @property
    def nbytes(self) -> int:
        return 0

    def _keep_d(self, dmin: np.ndarray, dmax: np.ndarray) -> np.ndarray:
        """True where some d of ``[dmin, dmax]`` is kept (the whole range when equal)."""
        lo, hi = self.diag_bounds()
        keep = np.ones(np.broadcast_shapes(dmin.shape, dmax.shape), dtype=bool)
        if lo is not None:
            keep &= dmax >= lo
        if hi is not None:
            keep &= dmin <= hi
        return keep

    def _elements(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        d = i + self.diag_offset - j
        return self._keep_d(d, d)[None, None]

    def _tile_classes(self, bm: int, bn: int) -> np.ndarray:
        # Over a tile's in-range rectangle d takes every integer value of [dmin, dmax].
        sq, sk = self.seqlen_q, self.seqlen_k
        r0 = np.arange(_cdiv(sq, bm)) * bm
        c0 = np.arange(_cdiv(sk, bn)) * bn
        r1 = np.minimum(r0 + bm, sq) - 1
        c1 = np.minimum(c0 + bn, sk) - 1
        dmin = r0[:, None] + self.diag_offset - c1[None, :]
        dmax = r1[:, None] + self.diag_offset - c0[None, :]
        nonempty = self._keep_d(dmin, dmax)
        lo, hi = self.diag_bounds()
        full = nonempty & (True if lo is None else dmin >= lo)
        full &= True if hi is None else dmax <= hi
        return np.where(full, FULL, np.where(nonempty, PARTIAL, EMPTY)).astype(np.int8)[None, None]


class CausalMask(_DiagonalMask):
    """Keeps ``j <= i + Sk - Sq`` (bottom-right aligned), i.e. ``d >= 0``."""

    def __init__(
        self, seqlen_q: int, seqlen_k: int, block_size: tuple[int, int] = (128, 128)
    ) -> None:
        super().__init__(seqlen_q, seqlen_k, block_size)

    def diag_bounds(self) -> tuple[int | None, int | None]:
        return 0, None


class WindowMask(_DiagonalMask):
    """Int ``W`` keeps ``|d| < W``; a pair ``(left, right)`` keeps ``-right <= d <= left``."""

    def __init__(
        self,
        window_size: int | tuple[int, int],
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int] = (128, 128),
    ) -> None:
        super().__init__(seqlen_q, seqlen_k, block_size)
        msg = (
            "window_size must be a positive int W or a pair (left, right) of non-negative "
            f"ints (use CausalMask or no mask for an unbounded side), got {window_size!r}"
        )
        if _is_int(window_size):
            if window_size < 1:
                raise ValueError(msg)
            self.window_size: int | tuple[int, int] = int(window_size)
        elif isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
            map(_is_int, window_size)
        ):
            if min(window_size) < 0:
                raise ValueError(msg)
            self.window_size = (int(window_size[0]), int(window_size[1]))
        else:
            raise TypeError(msg)

    def diag_bounds(self) -> tuple[int | None, int | None]:
        if isinstance(self.window_size, tuple):
            left, right = self.window_size
            return -right, left
        return -(self.window_size - 1), self.window_size - 1


class CausalWindowMask(_DiagonalMask):
    """Keeps ``0 <= d < W``: causal, and at most ``W`` keys back from the diagonal."""

    def __init__(
        self,
        window_size: int,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int] = (128, 128),
    ) -> None:
        super().__init__(seqlen_q, seqlen_k, block_size)
        self.window_size = _positive_int("window_size", window_size)

    def diag_bounds(self) -> tuple[int | None, int | None]:
        return 0, self.window_size - 1


# ----------------------------------------------------------------------------- block-granular


class _BlockGranularMask(SparseMask):
    """Element ``(i, j)`` kept iff its block ``(i // block_m, j // block_n)`` is kept.

    At its own block size such a mask has no partial blocks: a kept block is full, at the
    ragged edge too (its in-range elements are all kept). A kernel tile must be, per
    dimension, a multiple or a divisor of the mask's block size.
    """

    @abstractmethod
    def _block_bits(self) -> np.ndarray:
        """Kept flag per mask block, ``(Bm, Hm, nrb, ncb)`` bool on the host."""

    def _grid(self, shape: tuple[int, ...], name: str) -> tuple[int, int]:
        """Checks the trailing ``(nrb, ncb)`` of ``shape`` against the seqlens and block size."""
        bm, bn = self.block_size
        grid = (_cdiv(self.seqlen_q, bm), _cdiv(self.seqlen_k, bn))
        if tuple(shape) != grid:
            raise ValueError(
                f"{name} must have (nrb, ncb) = {grid} trailing dims for seqlen_q="
                f"{self.seqlen_q}, seqlen_k={self.seqlen_k}, block_size={self.block_size}, "
                f"got {tuple(shape)}"
            )
        return grid

    def _tile_error(self, bm: int, bn: int) -> str | None:
        mbm, mbn = self.block_size
        if all(t % m == 0 or m % t == 0 for t, m in ((bm, mbm), (bn, mbn))):
            return None
        return (
            f"kernel tile {(bm, bn)} does not fit {type(self).__name__} block_size "
            f"{self.block_size}: each tile dimension must be a multiple or a divisor of the mask's"
        )

    def _elements(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        bm, bn = self.block_size
        return self._block_bits()[:, :, i // bm, j // bn]

    def _tile_classes(self, bm: int, bn: int) -> np.ndarray:
        # Each mask block meeting a tile's in-range rectangle meets it in >= 1 element, so the
        # tile is full iff all of them are kept, empty iff none is: count them by a
        # summed-area table over the mask blocks.
        bits = self._block_bits()
        mbm, mbn = self.block_size
        sat = np.zeros((*bits.shape[:2], bits.shape[2] + 1, bits.shape[3] + 1), dtype=np.int32)
        sat[:, :, 1:, 1:] = bits.cumsum(axis=2, dtype=np.int32).cumsum(axis=3, dtype=np.int32)
        r0 = np.arange(_cdiv(self.seqlen_q, bm)) * bm
        c0 = np.arange(_cdiv(self.seqlen_k, bn)) * bn
        rs, re = r0 // mbm, (np.minimum(r0 + bm, self.seqlen_q) - 1) // mbm + 1
        cs, ce = c0 // mbn, (np.minimum(c0 + bn, self.seqlen_k) - 1) // mbn + 1
        rs, re, cs, ce = rs[:, None], re[:, None], cs[None, :], ce[None, :]
        kept = sat[:, :, re, ce] - sat[:, :, rs, ce] - sat[:, :, re, cs] + sat[:, :, rs, cs]
        return _classes(kept, (re - rs) * (ce - cs), np)


class BlockBitsetMask(_BlockGranularMask):
    """One bit per block of ``block_size``, stored bit-packed.

    ``bits``: bool ``(nrb, ncb)`` or ``(B|1, H|1, nrb, ncb)``. ``packed_bits`` (uint8, in the
    input's array module) holds them row-major over ``(B, H, nrb, ncb)``, LSB first in each byte.
    """

    def __init__(
        self,
        bits: Array,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int] = (128, 128),
    ) -> None:
        bits = _native(bits)
        xp = _bool_array(bits, "bits")
        super().__init__(seqlen_q, seqlen_k, block_size, _leading(bits))
        self._grid(bits.shape[-2:], "bits")
        self._shape4 = _as4d(bits).shape
        self.packed_bits = xp.packbits(bits.reshape(-1), bitorder="little")

    @classmethod
    def from_dense_mask(
        cls, dense: Array, block_size: tuple[int, int] = (128, 128)
    ) -> BlockBitsetMask:
        """Keeps a block iff any element of ``dense`` in it is kept (a coarsening)."""
        dense = _native(dense)
        xp = _bool_array(dense, "dense")
        bm, bn = _block_pair(block_size)
        bits = _dense_block_any(_as4d(dense), bm, bn, xp)
        return cls(bits if dense.ndim == 4 else bits[0, 0], *dense.shape[-2:], (bm, bn))

    @property
    def bits(self) -> np.ndarray:
        """The unpacked bits, in the shape given (NumPy)."""
        return self._shape_out(self._block_bits())

    @property
    def nbytes(self) -> int:
        return int(self.packed_bits.nbytes)

    def _block_bits(self) -> np.ndarray:
        flat = np.unpackbits(
            _to_host(self.packed_bits), count=math.prod(self._shape4), bitorder="little"
        )
        return flat.astype(bool).reshape(self._shape4)


class BCSRMask(_BlockGranularMask):
    """Kept blocks as block CSR: storage proportional to the kept blocks.

    2-D: ``row_ptr (nrb + 1,)``, ``col_idx (nnz,)``. With leading dims: ``row_ptr
    (B|1, H|1, nrb + 1)`` and ``col_idx (B|1, H|1, L)``, each ``(b, h)`` using the first
    ``row_ptr[b, h, -1] <= L`` entries (the rest is padding). Invariants: ``row_ptr`` starts
    at 0 and never decreases; a row's columns are in ``[0, ncb)`` and strictly ascending.
    Both are stored as int32 in the inputs' array module.
    """

    def __init__(
        self,
        row_ptr: Array,
        col_idx: Array,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int] = (128, 128),
    ) -> None:
        row_ptr, col_idx = _native(row_ptr), _native(col_idx)
        xp = _array_module(row_ptr, "row_ptr")
        if _array_module(col_idx, "col_idx") is not xp:
            raise TypeError("row_ptr and col_idx must be arrays of one module (numpy or cupy)")
        for name, a in (("row_ptr", row_ptr), ("col_idx", col_idx)):
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
        if row_ptr.ndim not in (1, 3) or col_idx.ndim != row_ptr.ndim:
            raise ValueError(
                "row_ptr and col_idx must both be 1-D, or both 3-D (B|1, H|1, .), got shapes "
                f"{row_ptr.shape} and {col_idx.shape}"
            )
        lead = (int(row_ptr.shape[0]), int(row_ptr.shape[1])) if row_ptr.ndim == 3 else None
        if lead and (0 in lead or col_idx.shape[:2] != row_ptr.shape[:2]):
            raise ValueError(
                "row_ptr and col_idx must share non-zero leading (B, H) dims, got shapes "
                f"{row_ptr.shape} and {col_idx.shape}"
            )
        super().__init__(seqlen_q, seqlen_k, block_size, lead)
        bm, bn = self.block_size
        nrb, ncb = _cdiv(self.seqlen_q, bm), _cdiv(self.seqlen_k, bn)
        if row_ptr.shape[-1] != nrb + 1:
            raise ValueError(
                f"row_ptr must have nrb + 1 = {nrb + 1} entries per (b, h) for seqlen_q="
                f"{self.seqlen_q}, block_size={self.block_size}, got shape {row_ptr.shape}"
            )
        rp = _to_host(row_ptr).astype(np.int64).reshape(-1, nrb + 1)
        ci = _to_host(col_idx).astype(np.int64).reshape(rp.shape[0], -1)
        _check_bcsr(rp, ci, ncb)
        self.row_ptr = row_ptr.astype(xp.int32)
        self.col_idx = col_idx.astype(xp.int32)

    @classmethod
    def from_dense_mask(cls, dense: Array, block_size: tuple[int, int] = (128, 128)) -> BCSRMask:
        """Keeps a block iff any element of ``dense`` in it is kept (a coarsening)."""
        dense = _native(dense)
        xp = _bool_array(dense, "dense")
        bm, bn = _block_pair(block_size)
        bits = _dense_block_any(_as4d(dense), bm, bn, xp)
        b, h, nrb, ncb = bits.shape
        row_ptr = xp.zeros((b, h, nrb + 1), dtype=xp.int32)
        row_ptr[:, :, 1:] = xp.cumsum(bits.sum(axis=-1, dtype=xp.int32), axis=-1)
        width = int(row_ptr[:, :, -1].max())  # one scalar read: it sizes col_idx
        # kept blocks in row-major order, as flat indices, then their columns
        col_idx = _ascending_indices(bits.reshape(b, h, nrb * ncb), width, xp) % ncb
        if dense.ndim == 2:
            row_ptr, col_idx = row_ptr[0, 0], col_idx[0, 0]
        return cls(row_ptr, col_idx, *dense.shape[-2:], (bm, bn))

    @property
    def nbytes(self) -> int:
        return int(self.row_ptr.nbytes + self.col_idx.nbytes)

    def _block_bits(self) -> np.ndarray:
        bm, bn = self.block_size
        nrb, ncb = _cdiv(self.seqlen_q, bm), _cdiv(self.seqlen_k, bn)
        rp = _to_host(self.row_ptr).reshape(-1, nrb + 1)
        ci = _to_host(self.col_idx).reshape(rp.shape[0], -1)
        bits = np.zeros((rp.shape[0], nrb, ncb), dtype=bool)
        for bh in range(rp.shape[0]):
            rows = np.repeat(np.arange(nrb), np.diff(rp[bh]))
            bits[bh, rows, ci[bh, : rp[bh, -1]]] = True
        return bits.reshape(*self.batch_heads, nrb, ncb)


def _check_bcsr(rp: np.ndarray, ci: np.ndarray, ncb: int) -> None:
    """Validates host BCSR ``rp (BH, nrb + 1)``, ``ci (BH, L)`` against ``ncb`` columns."""
    if (rp[:, 0] != 0).any():
        raise ValueError(f"row_ptr must start at 0, got {rp[:, 0].tolist()}")
    if (np.diff(rp, axis=-1) < 0).any():
        raise ValueError("row_ptr must be non-decreasing")
    if (rp[:, -1] > ci.shape[-1]).any():
        raise ValueError(
            f"row_ptr[..., -1] (nnz, up to {int(rp[:, -1].max())}) must be <= "
            f"col_idx.shape[-1] = {ci.shape[-1]}"
        )
    for bh in range(rp.shape[0]):
        cols = ci[bh, : rp[bh, -1]]
        if ((cols < 0) | (cols >= ncb)).any():
            raise ValueError(f"col_idx values must lie in [0, {ncb}), got {cols.tolist()}")
        # consecutive entries ascend except where a new row starts
        new_row = np.zeros(len(cols), dtype=bool)
        new_row[rp[bh, 1:-1][rp[bh, 1:-1] < len(cols)]] = True
        if ((np.diff(cols) <= 0) & ~new_row[1:]).any():
            raise ValueError("col_idx must be strictly ascending within each block row")


class DynamicMask(_BlockGranularMask):
    """A block pattern in preallocated buffers, rewritten in place by ``update``.

    ``block_pattern``: bool ``(nrb, ncb)`` or ``(B|1, H|1, nrb, ncb)``, NumPy or CuPy; the
    buffers live in that module and never move. They include the kernel's lists for the
    mask's own block size (``device_lists()``): kept blocks are full (edge ones too), so the
    partial lists stay empty, and ``full_idx`` has the fixed width ``max_blocks_per_row``
    (default ``ncb``). ``update`` of a CuPy mask runs on the GPU; its only host read is the
    largest row count, to raise when a row exceeds ``max_blocks_per_row``.
    """

    def __init__(
        self,
        block_pattern: Array,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int] = (128, 128),
        max_blocks_per_row: int | None = None,
    ) -> None:
        block_pattern = _native(block_pattern)
        xp = _bool_array(block_pattern, "block_pattern")
        super().__init__(seqlen_q, seqlen_k, block_size, _leading(block_pattern))
        nrb, ncb = self._grid(block_pattern.shape[-2:], "block_pattern")
        if max_blocks_per_row is None:
            max_blocks_per_row = ncb
        cap = _positive_int("max_blocks_per_row", max_blocks_per_row)
        if cap > ncb:
            raise ValueError(
                f"max_blocks_per_row must be in [1, ncb={ncb}], got {max_blocks_per_row}"
            )
        self.max_blocks_per_row = cap
        self._xp = xp
        self._shape = block_pattern.shape
        lead = self.batch_heads
        self._pattern = xp.zeros((*lead, nrb, ncb), dtype=xp.bool_)
        self._partial_count = xp.zeros((*lead, nrb), dtype=xp.int32)
        self._partial_idx = xp.zeros((*lead, nrb, 1), dtype=xp.int32)
        self._full_count = xp.zeros((*lead, nrb), dtype=xp.int32)
        self._full_idx = xp.zeros((*lead, nrb, cap), dtype=xp.int32)
        self.update(block_pattern)

    def update(self, block_pattern: Array) -> None:
        """Rewrites the pattern and lists in place (same arrays); same shape/module as built."""
        xp = self._xp
        block_pattern = _native(block_pattern)
        if _array_module(block_pattern, "block_pattern") is not xp:
            raise TypeError(
                f"block_pattern must be a {xp.__name__} array like the one the mask was built "
                f"from, got {type(block_pattern).__module__}.{type(block_pattern).__name__}"
            )
        if block_pattern.dtype != np.bool_:
            raise TypeError(f"block_pattern must be a bool array, got dtype {block_pattern.dtype}")
        if block_pattern.shape != self._shape:
            raise ValueError(
                f"block_pattern must keep the shape {self._shape}, got {block_pattern.shape}"
            )
        pattern = block_pattern.reshape(self._pattern.shape)
        counts = pattern.sum(axis=-1, dtype=xp.int32)
        worst = int(counts.max())
        if worst > self.max_blocks_per_row:
            raise ValueError(
                f"block_pattern keeps {worst} blocks in one row, more than "
                f"max_blocks_per_row={self.max_blocks_per_row}"
            )
        self._pattern[...] = pattern
        self._full_count[...] = counts
        self._full_idx[...] = _ascending_indices(pattern, self.max_blocks_per_row, xp)

    def device_lists(self) -> BlockLists:
        """The live buffers (NumPy or CuPy) for a kernel tile equal to ``block_size``."""
        bm, bn = self.block_size
        return BlockLists(
            partial_count=self._partial_count, partial_idx=self._partial_idx,
            full_count=self._full_count, full_idx=self._full_idx, block_m=bm, block_n=bn,
            num_row_blocks=self._pattern.shape[-2], num_col_blocks=self._pattern.shape[-1],
        )

    def block_lists(self, block_m: int, block_n: int) -> BlockLists:
        """At ``block_size``: host copies of the live buffers; otherwise computed."""
        if (block_m, block_n) != self.block_size:
            return super().block_lists(block_m, block_n)
        live = self.device_lists()
        return BlockLists(
            partial_count=_to_host(live.partial_count).copy(),
            partial_idx=_to_host(live.partial_idx).copy(),
            full_count=_to_host(live.full_count).copy(),
            full_idx=_to_host(live.full_idx).copy(),
            block_m=live.block_m, block_n=live.block_n,
            num_row_blocks=live.num_row_blocks, num_col_blocks=live.num_col_blocks,
        )

    @property
    def nbytes(self) -> int:
        buffers = (self._pattern, self._partial_count, self._partial_idx, self._full_count,
                   self._full_idx)
        return int(sum(b.nbytes for b in buffers))

    def _block_bits(self) -> np.ndarray:
        return _to_host(self._pattern).copy()


# ----------------------------------------------------------------------------- exact


class MixedMask(SparseMask):
    """Exact: a class per block, and an element mask for each partial block only.

    ``block_class`` int8 ``(nrb, ncb)`` or ``(B|1, H|1, nrb, ncb)``: 0 empty, 1 partial,
    2 full, exact over the in-range elements. ``partial_slot`` int32, same shape: the row of
    ``partial_bits`` for a partial block (numbered 0, 1, ... in row-major order over
    ``(B, H, nrb, ncb)``), -1 elsewhere. ``partial_bits`` uint32 ``(P, block_m*block_n//32)``:
    element ``(r, c)`` of the block is bit ``k = r*block_n + c`` of its words, bit ``k % 32``
    (LSB first) of word ``k // 32``; out-of-range elements are 0. ``block_m*block_n`` must be a
    multiple of 32. ``block_lists`` answers exactly for any kernel tile (the kernel reads the
    element bits per mask block, so its tile must divide ``block_size``). Use
    ``from_dense_mask`` (a dense pattern) or ``from_mask`` (any mask, with no dense array); the
    constructor validates everything above.
    """

    def __init__(
        self,
        block_class: Array,
        partial_slot: Array,
        partial_bits: Array,
        seqlen_q: int,
        seqlen_k: int,
        block_size: tuple[int, int] = (128, 128),
    ) -> None:
        block_class, partial_slot, partial_bits = map(
            _native, (block_class, partial_slot, partial_bits))
        xp = _array_module(block_class, "block_class")
        for name, a in (("partial_slot", partial_slot), ("partial_bits", partial_bits)):
            if _array_module(a, name) is not xp:
                raise TypeError("block_class, partial_slot and partial_bits must share a module")
        if block_class.ndim not in (2, 4):
            raise ValueError(f"block_class must be 2-D or 4-D, got shape {block_class.shape}")
        super().__init__(seqlen_q, seqlen_k, block_size, _leading(block_class))
        bm, bn = self.block_size
        if (bm * bn) % 32:
            raise ValueError(
                f"MixedMask needs block_m*block_n to be a multiple of 32, got block_size "
                f"{self.block_size}"
            )
        grid = (_cdiv(self.seqlen_q, bm), _cdiv(self.seqlen_k, bn))
        if block_class.shape[-2:] != grid or 0 in block_class.shape:
            raise ValueError(
                f"block_class must have (nrb, ncb) = {grid} trailing dims, got "
                f"{block_class.shape}"
            )
        if partial_slot.shape != block_class.shape:
            raise ValueError(
                f"partial_slot must have block_class's shape {block_class.shape}, got "
                f"{partial_slot.shape}"
            )
        if not (np.issubdtype(block_class.dtype, np.integer)
                and np.issubdtype(partial_slot.dtype, np.integer)):
            raise TypeError("block_class and partial_slot must be integer arrays")
        if partial_bits.dtype != np.uint32:
            raise TypeError(f"partial_bits must be uint32, got dtype {partial_bits.dtype}")
        cls_h = _to_host(block_class)
        slot_h = _to_host(partial_slot)
        if not np.isin(cls_h, (EMPTY, PARTIAL, FULL)).all():
            raise ValueError("block_class values must be 0 (empty), 1 (partial) or 2 (full)")
        partial = cls_h == PARTIAL
        n_partial = int(partial.sum())
        if not (
            (slot_h[partial] == np.arange(n_partial)).all() and (slot_h[~partial] == -1).all()
        ):
            raise ValueError(
                "partial_slot must number the partial blocks 0, 1, ... in row-major order "
                "and be -1 elsewhere"
            )
        if partial_bits.shape != (n_partial, bm * bn // 32):
            raise ValueError(
                f"partial_bits must have shape {(n_partial, bm * bn // 32)}, got "
                f"{partial_bits.shape}"
            )
        self.block_class = block_class.astype(xp.int8)
        self.partial_slot = partial_slot.astype(xp.int32)
        self.partial_bits = partial_bits
        self._check_partial_bits(_as4d(partial).nonzero()[2:], xp)

    def _check_partial_bits(self, rows_cols: tuple[np.ndarray, np.ndarray], xp: Any) -> None:
        """Partial blocks keep some but not all in-range elements, and no out-of-range one."""
        if not rows_cols[0].size:
            return
        bm, bn = self.block_size
        sizes = [
            np.minimum(blk * b + b, s) - blk * b
            for blk, b, s in zip(rows_cols, (bm, bn), (self.seqlen_q, self.seqlen_k), strict=True)
        ]
        # In word space (no array of a byte per element: a block may be far larger than the
        # mask): the in-range words of each distinct (rows, cols) in range, at most 4 of them.
        shapes, which = np.unique(np.stack(sizes, axis=1), axis=0, return_inverse=True)
        which = xp.asarray(which.reshape(-1))
        inr = xp.asarray(np.concatenate([
            _pack_words(((np.arange(bm) < r)[:, None] & (np.arange(bn) < c)).reshape(1, -1), np)
            for r, c in shapes]))
        words = xp.ascontiguousarray(self.partial_bits)
        kept = xp.asarray(_POPCOUNT8)[words.view(xp.uint8)].sum(axis=-1, dtype=xp.int64)
        size = xp.asarray(shapes.prod(axis=1))[which]
        bad = (words & ~inr[which]).any() | (kept == 0).any() | (kept == size).any()
        if bool(bad):
            raise ValueError(
                "partial_bits must keep, for each partial block, some but not all in-range "
                "elements and no out-of-range one"
            )

    @classmethod
    def from_dense_mask(cls, dense: Array, block_size: tuple[int, int] = (128, 128)) -> MixedMask:
        """Exact: ``to_dense()`` of the result equals ``dense``."""
        dense = _native(dense)
        xp = _bool_array(dense, "dense")
        bm, bn = _block_pair(block_size)
        if (bm * bn) % 32:
            raise ValueError(
                f"MixedMask needs block_m*block_n to be a multiple of 32, got block_size "
                f"{(bm, bn)}"
            )
        sq, sk = dense.shape[-2:]
        dense4 = _as4d(dense)
        b, h = dense4.shape[:2]
        nrb, ncb = _cdiv(sq, bm), _cdiv(sk, bn)
        packed = None if xp is np else _device_packed(dense4, bm, bn)
        if packed is not None:  # a device kernel's counts and words
            kept, per_block = packed
        else:
            if bn % 8 == 0:  # whole bytes per block row: count and gather bit rows
                rows = _dense_row_words(dense4, bm, bn, xp)
                blocks = rows.reshape(b, h, nrb, bm, ncb, bn // 8)
                kept = xp.asarray(_POPCOUNT8)[blocks].sum(axis=(3, 5), dtype=xp.int32)
            else:
                blocks = _dense_blocks(dense4, bm, bn, xp)
                kept = blocks.sum(axis=(3, 5), dtype=xp.int32)
            per_block = blocks.transpose(0, 1, 2, 4, 3, 5).reshape(b * h * nrb * ncb, -1)
        block_class = _classes(kept, xp.asarray(_inrange_sizes(sq, sk, bm, bn)), xp)
        partial = block_class == PARTIAL
        order = xp.cumsum(partial.reshape(-1), dtype=xp.int32).reshape(partial.shape) - 1
        partial_slot = xp.where(partial, order, -1).astype(xp.int32)
        # (P, bm*bn/8 bytes: a block's bit rows back to back, or bm*bn bools)
        partial_bits = per_block[partial.reshape(-1)]
        if packed is None:
            partial_bits = (partial_bits.view(xp.uint32) if bn % 8 == 0
                            else _pack_words(partial_bits, xp))
        if dense.ndim == 2:
            block_class, partial_slot = block_class[0, 0], partial_slot[0, 0]
        return cls._exact(block_class, partial_slot, partial_bits, sq, sk, (bm, bn))

    @classmethod
    def _exact(cls, block_class: Array, partial_slot: Array, partial_bits: Array, seqlen_q: int,
               seqlen_k: int, block_size: tuple[int, int]) -> MixedMask:
        """The constructor without its checks, for parts that are exact by construction
        (``from_dense_mask``: the checks would unpack every partial block's bits again)."""
        mask = cls.__new__(cls)
        SparseMask.__init__(mask, seqlen_q, seqlen_k, block_size, _leading(block_class))
        mask.block_class = block_class.astype(np.int8)
        mask.partial_slot = partial_slot.astype(np.int32)
        mask.partial_bits = partial_bits
        return cls._built(mask)

    @property
    def nbytes(self) -> int:
        return int(self.block_class.nbytes + self.partial_slot.nbytes + self.partial_bits.nbytes)

    def _elements(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        bm, bn = self.block_size
        cls4 = _as4d(_to_host(self.block_class))[:, :, i // bm, j // bn]
        keep = cls4 == FULL
        words = _to_host(self.partial_bits)
        if words.shape[0]:
            slot = _as4d(_to_host(self.partial_slot))[:, :, i // bm, j // bn]
            k = (i % bm) * bn + j % bn
            word = words[np.maximum(slot, 0), k // 32]
            keep |= (cls4 == PARTIAL) & ((word >> (k % 32).astype(np.uint32)) & 1).astype(bool)
        return keep

    def _tile_classes(self, bm: int, bn: int) -> np.ndarray:
        cls4 = _as4d(_to_host(self.block_class))
        if (bm, bn) == self.block_size:
            return cls4.copy()
        # Kept elements per tile: full blocks give their overlap with it, partial blocks the
        # kept bits inside it. Work is per block and per kept bit, never per element of Sq x Sk.
        mbm, mbn = self.block_size
        sq, sk = self.seqlen_q, self.seqlen_k
        rows = _overlaps(sq, mbm, bm).astype(np.float64)  # (nrb, ntr)
        cols = _overlaps(sk, mbn, bn).astype(np.float64)  # (ncb, ntc)
        full = (cls4 == FULL).astype(np.float64)
        kept = np.rint(rows.T @ full @ cols).astype(np.int64)  # exact: counts < 2**53
        words = _to_host(self.partial_bits)
        where = np.argwhere(cls4 == PARTIAL)  # row-major: the slot order
        ntr, ntc = kept.shape[-2:]
        step = max(1, _CHUNK_ELEMS // (mbm * mbn))
        for s in range(0, len(where), step):
            elems = _unpack_words(words[s : s + step], np).reshape(-1, mbm, mbn)
            p, r, c = np.nonzero(elems)
            b, h, br, bc = where[s + p].T
            flat = ((b * kept.shape[1] + h) * ntr + (br * mbm + r) // bm) * ntc
            flat += (bc * mbn + c) // bn
            kept += np.bincount(flat, minlength=kept.size).reshape(kept.shape)
        return _classes(kept, _inrange_sizes(sq, sk, bm, bn), np)

    @classmethod
    def from_mask(cls, mask: SparseMask, block_size: tuple[int, int] | None = None) -> MixedMask:
        """Exact MixedMask of any mask (default block size: the mask's), with ``to_dense()``
        equal to ``mask.to_dense()``. Elements are evaluated in partial blocks only, so no
        ``(Sq, Sk)`` array is formed: e.g. an intersection of two block masks, or a parametric
        mask that should travel as block lists. The arrays are NumPy."""
        if not isinstance(mask, SparseMask):
            raise TypeError(f"mask must be a SparseMask, got {type(mask).__name__}")
        bm, bn = mask.block_size if block_size is None else _block_pair(block_size)
        if (bm * bn) % 32:
            raise ValueError(
                f"MixedMask needs block_m*block_n to be a multiple of 32, got block_size "
                f"{(bm, bn)}"
            )
        sq, sk = mask.seqlen_q, mask.seqlen_k
        cls4 = np.ascontiguousarray(
            np.broadcast_to(mask._tile_classes(bm, bn),
                            (*mask.batch_heads, _cdiv(sq, bm), _cdiv(sk, bn)))
        )
        partial = cls4 == PARTIAL
        where = np.argwhere(partial)  # row-major: the slot order
        slot = np.full(cls4.shape, -1, dtype=np.int32)
        slot[partial] = np.arange(len(where), dtype=np.int32)
        bits = np.zeros((len(where), bm * bn // 32), dtype=np.uint32)
        step = max(1, _CHUNK_ELEMS // (bm * bn * math.prod(mask.batch_heads)))
        for s in range(0, len(where), step):
            b, h, r, c = where[s : s + step].T
            i = r[:, None] * bm + np.arange(bm)  # (k, bm)
            j = c[:, None] * bn + np.arange(bn)  # (k, bn)
            inr = (i < sq)[:, :, None] & (j < sk)[:, None, :]
            keep = mask._elements(
                np.minimum(i, sq - 1)[:, :, None], np.minimum(j, sk - 1)[:, None, :]
            )  # (Bm|1, Hm|1, k, bm, bn)
            lead = (b if keep.shape[0] > 1 else 0, h if keep.shape[1] > 1 else 0)
            elems = keep[lead[0], lead[1], np.arange(len(b))] & inr
            bits[s : s + step] = _pack_words(elems.reshape(len(b), bm * bn), np)
        if mask._batch_heads is None:
            cls4, slot = cls4[0, 0], slot[0, 0]
        return cls(cls4, slot, bits, sq, sk, (bm, bn))


# ----------------------------------------------------------------------------- intersection


class IntersectionMask(SparseMask):
    """Keeps what both ``first`` and ``second`` keep; block size is ``first``'s.

    Leading dims broadcast (each 1 or equal). A kernel tile must suit both operands.
    """

    def __init__(self, first: SparseMask, second: SparseMask) -> None:
        for name, m in (("first", first), ("second", second)):
            if not isinstance(m, SparseMask):
                raise TypeError(f"{name} must be a SparseMask, got {type(m).__name__}")
        sa = (first.seqlen_q, first.seqlen_k)
        sb = (second.seqlen_q, second.seqlen_k)
        if sa != sb:
            raise ValueError(f"cannot intersect masks over (seqlen_q, seqlen_k) {sa} and {sb}")
        lead = None
        if first._batch_heads or second._batch_heads:
            try:
                lead = tuple(int(n) for n in np.broadcast_shapes(
                    first.batch_heads, second.batch_heads))
            except ValueError:
                raise ValueError(
                    f"cannot intersect masks with leading (B, H) dims {first.batch_heads} and "
                    f"{second.batch_heads}: each must be 1 or equal"
                ) from None
        super().__init__(*sa, first.block_size, lead)
        self.first = first
        self.second = second

    @property
    def nbytes(self) -> int:
        return self.first.nbytes + self.second.nbytes

    def _tile_error(self, bm: int, bn: int) -> str | None:
        return self.first._tile_error(bm, bn) or self.second._tile_error(bm, bn)

    def _elements(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return self.first._elements(i, j) & self.second._elements(i, j)

    def _tile_classes(self, bm: int, bn: int) -> np.ndarray:
        # empty if either is, full iff both are, partial with full is partial; only
        # partial with partial needs the elements.
        a, b = np.broadcast_arrays(
            self.first._tile_classes(bm, bn), self.second._tile_classes(bm, bn)
        )
        out = np.minimum(a, b)
        both = (a == PARTIAL) & (b == PARTIAL)
        tr, tc = np.nonzero(both.any(axis=(0, 1)))
        if tr.size:
            exact = self._classify_tiles(tr, tc, bm, bn)
            out[:, :, tr, tc] = np.where(both[:, :, tr, tc], exact, out[:, :, tr, tc])
        return out


# ----------------------------------------------------------------------------- estimates


def estimate_speedup(mask: SparseMask, block_size: tuple[int, int] | None = None) -> float:
    """Dense tiles over visited tiles for kernel tile ``block_size`` (default: the mask's).

    Counts are over the mask's leading dims; ``inf`` when no tile is visited.
    """
    if not isinstance(mask, SparseMask):
        raise TypeError(f"mask must be a SparseMask, got {type(mask).__name__}")
    bm, bn = mask.block_size if block_size is None else _block_pair(block_size)
    dense = _cdiv(mask.seqlen_q, bm) * _cdiv(mask.seqlen_k, bn) * math.prod(mask.batch_heads)
    visited = mask.visited_tiles(bm, bn)
    return math.inf if visited == 0 else dense / visited


def calculate_memory_savings(mask: SparseMask) -> float:
    """``1 - nbytes / (Sq * Sk * Bm * Hm)``: against a dense bool mask of the same dims."""
    if not isinstance(mask, SparseMask):
        raise TypeError(f"mask must be a SparseMask, got {type(mask).__name__}")
    dense = mask.seqlen_q * mask.seqlen_k * math.prod(mask.batch_heads)
    return 1.0 - mask.nbytes / dense
