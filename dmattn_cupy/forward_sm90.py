"""The Hopper forward family's host half (cuda_src/sm90/fwd.cu): which problems it takes, its
tiles, its shared-memory size, and its second kernel parameter ``Sm90FwdArgs`` (the tensor maps
of q/k/v/mask/bias and how the mask and bias are read).

Pure Python except ``build_args``, which asks the driver to encode the maps. A problem the
family cannot take (varlen, block-sparse lists, a float32 bias over keys, a layout TMA cannot
read, shapes whose tiles do not fit shared memory) stays on the sm80-class family.
"""

from __future__ import annotations

import numpy as np

from .arrays import ArrayInfo
from .tensor_map import TensorMapError, TensorMapSpec, address_offset, dim_stride, encode

HEAD_DIMS = (64, 128, 256)
BLOCK_M = 128               # two consumer warpgroups of 64 rows
THREADS = 384               # producer + two consumer warpgroups
SMEM_LIMIT = 227 * 1024     # opt-in shared memory per block on compute capability 9.0

OPERAND_NONE, OPERAND_TILE, OPERAND_KEY_ROW, OPERAND_QUERY_ROW = 0, 1, 2, 3

# Sm90FwdArgs: five 128-byte tensor maps (q, k, v, mask, bias), two int32 modes, padding to 704.
MAP_NAMES = ("q", "k", "v", "mask", "bias")
ARGS_DTYPE = np.dtype({"names": ["maps", "mask_mode", "bias_mode"],
                       "formats": [(np.uint8, 128 * len(MAP_NAMES)), np.int32, np.int32],
                       "offsets": [0, 640, 644], "itemsize": 704})

# (padded head dim, has_mask, has_bias) -> (block_n, stages); absent: not served (sm80 family).
TILES: dict[tuple[int, bool, bool], tuple[int, int]] = {
    (64, False, False): (128, 2), (64, True, False): (128, 2),
    (64, False, True): (128, 2), (64, True, True): (64, 2),
    (128, False, False): (128, 2), (128, True, False): (128, 2),
    (128, False, True): (128, 2), (128, True, True): (64, 2),
    (256, False, False): (64, 2), (256, True, False): (64, 2), (256, False, True): (64, 2),
}


def padded_head_dim(d: int) -> int:
    """The specialized head dim that serves ``d`` (TMA zero-fills the columns past ``d``)."""
    for hd in HEAD_DIMS:
        if d <= hd:
            return hd
    raise ValueError(f"head dim must be <= {HEAD_DIMS[-1]}, got {d}")


def mask_slots(head_dim: int, block_n: int, has_mask: bool) -> int:
    """Mask tiles streamed ahead of the K/V ring (Sm90FwdSmem::kMaskSlots in sm90/fwd.cu)."""
    if not has_mask:
        return 0
    return 8 if block_n == 64 and head_dim <= 128 else 4


def smem_bytes(head_dim: int, block_n: int, stages: int, has_mask: bool, has_bias: bool) -> int:
    """Dynamic shared memory of one instance: Sm90FwdSmem<...>::kAlloc in sm90/fwd.cu."""
    q = head_dim // 64 * BLOCK_M * 128
    kv = head_dim // 64 * block_n * 128
    bias = BLOCK_M * block_n * 2 if has_bias else 0
    slots = mask_slots(head_dim, block_n, has_mask)
    bars = 8 * (1 + 4 * stages + 2 * slots)
    return q + stages * (2 * kv + bias) + slots * BLOCK_M * block_n + bars + 16 * stages + 1024


def operand_mode(info: ArrayInfo | None) -> int:
    """How the kernel reads a 4-D mask/bias: per tile, one key row for every query, one value
    per query row (keys broadcast; a scalar too), or not at all."""
    if info is None:
        return OPERAND_NONE
    if info.shape[-1] == 1:
        return OPERAND_QUERY_ROW
    return OPERAND_KEY_ROW if info.shape[-2] == 1 else OPERAND_TILE


def _qkv_map(info: ArrayInfo, rows_box: int) -> TensorMapSpec:
    b, s, h, d = info.shape
    sb, ss, sh, _ = info.strides
    return TensorMapSpec(2, (d, s, h, b), (dim_stride(s, ss, 2), dim_stride(h, sh, 2),
                                          dim_stride(b, sb, 2)), (64, rows_box, 1, 1), 128)


def _operand_map(info: ArrayInfo, mode: int, elem: int, block_n: int) -> TensorMapSpec:
    """(cols, rows, heads, batch) over a 4-D mask/bias; broadcast dims have size 1."""
    nb, nh, nq, nk = info.shape
    sb, sh, sq, sk = info.strides
    if sk != 1:
        raise TensorMapError(f"keys must be contiguous, got stride {sk}")
    strides = (dim_stride(nq, sq, elem), dim_stride(nh, sh, elem), dim_stride(nb, sb, elem))
    if mode == OPERAND_KEY_ROW:
        return TensorMapSpec(elem, (nk, 1, nh, nb), strides, (block_n, 1, 1, 1), 0)
    box_cols = min(block_n, 128 // elem)
    return TensorMapSpec(elem, (nk, nq, nh, nb), strides, (box_cols, BLOCK_M, 1, 1),
                         box_cols * elem)


def plan_maps(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
              bias: ArrayInfo | None, block_n: int) -> dict[str, TensorMapSpec | None]:
    """The tensor maps of a dense problem, or TensorMapError when one cannot be encoded
    (pointers are checked at ``build_args``; ``tile_for`` checks them too)."""
    maps: dict[str, TensorMapSpec | None] = {
        "q": _qkv_map(q, BLOCK_M), "k": _qkv_map(k, block_n), "v": _qkv_map(v, block_n),
        "mask": None, "bias": None}
    for name, info in (("mask", mask), ("bias", bias)):
        mode = operand_mode(info)
        if mode in (OPERAND_TILE, OPERAND_KEY_ROW):
            elem = 1 if name == "mask" else 2
            if name == "bias" and info.dtype == "float32":
                raise TensorMapError("a float32 bias over keys is read by the sm80 family")
            maps[name] = _operand_map(info, mode, elem, block_n)
    for spec in maps.values():
        if spec is not None:
            spec.check()
    return maps


MAX_QUERY_TILES = 65535    # the grid's z dimension holds the query tiles


def tile_for(head_dim: int, q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
             bias: ArrayInfo | None, seqlen_q: int, seqlen_k: int,
             smem_limit: int = SMEM_LIMIT) -> tuple[int, int, int] | None:
    """(padded head dim, block_n, stages) when this family serves the dense problem, else None.

    Declined (the portable kernel serves them): a bias broadcast over keys ((.., Sq, 1) or a
    scalar), whose per-row value the kernel would apply as an lse shift, which is exact for
    finite values only (a -inf row must drop the row, a NaN or +inf one make it NaN); more
    query tiles than the grid's z dimension holds."""
    if seqlen_q < 1 or seqlen_k < 1 or head_dim > HEAD_DIMS[-1]:
        return None
    if -(-seqlen_q // BLOCK_M) > MAX_QUERY_TILES or operand_mode(bias) == OPERAND_QUERY_ROW:
        return None
    hd = padded_head_dim(head_dim)
    tile = TILES.get((hd, mask is not None, bias is not None))
    if tile is None:
        return None
    block_n, stages = tile
    if smem_bytes(hd, block_n, stages, mask is not None, bias is not None) > smem_limit:
        return None
    infos = [q, k, v] + [x for x, m in ((mask, operand_mode(mask)), (bias, operand_mode(bias)))
                         if m in (OPERAND_TILE, OPERAND_KEY_ROW)]
    if any(info.ptr % 16 for info in infos):
        return None
    try:
        plan_maps(q, k, v, mask, bias, block_n)
    except TensorMapError:
        return None
    return hd, block_n, stages


def build_args(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
               bias: ArrayInfo | None, block_n: int) -> np.ndarray:
    """The one-element Sm90FwdArgs record (maps encoded by the driver)."""
    maps = plan_maps(q, k, v, mask, bias, block_n)
    infos = {"q": q, "k": k, "v": v, "mask": mask, "bias": bias}
    rec = np.zeros(1, dtype=ARGS_DTYPE)
    raw = bytearray(128 * len(MAP_NAMES))
    for i, name in enumerate(MAP_NAMES):
        spec = maps[name]
        if spec is not None:
            raw[128 * i:128 * (i + 1)] = encode(spec, infos[name].ptr)
    rec["maps"][0] = np.frombuffer(bytes(raw), dtype=np.uint8)
    rec["mask_mode"] = operand_mode(mask)
    rec["bias_mode"] = operand_mode(bias)
    return rec


def address_slots(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
                  bias: ArrayInfo | None, block_n: int) -> tuple[tuple[str, int], ...] | None:
    """(operand, byte offset in the Sm90FwdArgs record) of each encoded map's global address,
    so a cached record is reused for new pointers of the same layout by patching them; None
    when the driver's map layout does not allow it (the maps are then re-encoded per call)."""
    maps = plan_maps(q, k, v, mask, bias, block_n)
    slots = []
    for i, name in enumerate(MAP_NAMES):
        spec = maps[name]
        if spec is None:
            continue
        off = address_offset(spec)
        if off is None:
            return None
        slots.append((name, 128 * i + off))
    return tuple(slots)
