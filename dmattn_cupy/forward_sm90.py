"""The Hopper forward family's host half (cuda_src/sm90/fwd.cu): which problems it takes, its
tiles, its shared-memory size, and its second kernel parameter ``Sm90FwdArgs`` (the tensor maps
of q/k/v/mask/bias and how the mask and bias are read).

Pure Python except ``build_args``, which asks the driver to encode the maps. A problem the
family cannot take (a float32 bias over keys, a layout TMA cannot read, shapes whose tiles do
not fit shared memory, block-sparse lists whose blocks are not whole 128-row CTAs and key
tiles) stays on the sm80-class family.

Varlen (a runtime switch of the kernel: ``cu_seqlens_q`` set) maps the packed tensors with a
batch of one; the kernel starts each sequence's coordinates at its cu_seqlens. Its mask/bias
layouts: query-based ``(total_q, h', max_k)`` as tiles; key-based ``(total_k, h')`` as one
contiguous chunk of ``block_n * h'`` values per stage (``OPERAND_KEY_CHUNK``: 1-D boxes over
the flattened tensor) when its rows are contiguous, or as one key row per head
(``OPERAND_KEY_ROW``) when its keys are. A TMA box must start on a 16-byte boundary in global
memory (else the copy faults: "illegal instruction"), and a sequence's first key may sit
anywhere: key-based loads start at the element aligned down to 16 bytes (``key_load_start``)
and span ``key_span`` elements, the values ``key_lead`` elements into the stage. Without a
mask, a key-based bias (dense or varlen) is read by the producer's plain loads instead
(``bias_by_loads``): it has no map and no alignment or stride rule. Block lists are a runtime
field too (``sp_full_count`` set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import env
from .arrays import ArrayInfo
from .tensor_map import TensorMapError, TensorMapSpec, dim_stride, encode, record_slots

HEAD_DIMS = (64, 128, 256)
BLOCK_M = 128               # two consumer warpgroups of 64 rows
THREADS = 384               # producer + two consumer warpgroups
SMEM_LIMIT = 227 * 1024     # opt-in shared memory per block on compute capability 9.0

OPERAND_NONE, OPERAND_TILE, OPERAND_KEY_ROW, OPERAND_QUERY_ROW, OPERAND_KEY_CHUNK = 0, 1, 2, 3, 4
# mask_mode of a spec without mask tiles whose producer's warps 1-3 pack a bool mask from its
# bytes (fwd.cu: kOperandPackWarps, pack_mask_warps; ``packs_mask``)
OPERAND_PACK_WARPS = 5
# A key chunk of block_n * h' values plus its alignment lead fits one bias stage / mask slot
# (128 * block_n values): 128 heads would need one more box.
MAX_CHUNK_HEADS = 127
KEY_ROW_STAGE = 1024        # bytes of a _krow spec's bias stage (fwd.cu: kBiasKeyRow's kBias)
TMA_ALIGN = 16              # bytes: a box's first global element sits on this boundary

# Sm90FwdArgs: five 128-byte tensor maps (q, k, v, mask, bias), two int32 modes, for key-based
# operands (key rows, key chunks) the heads per key, the box and the boxes per stage of each,
# the dynamic scheduler's counter (a pointer; 0 unless DM_SM90_PERSISTENT=2), the block lists'
# item order (a pointer; 0: none), the overlapped mask packing's ready words (a pointer; 0:
# none), padding to 704.
MAP_NAMES = ("q", "k", "v", "mask", "bias")
_ARG_INTS = ("mask_mode", "bias_mode", "mask_chunk_heads", "bias_chunk_heads", "mask_chunk_box",
             "bias_chunk_box", "mask_chunk_boxes", "bias_chunk_boxes")
COUNTER_OFFSET = 672        # Sm90FwdArgs::item_counter
ORDER_OFFSET = 680          # Sm90FwdArgs::item_order
READY_OFFSET = 688          # Sm90FwdArgs::row_ready
ARGS_DTYPE = np.dtype({"names": ["maps", *_ARG_INTS, "item_counter", "item_order", "row_ready"],
                       "formats": [(np.uint8, 128 * len(MAP_NAMES))] + [np.int32] * len(_ARG_INTS)
                       + [np.uint64, np.uint64, np.uint64],
                       "offsets": [0] + [640 + 4 * i for i in range(len(_ARG_INTS))]
                       + [COUNTER_OFFSET, ORDER_OFFSET, READY_OFFSET],
                       "itemsize": 704})

# How CTAs get their work items (fwd.cu: DM_SM90_PERSISTENT): one CTA per item, a persistent
# grid walking a static snake, or a persistent grid claiming items from a counter.
SCHEDULES = {0: "one CTA per item", 1: "static persistent", 2: "dynamic persistent"}

# (padded head dim, has_mask, has_bias) -> (block_n, stages); absent: not served (sm80 family).
TILES: dict[tuple[int, bool, bool], tuple[int, int]] = {
    (64, False, False): (128, 2), (64, True, False): (128, 2),
    (64, False, True): (128, 2), (64, True, True): (64, 3),
    (128, False, False): (128, 2), (128, True, False): (128, 2),
    (128, False, True): (128, 2), (128, True, True): (64, 3),
    (256, False, False): (64, 2), (256, True, False): (64, 2), (256, False, True): (64, 2),
}


def define_value(name: str, default: int) -> int:
    """An integer A/B define of the kernel source from DMATTN_NVRTC_DEFINES (``NAME=N``), or
    ``default``; the host half reads the ones that change its tiles or shared memory."""
    return env.nvrtc_define_int(name, default)


def schedule() -> int:
    """DM_SM90_PERSISTENT from DMATTN_NVRTC_DEFINES (default 2, fwd.cu's), one of SCHEDULES."""
    mode = define_value("DM_SM90_PERSISTENT", 2)
    if mode not in SCHEDULES:
        raise ValueError(f"DMATTN_NVRTC_DEFINES: DM_SM90_PERSISTENT must be one of "
                         f"{sorted(SCHEDULES)} ({', '.join(SCHEDULES.values())}), got {mode}")
    return mode


def dynamic_schedule() -> bool:
    """Whether launches claim work items from a counter (DM_SM90_PERSISTENT=2): the launch then
    needs a zeroed int32 word (``counter_offset``) that the kernel leaves zero."""
    return schedule() == 2


def counter_offset() -> int | None:
    """Byte offset of the counter's pointer in the Sm90FwdArgs record, or None when the
    schedule needs no counter."""
    return COUNTER_OFFSET if dynamic_schedule() else None


# work items the order kernel (fwd.cu: flash_fwd_sparse_order_kernel) ranks together: one of
# its CTAs per group (kItemOrderGroup)
ORDER_GROUP = 128


def item_order_items(seqlen_q: int, heads: int, batch: int, varlen: bool,
                     window: tuple[int, int], has_lists: bool) -> int:
    """The work items fwd_sm90 runs longest first within groups of ORDER_GROUP (block lists,
    fixed lengths, no causal/window edge, the dynamic schedule, ``DMATTN_SM90_FWD_ORDER`` not
    0): the order kernel's items and item_order's length, else 0 (the kernel's own order)."""
    if not (has_lists and not varlen and window == (-1, -1) and dynamic_schedule()
            and env.sm90_fwd_order()):
        return 0
    return -(-seqlen_q // BLOCK_M) * heads * batch


def _mask_bias_tile(head_dim: int, block_n: int, has_mask: bool) -> bool:
    """The 64-key mask tiles at head dim <= 128 (the mask + bias specs): the ones whose K/V
    stages (DM_SM90_MB_STAGES) and mask slots (DM_SM90_MB_MASK_SLOTS) have A/B defines."""
    return has_mask and block_n == 64 and head_dim <= 128


def tile(head_dim: int, has_mask: bool, has_bias: bool) -> tuple[int, int] | None:
    """(block_n, stages) of TILES, with DM_SM90_MB_STAGES applied; None: not served."""
    t = TILES.get((head_dim, has_mask, has_bias))
    if t is not None and _mask_bias_tile(head_dim, t[0], has_mask):
        return t[0], define_value("DM_SM90_MB_STAGES", t[1])
    return t


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
    if _mask_bias_tile(head_dim, block_n, has_mask):
        return define_value("DM_SM90_MB_MASK_SLOTS", 6)
    return 4


def fold_bias(block_n: int, has_mask: bool, has_bias: bool) -> bool:
    """Whether the spec folds mask tiles into its bias tiles (Sm90FwdSmem::kFold in sm90/fwd.cu:
    DM_SM90_MB_FOLD=1 (default), a mask and a bias, 64-key tiles, the dynamic scheduler); such a
    spec has one more barrier per stage."""
    return (define_value("DM_SM90_MB_FOLD", 1) != 0 and has_mask and has_bias
            and block_n == 64 and dynamic_schedule())


def pack_warps(has_mask: bool, has_bias: bool, key_row: bool = False) -> bool:
    """Whether the spec can pack a bool mask by its producer's warps 1-3
    (Sm90FwdSmem::kPackWarps: a tile-bias spec without mask tiles, the dynamic scheduler);
    such a spec has one more barrier per stage."""
    return not has_mask and has_bias and not key_row and dynamic_schedule()


def kbias_mode() -> int:
    """How a key-based bias without a mask reaches S (fwd.cu: DM_SM90_KBIAS_F32, default 4)."""
    return define_value("DM_SM90_KBIAS_F32", 4)


def aux_tile_bytes(block_n: int, key_row: bool) -> int:
    """Bytes after each K stage of a _krow spec with DM_SM90_KBIAS_F32=4 (fwd.cu: kAux, the aux
    step's tile of block_n key rows of 32 bytes); 0 otherwise."""
    return block_n * 32 if key_row and kbias_mode() == 4 else 0


def _alloc_bytes(head_dim: int, block_n: int, stages: int, has_mask: bool, has_bias: bool,
                 q_bufs: int, key_row: bool = False) -> int:
    """Sm90FwdSmem<...>::alloc_bytes(q_bufs) in sm90/fwd.cu (``key_row``: kBiasKeyRow, a bias
    stage of one 1 KB row)."""
    q = head_dim // 64 * BLOCK_M * 128
    kv = head_dim // 64 * block_n * 128
    bias = (KEY_ROW_STAGE if key_row else BLOCK_M * block_n * 2) if has_bias else 0
    aux = aux_tile_bytes(block_n, key_row)
    slots = mask_slots(head_dim, block_n, has_mask)
    # a second barrier per stage: the fold's full_f or the pack warps' info_p
    stage_bars2 = stages if fold_bias(block_n, has_mask, has_bias) \
        or pack_warps(has_mask, has_bias, key_row) else 0
    bars = 8 * (4 * stages + 2 * slots + 2 * q_bufs + stage_bars2)
    items = 16 if dynamic_schedule() else 0   # each stage's work item (kOffItems)
    return (q_bufs * q + stages * (2 * kv + aux + bias) + slots * BLOCK_M * block_n + bars
            + 16 * stages + items + 1024)


def q_buffers(head_dim: int, block_n: int, stages: int, has_mask: bool, has_bias: bool,
              key_row: bool = False) -> int:
    """Q's buffers (Sm90FwdSmem::kQBufs): two where they fit (DM_SM90_Q_BUFS=2, the default),
    so the next work item's Q loads while the current one runs; else one."""
    two = define_value("DM_SM90_Q_BUFS", 2) == 2
    fits = _alloc_bytes(head_dim, block_n, stages, has_mask, has_bias, 2, key_row) <= SMEM_LIMIT
    return 2 if two and fits else 1


def smem_bytes(head_dim: int, block_n: int, stages: int, has_mask: bool, has_bias: bool,
               key_row: bool = False) -> int:
    """Dynamic shared memory of one instance: Sm90FwdSmem<...>::kAlloc in sm90/fwd.cu."""
    return _alloc_bytes(head_dim, block_n, stages, has_mask, has_bias,
                        q_buffers(head_dim, block_n, stages, has_mask, has_bias, key_row),
                        key_row)


def operand_mode(info: ArrayInfo | None, varlen: bool = False) -> int:
    """How the kernel reads a mask/bias. Dense 4-D: per tile, one key row for every query,
    one value per query row (keys broadcast; a scalar too), or not at all. Varlen: a
    query-based 3-D one per tile (one key column: per query row, which varlen declines), a
    key-based 2-D one as key chunks when its rows (h' values of one key) are contiguous, else
    as one key row per head."""
    if info is None:
        return OPERAND_NONE
    if varlen and info.ndim == 3:
        return OPERAND_QUERY_ROW if info.shape[2] == 1 else OPERAND_TILE
    if varlen and info.ndim == 2:
        return OPERAND_KEY_CHUNK if _chunk_rows(info) else OPERAND_KEY_ROW
    if info.shape[-1] == 1:
        return OPERAND_QUERY_ROW
    return OPERAND_KEY_ROW if info.shape[-2] == 1 else OPERAND_TILE


def _chunk_rows(info: ArrayInfo) -> bool:
    """A key-based (total_k, h') operand whose h' values of a key are contiguous and whose
    keys follow each other: the flattened tensor holds key j's values at j*h' .. j*h'+h'-1."""
    tk, nh = info.shape
    sk, sh = info.strides
    return (sk == nh or tk == 1) and (sh == 1 or nh == 1)


def key_load_start(k_start: int, n0: int, heads: int, elem: int) -> int:
    """The first element a key-based stage loads (fwd.cu: key_load_start): that of key
    k_start + n0 (times heads) aligned down to TMA_ALIGN bytes."""
    return (k_start + n0) * heads & ~(TMA_ALIGN // elem - 1)


def key_lead(k_start: int, heads: int, elem: int) -> int:
    """Elements before the stage's first value (fwd.cu: key_lead); n0 * heads * elem is a
    multiple of TMA_ALIGN (n0 is a multiple of 64)."""
    return k_start * heads & (TMA_ALIGN // elem - 1)


def key_span(block_n: int, heads: int, elem: int) -> int:
    """Elements a key-based stage must load: its block_n * heads values and the longest lead."""
    return block_n * heads + TMA_ALIGN // elem - 1


def chunk_box(block_n: int, heads: int, elem: int) -> tuple[int, int]:
    """(elements per 1-D box, boxes per stage) of a key chunk: one box covering key_span
    (rounded up to 16 bytes) when that fits 256 elements, else boxes of 256 (512 bytes of
    bias, 256 of mask), so that every box starts 128-byte aligned in shared memory. The last
    box may read past the chunk (zero past the tensor; within the stage: heads <=
    MAX_CHUNK_HEADS)."""
    span = key_span(block_n, heads, elem)
    if span <= 256:
        unit = TMA_ALIGN // elem
        return -(-span // unit) * unit, 1
    return 256, -(-span // 256)


def key_stage_bytes(block_n: int, elem: int) -> int:
    """Shared memory a key-based operand's stage may fill: a mask slot / a bias stage."""
    return BLOCK_M * block_n * elem


@dataclass(frozen=True)
class OperandPlan:
    """How one mask/bias reaches the kernel: its mode, its map (None: not by TMA), and for
    key-based modes (OPERAND_KEY_ROW: one head) the heads per key, the elements per box and
    the boxes per stage."""
    mode: int
    map: TensorMapSpec | None = None
    chunk_heads: int = 1
    chunk_box: int = 0
    chunk_boxes: int = 0


def _qkv_map(info: ArrayInfo, rows_box: int, varlen: bool = False) -> TensorMapSpec:
    """(cols, rows, heads, batch); varlen: the packed (total, heads, d) with a batch of 1."""
    if varlen:
        t, h, d = info.shape
        st, sh, _ = info.strides
        return TensorMapSpec(2, (d, t, h, 1), (dim_stride(t, st, 2), dim_stride(h, sh, 2), 16),
                             (64, rows_box, 1, 1), 128)
    b, s, h, d = info.shape
    sb, ss, sh, _ = info.strides
    return TensorMapSpec(2, (d, s, h, b), (dim_stride(s, ss, 2), dim_stride(h, sh, 2),
                                          dim_stride(b, sb, 2)), (64, rows_box, 1, 1), 128)


def _tile_box(elem: int, block_n: int) -> tuple[int, int]:
    box_cols = min(block_n, 128 // elem)
    return box_cols, box_cols * elem


def _operand_map(info: ArrayInfo, mode: int, elem: int, block_n: int) -> TensorMapSpec:
    """(cols, rows, heads, batch) over a 4-D mask/bias; broadcast dims have size 1."""
    nb, nh, nq, nk = info.shape
    sb, sh, sq, sk = info.strides
    if sk != 1:
        raise TensorMapError(f"keys must be contiguous, got stride {sk}")
    strides = (dim_stride(nq, sq, elem), dim_stride(nh, sh, elem), dim_stride(nb, sb, elem))
    if mode == OPERAND_KEY_ROW:
        return TensorMapSpec(elem, (nk, 1, nh, nb), strides, (block_n, 1, 1, 1), 0)
    box_cols, swizzle = _tile_box(elem, block_n)
    return TensorMapSpec(elem, (nk, nq, nh, nb), strides, (box_cols, BLOCK_M, 1, 1), swizzle)


def _varlen_operand(info: ArrayInfo, mode: int, elem: int, block_n: int) -> OperandPlan:
    """Maps over a packed varlen mask/bias (the kernel offsets rows/keys per sequence)."""
    if mode == OPERAND_TILE:  # (total_q, h', max_k): keys sequence-relative
        tq, nh, mk = info.shape
        sq, sh, sk = info.strides
        if sk != 1:
            raise TensorMapError(f"keys must be contiguous, got stride {sk}")
        box_cols, swizzle = _tile_box(elem, block_n)
        return OperandPlan(mode, TensorMapSpec(
            elem, (mk, tq, nh, 1), (dim_stride(tq, sq, elem), dim_stride(nh, sh, elem), 16),
            (box_cols, BLOCK_M, 1, 1), swizzle))
    tk, nh = info.shape
    sk, sh = info.strides
    if tk * nh >= 1 << 31:
        raise TensorMapError(f"{tk} x {nh} values exceed the int32 box coordinates")
    if mode == OPERAND_KEY_CHUNK:  # the flattened (total_k * h',) tensor, 1-D boxes
        if nh > MAX_CHUNK_HEADS:
            raise TensorMapError(f"a key chunk of {nh} heads exceeds {MAX_CHUNK_HEADS}")
        box, boxes = chunk_box(block_n, nh, elem)
        if boxes * box * elem > key_stage_bytes(block_n, elem):
            raise TensorMapError(f"a key chunk of {nh} heads exceeds its stage")
        return OperandPlan(mode, TensorMapSpec(elem, (tk * nh, 1, 1, 1), (16, 16, 16),
                                               (box, 1, 1, 1), 0), nh, box, boxes)
    if sk != 1:  # OPERAND_KEY_ROW: one head's keys contiguous
        raise TensorMapError(f"key-based layout {info.shape} with strides {info.strides}: "
                             "neither its rows nor its keys are contiguous")
    box = chunk_box(block_n, 1, elem)[0]  # block_n + 16 bytes: the aligned-down start's lead
    return OperandPlan(mode, TensorMapSpec(elem, (tk, 1, nh, 1),
                                           (16, dim_stride(nh, sh, elem), 16),
                                           (box, 1, 1, 1), 0), 1, box, 1)


def bias_by_loads(mask: ArrayInfo | None, bias: ArrayInfo | None, varlen: bool = False) -> bool:
    """Whether the kernel's producer reads the bias with plain loads into one row per stage
    (fwd.cu: bias_loads, DM_SM90_KBIAS_F32 != 0; fp32, or bf16 under a softcap; with the
    default 4 on the _krow specs also into the aux tile after each K stage): a key-based
    bias in the query dtype without a mask. It needs no tensor map, so any key count, strides
    and alignment serve."""
    return (kbias_mode() != 0 and mask is None and bias is not None
            and bias.dtype != "float32"
            and operand_mode(bias, varlen) in (OPERAND_KEY_ROW, OPERAND_KEY_CHUNK))


def key_row_spec(mask: ArrayInfo | None, bias: ArrayInfo | None, varlen: bool = False) -> bool:
    """Whether the problem runs on a ``_krow`` spec (fwd.cu: kBiasKeyRow; bias stages of one
    row, so that Q gets two buffers at d128): a bias read by the producer's loads
    (bias_by_loads), unless ``DM_SM90_KROW_SPEC=0`` (the tile-bias spec then serves it)."""
    return define_value("DM_SM90_KROW_SPEC", 1) != 0 and bias_by_loads(mask, bias, varlen)


def plan_operands(mask: ArrayInfo | None, bias: ArrayInfo | None, block_n: int,
                  varlen: bool = False) -> dict[str, OperandPlan]:
    """The mask's and the bias's OperandPlan, or TensorMapError when TMA cannot read one."""
    plans = {}
    for name, info in (("mask", mask), ("bias", bias)):
        mode = operand_mode(info, varlen)
        plans[name] = OperandPlan(mode)
        if mode in (OPERAND_NONE, OPERAND_QUERY_ROW):
            continue
        elem = 1 if name == "mask" else 2
        if name == "bias" and info.dtype == "float32":
            raise TensorMapError("a float32 bias over keys is read by the sm80 family")
        if name == "bias" and bias_by_loads(mask, bias, varlen):
            continue  # the producer's plain loads: no map
        if varlen:
            plans[name] = _varlen_operand(info, mode, elem, block_n)
        elif mode == OPERAND_KEY_ROW:  # dense keys start at 0: aligned, one box of block_n
            plans[name] = OperandPlan(mode, _operand_map(info, mode, elem, block_n), 1,
                                      block_n, 1)
        else:
            plans[name] = OperandPlan(mode, _operand_map(info, mode, elem, block_n))
    return plans


def plan_maps(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
              bias: ArrayInfo | None, block_n: int,
              varlen: bool = False) -> dict[str, TensorMapSpec | None]:
    """The tensor maps of a problem, or TensorMapError when one cannot be encoded
    (pointers are checked at ``build_args``; ``tile_for`` checks them too)."""
    maps: dict[str, TensorMapSpec | None] = {
        "q": _qkv_map(q, BLOCK_M, varlen), "k": _qkv_map(k, block_n, varlen),
        "v": _qkv_map(v, block_n, varlen)}
    for name, plan in plan_operands(mask, bias, block_n, varlen).items():
        maps[name] = plan.map
    for spec in maps.values():
        if spec is not None:
            spec.check()
    return maps


MAX_QUERY_TILES = 65535    # query tiles per sequence
MAX_ITEMS = 2**31 - 1      # work items (query tiles x heads x batch): the kernel counts in int32


def launch_ctas(items: int, sm_count: int) -> int:
    """CTAs of a launch over ``items`` work items: by default (``DM_SM90_PERSISTENT=2``) one
    per SM claiming items from a counter, longest first (fwd.cu); with ``=0`` in
    DMATTN_NVRTC_DEFINES one per item, with ``=1`` one per SM, each looping over its items in a
    static snake order (H200: causal -3.5% against one per item). ``DM_SM90_MAX_CTAS=N`` (host
    only) caps a persistent grid at N CTAs, so that small test problems make each CTA walk
    many items."""
    if schedule() == 0:
        return items
    cap = define_value("DM_SM90_MAX_CTAS", 0)
    return max(1, min(items, sm_count, cap if cap > 0 else sm_count))


def tile_for(head_dim: int, q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
             bias: ArrayInfo | None, seqlen_q: int, seqlen_k: int,
             smem_limit: int = SMEM_LIMIT, varlen: bool = False,
             sparse: bool | tuple[int, int] = False) -> tuple[int, int, int] | None:
    """(padded head dim, block_n, stages) when this family serves the problem, else None.
    ``seqlen_q``/``seqlen_k``: varlen's max_seqlen; ``sparse``: the (block_m, block_n) of
    block-sparse lists (True: lists of an unknown block size).

    Declined (the portable kernel serves them): a bias broadcast over keys ((.., Sq, 1) or a
    scalar), whose per-row value the kernel would apply as an lse shift, which is exact for
    finite values only (a -inf row must drop the row, a NaN or +inf one make it NaN); a
    varlen mask/bias with one key column; more query tiles than the grid's z dimension
    holds; block lists whose blocks are not whole 128-row CTAs and whole key tiles (64-row
    blocks), or with varlen."""
    if seqlen_q < 1 or seqlen_k < 1 or head_dim > HEAD_DIMS[-1]:
        return None
    if varlen and not (q.ndim == k.ndim == v.ndim == 3):
        return None
    if -(-seqlen_q // BLOCK_M) > MAX_QUERY_TILES or operand_mode(bias, varlen) == OPERAND_QUERY_ROW:
        return None
    if varlen and (operand_mode(mask, varlen) == OPERAND_QUERY_ROW or sparse):
        return None
    hd = padded_head_dim(head_dim)
    hd_tile = tile(hd, mask is not None, bias is not None)
    if hd_tile is None:
        return None
    block_n, stages = hd_tile
    if sparse is True or (sparse and (sparse[0] % BLOCK_M or sparse[1] % block_n)):
        return None
    if smem_bytes(hd, block_n, stages, mask is not None, bias is not None,
                  key_row_spec(mask, bias, varlen)) > smem_limit:
        return None
    try:
        maps = plan_maps(q, k, v, mask, bias, block_n, varlen)
    except TensorMapError:
        return None
    # a TMA box's global start must be 16-byte aligned: every operand read through a map
    infos = {"q": q, "k": k, "v": v, "mask": mask, "bias": bias}
    if any(infos[name].ptr % 16 for name, spec in maps.items() if spec is not None):
        return None
    return hd, block_n, stages


MAX_PACK_ROW_SPAN = 2**32   # bytes: pack_mask_warps addresses a tile's rows in 32 bits


def packs_mask(mask: ArrayInfo, seqlen_k: int) -> bool:
    """Whether ``pack_mask_warps`` reads the bool ``mask`` (B|1, H|1, Sq, Sk), collapsed
    (a broadcast dim has stride 0), from its bytes: a unit key stride, its pointer and every
    other stride multiples of 16 bytes (16-byte loads), ``seqlen_k`` a multiple of 32 (whole
    words: a word past a row's end would be read), and a tile's rows within 32-bit offsets."""
    if mask.ndim != 4 or mask.dtype != "bool" or seqlen_k % 32 or mask.strides[3] != 1:
        return False
    if mask.ptr % 16 or any(st % 16 for st in mask.strides[:3]):
        return False
    return BLOCK_M * abs(mask.strides[2]) + seqlen_k < MAX_PACK_ROW_SPAN


def build_args(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
               bias: ArrayInfo | None, block_n: int, varlen: bool = False) -> np.ndarray:
    """The one-element Sm90FwdArgs record (maps encoded by the driver)."""
    maps = plan_maps(q, k, v, mask, bias, block_n, varlen)
    plans = plan_operands(mask, bias, block_n, varlen)
    infos = {"q": q, "k": k, "v": v, "mask": mask, "bias": bias}
    rec = np.zeros(1, dtype=ARGS_DTYPE)
    raw = bytearray(128 * len(MAP_NAMES))
    for i, name in enumerate(MAP_NAMES):
        spec = maps[name]
        if spec is not None:
            raw[128 * i:128 * (i + 1)] = encode(spec, infos[name].ptr)
    rec["maps"][0] = np.frombuffer(bytes(raw), dtype=np.uint8)
    for name, plan in plans.items():
        rec[f"{name}_mode"] = plan.mode
        rec[f"{name}_chunk_heads"] = plan.chunk_heads
        rec[f"{name}_chunk_box"] = plan.chunk_box
        rec[f"{name}_chunk_boxes"] = plan.chunk_boxes
    return rec


def address_slots(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, mask: ArrayInfo | None,
                  bias: ArrayInfo | None, block_n: int,
                  varlen: bool = False) -> tuple[tuple[str, int], ...] | None:
    """(operand, byte offset in the Sm90FwdArgs record) of each encoded map's global address,
    so a cached record is reused for new pointers of the same layout by patching them; None
    when the driver's map layout does not allow it (the maps are then re-encoded per call)."""
    return record_slots(plan_maps(q, k, v, mask, bias, block_n, varlen), MAP_NAMES)
