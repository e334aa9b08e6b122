"""A mask as torch tensors plus static metadata: what ``torch.compile`` reads of a mask.

Traced code cannot run the NumPy/CuPy code that turns a block mask into the kernel's lists, so
that work is done when the mask is built (a ``masks.BUILD_HOOKS`` hook, registered here when
torch is installed) and kept on the mask as ``_dmattn_traced``: ``(window, flat, error)``.

- ``window``: the ``(left, right)`` window its parametric parts fold into;
- ``flat``: None (no block part) or ``(tensors, meta)`` from ``flatten_block_mask`` of its
  block part (an ``&`` of two block masks: their exact merged ``MixedMask``);
- ``error``: None, or why the CUDA path cannot take the mask (raised when traced).

``flatten_block_mask`` gives the kernel's lists at the mask's own block size (``full_count,
full_idx, partial_count, partial_idx`` int32 with leading ``(Bm, Hm)`` dims, and a MixedMask's
``partial_slot`` and ``partial_bits``, the latter viewed as int32) on the device the mask's data
lives on, and a hashable ``BlockMeta``. Under torch.compile these tensors are graph inputs (the
mask's attributes), the metadata constants. A DynamicMask's tensors are views of its live
buffers, so ``update`` is seen by the next compiled call without recompiling. Immutable masks'
tensors are computed once. ``unflatten_block_mask`` rebuilds an equal mask (NumPy-backed);
``lists_to_dense`` expands the tensors to the exact bool mask with torch ops (traceable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import torch
except ImportError:  # torch is optional: without it nothing here is used
    torch = None

from . import masks
from .masks import (
    BCSRMask,
    BlockBitsetMask,
    DynamicMask,
    MixedMask,
    SparseMask,
)
from .sparse_plan import split_sparse

BLOCK_KINDS = ("BlockBitsetMask", "BCSRMask", "MixedMask", "DynamicMask")
_CLASSES = {c.__name__: c for c in (BlockBitsetMask, BCSRMask, MixedMask, DynamicMask)}
TRACED_ATTR = "_dmattn_traced"


@dataclass(frozen=True)
class BlockMeta:
    """What a block mask is besides its tensors (hashable: a constant under torch.compile)."""
    kind: str                          # one of BLOCK_KINDS
    seqlen_q: int
    seqlen_k: int
    block_size: tuple[int, int]
    batch_heads: tuple[int, int] | None  # None: a 2-D mask
    max_blocks_per_row: int = 0          # DynamicMask only

    @property
    def leading(self) -> tuple[int, int]:
        return self.batch_heads or (1, 1)

    @property
    def grid(self) -> tuple[int, int]:
        bm, bn = self.block_size
        return -(-self.seqlen_q // bm), -(-self.seqlen_k // bn)


def _cupy_device(x: Any) -> int | None:
    """The CUDA device of a CuPy array, None for a NumPy one."""
    return None if isinstance(x, np.ndarray) else int(x.device.id)


def _as_torch(arr: Any, device: int | None) -> Any:
    """A contiguous int32 NumPy array as a torch tensor on ``device`` (None: the CPU, sharing
    memory); a CuPy array is viewed in place (DLPack)."""
    if isinstance(arr, np.ndarray):
        arr = np.ascontiguousarray(arr)
        if device is None:
            return torch.from_numpy(arr)
        import cupy

        with cupy.cuda.Device(device):
            arr = cupy.asarray(arr)
    return torch.from_dlpack(arr if arr.flags.c_contiguous else arr.copy())


def _words_as_int32(bits: Any) -> Any:
    """``partial_bits`` (uint32) reinterpreted as int32, contiguous, in its own module."""
    if isinstance(bits, np.ndarray):
        return np.ascontiguousarray(bits).view(np.int32)
    import cupy

    return cupy.ascontiguousarray(bits).view(cupy.int32)


def _home(mask: SparseMask) -> int | None:
    if isinstance(mask, BlockBitsetMask):
        return _cupy_device(mask.packed_bits)
    if isinstance(mask, BCSRMask):
        return _cupy_device(mask.row_ptr)
    if isinstance(mask, MixedMask):
        return _cupy_device(mask.block_class)
    return _cupy_device(mask.device_lists().full_idx)


def flatten_block_mask(mask: SparseMask) -> tuple[tuple[Any, ...], BlockMeta]:
    """``(tensors, meta)`` of a block mask (see the module docstring); cached on the mask
    unless it is a DynamicMask, whose tensors are views of its live buffers anyway."""
    if not isinstance(mask, tuple(_CLASSES.values())):
        raise TypeError(f"mask must be one of {', '.join(BLOCK_KINDS)}, got "
                        f"{type(mask).__name__}")
    cached = mask.__dict__.get("_dmattn_flat")
    if cached is not None:
        return cached
    bm, bn = mask.block_size
    dev = _home(mask)
    lists = mask.device_lists() if isinstance(mask, DynamicMask) else mask.block_lists(bm, bn)
    arrays = [lists.full_count, lists.full_idx, lists.partial_count, lists.partial_idx]
    if isinstance(mask, MixedMask):
        lead = mask.batch_heads
        arrays += [mask.partial_slot.reshape(*lead, *mask.partial_slot.shape[-2:]),
                   _words_as_int32(mask.partial_bits)]
    tensors = tuple(_as_torch(a, dev) for a in arrays)
    meta = BlockMeta(type(mask).__name__, mask.seqlen_q, mask.seqlen_k, (bm, bn),
                     mask._batch_heads and tuple(int(n) for n in mask._batch_heads),
                     getattr(mask, "max_blocks_per_row", 0))
    flat = (tensors, meta)
    if not isinstance(mask, DynamicMask):
        mask.__dict__["_dmattn_flat"] = flat
    return flat


def _host(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy()


def _kept_blocks(count: np.ndarray, idx: np.ndarray, ncb: int) -> np.ndarray:
    """``(Bm, Hm, nrb, ncb)`` bool: the blocks a (count, idx) list pair names."""
    valid = np.arange(idx.shape[-1]) < count[..., None]
    out = np.zeros((*count.shape, ncb), dtype=bool)
    b, h, r, w = np.nonzero(valid)
    out[b, h, r, idx[b, h, r, w]] = True
    return out


def unflatten_block_mask(tensors: tuple[Any, ...] | list[Any], meta: BlockMeta) -> SparseMask:
    """The mask ``flatten_block_mask`` flattened (NumPy-backed, validated again): same class,
    same ``to_dense()``."""
    if not isinstance(meta, BlockMeta) or meta.kind not in _CLASSES:
        raise TypeError(f"meta must be a BlockMeta of one of {BLOCK_KINDS}, got {meta!r}")
    want = 6 if meta.kind == "MixedMask" else 4
    if len(tensors) != want:
        raise ValueError(f"a {meta.kind} flattens to {want} tensors, got {len(tensors)}")
    fc, fi, pc, pi = (_host(t) for t in tensors[:4])
    nrb, ncb = meta.grid
    full = _kept_blocks(fc, fi, ncb)
    two_d = meta.batch_heads is None
    args = (meta.seqlen_q, meta.seqlen_k, meta.block_size)
    if meta.kind == "MixedMask":
        cls = np.where(full, masks.FULL, np.where(_kept_blocks(pc, pi, ncb), masks.PARTIAL,
                                                  masks.EMPTY)).astype(np.int8)
        slot = _host(tensors[4]).reshape(cls.shape)
        bits = np.ascontiguousarray(_host(tensors[5])).view(np.uint32)
        if two_d:
            cls, slot = cls[0, 0], slot[0, 0]
        return MixedMask(cls, slot, bits, *args)
    if two_d:
        full = full[0, 0]
    if meta.kind == "BlockBitsetMask":
        return BlockBitsetMask(full, *args)
    if meta.kind == "DynamicMask":
        return DynamicMask(full, *args, max_blocks_per_row=meta.max_blocks_per_row)
    full4 = full.reshape(*meta.leading, nrb, ncb)
    row_ptr = np.zeros((*meta.leading, nrb + 1), dtype=np.int32)
    row_ptr[..., 1:] = np.cumsum(full4.sum(axis=-1), axis=-1)
    width = max(1, int(row_ptr[..., -1].max()))
    col_idx = np.zeros((*meta.leading, width), dtype=np.int32)
    for b, h in np.ndindex(*meta.leading):
        cols = np.nonzero(full4[b, h])[1]  # row-major: ascending within each row
        col_idx[b, h, :len(cols)] = cols
    if two_d:
        row_ptr, col_idx = row_ptr[0, 0], col_idx[0, 0]
    return BCSRMask(row_ptr, col_idx, *args)


def _listed(count: Any, idx: Any, ncb: int) -> Any:
    """``(Bm, Hm, nrb, ncb)`` bool of the blocks a (count, idx) pair lists (torch ops)."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < count.unsqueeze(-1)
    target = torch.where(valid, idx.long(), ncb)  # entries past the count hit a spare column
    out = torch.zeros((*idx.shape[:-1], ncb + 1), dtype=torch.bool, device=idx.device)
    return out.scatter(-1, target, True)[..., :ncb]


def lists_to_dense(tensors: tuple[Any, ...] | list[Any], meta: BlockMeta) -> Any:
    """The exact bool mask ``(Bm, Hm, Sq, Sk)`` of flattened tensors, with torch ops only
    (traceable; the dense fallback under torch.compile and the CPU reference). Gathered per
    element of the mask, never over the blocks' padding (a block may be far longer than the
    mask: a (2**20, 16) block over 64 rows)."""
    nrb, ncb = meta.grid
    bm, bn = meta.block_size
    sq, sk = meta.seqlen_q, meta.seqlen_k
    dev = tensors[0].device
    rows = torch.arange(sq, device=dev)[:, None]
    cols = torch.arange(sk, device=dev)[None, :]
    rb, cb = rows // bm, cols // bn   # each element's block
    dense = _listed(tensors[0], tensors[1], ncb)[..., rb, cb]
    if meta.kind == "MixedMask" and tensors[5].shape[0] > 0:
        slot, words = tensors[4][..., rb, cb], tensors[5]   # (Bm, Hm, Sq, Sk) partial's slot
        bit = (rows % bm) * bn + cols % bn   # element (r, c) of a block: bit r * bn + c
        word = words[slot.clamp(min=0).long(), bit // 32]
        dense = dense | (((word >> (bit % 32).to(word.dtype)) & 1).bool() & (slot >= 0))
    return dense


def traced_form(mask: SparseMask) -> tuple[tuple[int, int], Any, str | None]:
    """``(window, flat, error)`` of any mask (see the module docstring)."""
    try:
        window, block = split_sparse(mask)
    except NotImplementedError as e:
        return (-1, -1), None, str(e)
    return window, (None if block is None else flatten_block_mask(block)), None


def _on_build(mask: SparseMask) -> None:
    """Never fails a mask's construction: what goes wrong is kept and raised when traced
    (eager calls do not read this form)."""
    try:
        form = traced_form(mask)
    except (RuntimeError, TypeError, ValueError, BufferError, ImportError) as e:
        form = ((-1, -1), None, f"{type(mask).__name__} has no torch form for torch.compile "
                                f"({type(e).__name__}: {e})")
    mask.__dict__[TRACED_ATTR] = form


if torch is not None and _on_build not in masks.BUILD_HOOKS:
    masks.BUILD_HOOKS.append(_on_build)
