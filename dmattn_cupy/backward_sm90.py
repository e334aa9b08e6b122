"""The Hopper backward family's host half (cuda_src/sm90/bwd.cu): which problems it takes,
its shared-memory size, its second kernel parameter ``Sm90BwdArgs`` (the tensor maps of
q/k/v/dout and a full bias, how the bias is read, and the deterministic mode's counters), and
the size of those counters.

Pure Python except ``build_args``, which asks the driver to encode the maps. Taken: a dense
bool mask of any broadcast of (B, H, Sq, Sk) (the kernel's producer reads it through its
strides; no tensor map, so no layout rule: 16-byte loads where rows allow, else bytes) and the
deterministic mode (dQ adds ordered by per-query-tile counters, ``semaphore_words``).
Also (unless ``DMATTN_SM90_BWD_SPARSE=0``) block-sparse lists of full blocks whose size tiles the
kernel's items (block_m a multiple of BLOCK_M, block_n of BLOCK_N; the kernel reads
``BwdParams.sp_grid`` and walks only the listed items), alone or with any mask, bias, window
or the deterministic mode it takes otherwise; lists with partial blocks (a MixedMask's element
bits) too, without a mask, on their own specs (the mask specs' ``listed_bits`` builds: the mask
warps read the bits where they would read mask bytes).
Declined (the sm80-class backward serves them): varlen, partial blocks beside a mask, block
sizes that do not tile the items, head dims above 128, a bias other than a (B, H, Sq, Sk) or
(B, H, 1, Sk) one in the query's dtype (batch/head broadcasts and query-row biases included),
and q/k/v/dout/bias layouts TMA cannot read.
"""

from __future__ import annotations

import numpy as np

from . import env
from .arrays import ArrayInfo
from .tensor_map import TensorMapError, TensorMapSpec, dim_stride, encode, record_slots

HEAD_DIMS = (64, 128)
BLOCK_M = 64                # query rows per item
BLOCK_N = 128               # keys per CTA: two consumer warpgroups of 64
STAGES = 2                  # Q/dO/bias ring
THREADS = 384               # producer + two consumer warpgroups
SMEM_LIMIT = 227 * 1024
DQ_ROW_BYTES = (64 + 8) * 4   # a staged dQ row: 64 fp32 + 32 bytes of bank padding
DQ_WARP_BYTES = 16 * DQ_ROW_BYTES  # one consumer warp's 16 rows of one 64-column box

BIAS_NONE, BIAS_TILE, BIAS_KEY_ROW = 0, 1, 2

# Sm90BwdArgs: six 128-byte tensor maps (q, k, v, dout, bias, dqa: dq_accum for the tensor
# writer), the int32 bias mode, the deterministic mode's counters (a pointer; 0 = default
# mode), padding.
MAP_NAMES = ("q", "k", "v", "dout", "bias", "dqa")
ARGS_DTYPE = np.dtype({"names": ["maps", "bias_mode", "dq_sem"],
                       "formats": [(np.uint8, 128 * len(MAP_NAMES)), np.int32, np.uint64],
                       "offsets": [0, 768, 776], "itemsize": 832})
DQ_SEM_OFFSET = ARGS_DTYPE.fields["dq_sem"][1]


def dq_writer_mode() -> int:
    """How the kernel source adds dQ (DMATTN_NVRTC_DEFINES; bwd.cu's default is 2): 0 each
    consumer warp's lane 0 (``DM_SM90_BWD_DQ_WRITER=0``), 2 the producer's dQ writer warp by
    one tensor reduce per tile (through the dqa map); the A/B variant ``DM_SM90_BWD_DQ_ATOMIC=1``
    overrides them (0). bwd.cu's kSm90BwdDqWriter."""
    mode = env.nvrtc_define_int("DM_SM90_BWD_DQ_WRITER", 2)
    if mode not in (0, 2):
        raise ValueError(f"DMATTN_NVRTC_DEFINES: DM_SM90_BWD_DQ_WRITER={mode}; accepted: 0 or 2 "
                         "(1, one bulk add per row, was removed)")
    if env.nvrtc_define_int("DM_SM90_BWD_DQ_ATOMIC", 0) != 0:
        return 0
    return mode


def dq_writer() -> bool:
    """Whether the kernel has the dQ writer warp and its ring: bwd.cu's kSm90BwdDqWriter."""
    return dq_writer_mode() != 0


def dq_tile_row_bytes(head_dim: int) -> int:
    """A row of the writer's staged dQ tile: head_dim fp32 + 32 bytes of bank padding."""
    return (head_dim + 8) * 4


def dq_slot_bytes(head_dim: int) -> int:
    """One writer slot (Sm90BwdSmem::kDQSlot): BLOCK_M padded rows."""
    return BLOCK_M * dq_tile_row_bytes(head_dim)


def dq_slots(head_dim: int, bias_tile: bool, writer: bool, one: bool | None = None) -> int:
    """Slots of the writer's dQ ring (Sm90BwdSmem::kDqSlots): 2, or 1 where two do not fit
    (d128 with a bias tile; a key-row bias has no tile) or everywhere with ``one``
    (``DM_SM90_BWD_DQ_SLOTS=1``; None: as DMATTN_NVRTC_DEFINES says); 0 without the writer."""
    if not writer:
        return 0
    if one is None:
        one = env.nvrtc_define_int("DM_SM90_BWD_DQ_SLOTS", 2) == 1
    return 1 if one or (head_dim == 128 and bias_tile) else 2


def padded_head_dim(d: int) -> int:
    """The specialized head dim that serves ``d`` (TMA zero-fills the columns past ``d``)."""
    for hd in HEAD_DIMS:
        if d <= hd:
            return hd
    raise ValueError(f"head dim must be <= {HEAD_DIMS[-1]} for the sm_90a backward, got {d}")


def smem_bytes(head_dim: int, bias_tile: bool, has_mask: bool = False,
               writer: bool | None = None) -> int:
    """Dynamic shared memory of one instance: Sm90BwdSmem<...>::kAlloc in sm90/bwd.cu;
    ``bias_tile``: a full bias tile per stage (a key-row bias has none); ``writer``: built with
    the dQ writer (None: as DMATTN_NVRTC_DEFINES says)."""
    if writer is None:
        writer = dq_writer()
    boxes = head_dim // 64
    kv = boxes * BLOCK_N * 128
    q = boxes * BLOCK_M * 128
    bias = BLOCK_M * BLOCK_N * 2 if bias_tile else 0
    ds = 64 * BLOCK_M * 2
    slots = dq_slots(head_dim, bias_tile, writer)
    # fp32 dQ staging of the bulk reduce-add: the writer's ring of whole tiles, or per warp
    dq = slots * dq_slot_bytes(head_dim) if writer else boxes * 4 * DQ_WARP_BYTES
    mask = STAGES * (BLOCK_N * 8 + 2 * 4) if has_mask else 0  # query words per key, 2 flags
    bars = 8 * (1 + 2 * STAGES + 2 * slots)
    # the deterministic mode's CTA position, the writer's skip words; per stage its item,
    # the walk's previous head and the turn target
    ticket = 16 + 16 * STAGES
    head = 2 * kv + STAGES * (2 * q + bias)
    tail = dq + 2 * STAGES * BLOCK_M * 4 + mask + bars + ticket
    # one dS^T buffer: both consumers' halves; 1024: the run-time alignment of the base
    return head + 2 * ds + tail + 1024


def semaphore_words(batch: int, heads: int, seqlen_q: int) -> int:
    """int32 words of the deterministic mode's zeroed counters: a CTA ticket, then one counter
    per (batch, head, query tile of BLOCK_M rows)."""
    return 1 + batch * heads * -(-seqlen_q // BLOCK_M)


def bias_mode(bias: ArrayInfo | None, batch: int, heads: int, seqlen_q: int,
              seqlen_k: int) -> int | None:
    """How the kernel reads a 4-D bias, or None when the kernel does not serve its shape: a full
    (B|1, H', Sq, Sk) tile or a key row (B|1, H', 1, Sk), H' dividing H (head h reads bias head
    h // (H / H')). The kernel writes each (batch, head)'s dbias once, without reductions
    across CTAs: a bias shared by the batch or by groups of heads gets its dbias in a buffer of
    the widened shape, summed afterwards (``widened_dbias``)."""
    if bias is None:
        return BIAS_NONE
    nb, nh, nq, nk = bias.shape
    if nb not in (1, batch) or nh < 1 or heads % nh or nk != seqlen_k:
        return None
    if nq == 1:
        return BIAS_KEY_ROW
    return BIAS_TILE if nq == seqlen_q else None


def widened_dbias(bias_shape: tuple[int, ...], batch: int, heads: int
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The dbias buffer the kernel writes for a bias of ``bias_shape`` (B, H, ..: one slice per
    batch and head it runs), the view of it that puts each bias head's group of heads on an
    axis of its own (B, H', H / H', ..), and the axes of that view to sum over (in a fixed
    order) to get back to the bias's shape: the batch where the bias is shared by it, the
    group where a bias head serves several heads."""
    nb, nh, rest = bias_shape[0], bias_shape[1], tuple(bias_shape[2:])
    axes = ((0,) if nb != batch else ()) + ((2,) if nh != heads else ())
    return (batch, heads) + rest, (batch, nh, heads // nh) + rest, axes


def _qkv_map(info: ArrayInfo, rows_box: int) -> TensorMapSpec:
    b, s, h, d = info.shape
    sb, ss, sh, _ = info.strides
    if info.shape[-1] > 1 and info.strides[-1] != 1:
        raise TensorMapError(f"head dim must be contiguous, got stride {info.strides[-1]}")
    return TensorMapSpec(2, (d, s, h, b), (dim_stride(s, ss, 2), dim_stride(h, sh, 2),
                                          dim_stride(b, sb, 2)), (64, rows_box, 1, 1), 128)


def _bias_tile_map(info: ArrayInfo) -> TensorMapSpec:
    """(keys, queries, heads, batch) boxes of 64 keys x 64 query rows, 128B swizzle."""
    nb, nh, nq, nk = info.shape
    sb, sh, sq, sk = info.strides
    if sk != 1:
        raise TensorMapError(f"keys must be contiguous, got stride {sk}")
    return TensorMapSpec(2, (nk, nq, nh, nb), (dim_stride(nq, sq, 2), dim_stride(nh, sh, 2),
                                              dim_stride(nb, sb, 2)), (64, BLOCK_M, 1, 1), 128)


def _dq_accum_map(q: ArrayInfo) -> TensorMapSpec:
    """fp32 (cols, rows, heads, batch) over dq_accum (q's shape, contiguous) with the box of a
    writer slot: padded_head_dim + 8 columns (the bank padding and any head-dim padding lie
    past the head dim: out of bounds, never written) x BLOCK_M rows."""
    b, s, h, d = q.shape
    return TensorMapSpec(4, (d, s, h, b), (dim_stride(s, h * d, 4), dim_stride(h, d, 4),
                                          dim_stride(b, s * h * d, 4)),
                         (padded_head_dim(d) + 8, BLOCK_M, 1, 1), 0, float32=True)


def plan_maps(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, dout: ArrayInfo,
              bias: ArrayInfo | None, mode: int,
              dq_tensor: bool | None = None) -> dict[str, TensorMapSpec | None]:
    """The tensor maps of a problem, or TensorMapError when one cannot be encoded;
    ``dq_tensor``: with the dqa map (None: when ``dq_writer_mode`` is 2)."""
    if dq_tensor is None:
        dq_tensor = dq_writer_mode() == 2
    maps: dict[str, TensorMapSpec | None] = {
        "q": _qkv_map(q, BLOCK_M), "k": _qkv_map(k, BLOCK_N), "v": _qkv_map(v, BLOCK_N),
        "dout": _qkv_map(dout, BLOCK_M),
        "bias": _bias_tile_map(bias) if mode == BIAS_TILE and bias is not None else None,
        "dqa": _dq_accum_map(q) if dq_tensor else None}
    for spec in maps.values():
        if spec is not None:
            spec.check()
    return maps


MAX_GRID_YZ = 65535


def sparse_fits(sparse: bool | tuple[int, int], sparse_partial: bool = False) -> bool:
    """Whether the kernel walks these block lists: none (False), or, unless
    ``DMATTN_SM90_BWD_SPARSE=0``, lists (of full blocks, or with partial ones: element bits,
    a MixedMask's) of a (block_m, block_n) that tiles the 64 x 128 items; True (lists of an
    unknown block size) is declined."""
    if sparse is False:
        return True
    if sparse is True or not env.sm90_bwd_sparse():
        return False
    bm, bn = sparse
    return bm > 0 and bn > 0 and bm % BLOCK_M == 0 and bn % BLOCK_N == 0


def spec_has_mask(has_mask: bool, sparse_partial: bool) -> bool:
    """Whether the kernel has the mask warps and words: a dense mask, or block lists whose
    partial blocks' bits they read (the listed-bits specs)."""
    return has_mask or sparse_partial


def accepts(head_dim: int, dtype: str, q: ArrayInfo, k: ArrayInfo, v: ArrayInfo,
            dout: ArrayInfo, bias: ArrayInfo | None, has_mask: bool, varlen: bool,
            deterministic: bool, sparse: bool | tuple[int, int], batch: int, heads: int,
            kv_heads: int, seqlen_q: int, seqlen_k: int, smem_limit: int = SMEM_LIMIT,
            sparse_partial: bool = False) -> bool:
    """Whether the Hopper backward serves this problem (pure). ``has_mask``: a dense bool mask
    (any broadcast; validated before) is always taken; ``deterministic`` too. ``sparse``:
    False, or the block lists' (block_m, block_n) (``sparse_fits``); lists with partial blocks
    (``sparse_partial``) run on a listed-bits spec (``spec_has_mask``), not beside a mask."""
    if varlen or head_dim > HEAD_DIMS[-1] or not sparse_fits(sparse, sparse_partial):
        return False
    if sparse_partial and has_mask:  # the mask warps read either a mask's bytes or the bits
        return False
    if seqlen_q < 1 or seqlen_k < 1 or batch > MAX_GRID_YZ or kv_heads > MAX_GRID_YZ:
        return False
    mode = bias_mode(bias, batch, heads, seqlen_q, seqlen_k)
    if mode is None or (bias is not None and bias.dtype != dtype):
        return False
    hd = padded_head_dim(head_dim)
    if smem_bytes(hd, mode == BIAS_TILE, spec_has_mask(has_mask, sparse_partial)) > smem_limit:
        return False
    infos = [q, k, v, dout] + ([bias] if bias is not None else [])
    if any(info.ptr % 16 for info in infos):
        return False
    try:
        plan_maps(q, k, v, dout, bias, mode)
    except TensorMapError:
        return False
    return True


def build_args(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, dout: ArrayInfo,
               bias: ArrayInfo | None, mode: int, dq_sem: int = 0,
               dq_accum: int = 0) -> np.ndarray:
    """The one-element Sm90BwdArgs record (maps encoded by the driver); ``dq_sem``: the
    deterministic mode's zeroed counters (``semaphore_words`` int32), 0 for the default mode;
    ``dq_accum``: the fp32 accumulator (q's shape, contiguous) the dqa map spans (encoded when
    ``dq_writer_mode`` is 2)."""
    maps = plan_maps(q, k, v, dout, bias, mode)
    ptrs = {"q": q.ptr, "k": k.ptr, "v": v.ptr, "dout": dout.ptr,
            "bias": None if bias is None else bias.ptr, "dqa": dq_accum}
    rec = np.zeros(1, dtype=ARGS_DTYPE)
    raw = bytearray(128 * len(MAP_NAMES))
    for i, name in enumerate(MAP_NAMES):
        spec = maps[name]
        if spec is not None and ptrs[name] is not None:
            raw[128 * i:128 * (i + 1)] = encode(spec, ptrs[name])
    rec["maps"][0] = np.frombuffer(bytes(raw), dtype=np.uint8)
    rec["bias_mode"] = mode
    rec["dq_sem"] = dq_sem
    return rec


def address_slots(q: ArrayInfo, k: ArrayInfo, v: ArrayInfo, dout: ArrayInfo,
                  bias: ArrayInfo | None, mode: int) -> tuple[tuple[str, int], ...] | None:
    """(operand, byte offset in the Sm90BwdArgs record) of each encoded map's global address,
    so a cached record is reused for new pointers of the same layout by patching them; None
    when the driver's map layout does not allow it (the call is then planned every time)."""
    maps = plan_maps(q, k, v, dout, bias, mode)
    present = {"q": q, "k": k, "v": v, "dout": dout, "bias": bias, "dqa": q}
    return record_slots({n: m for n, m in maps.items() if present[n] is not None}, MAP_NAMES)
