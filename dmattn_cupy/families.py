"""The table of kernel families: one row per templated ``__global__`` the package launches.

A row says what the code is (source under cuda_src/, kernel template, the ``KernelSpec``
fields that are its template arguments, in order, the params struct it reads, the cubin target,
the dynamic shared memory and threads of a spec) and, for the ``forward`` role, when it is
chosen (``accepts``), its tiles in order of preference (``tiles``; ``select`` takes the
first that fits the device's shared memory) and any kernel parameters after the params
record (``extra_args``). Adding a family is adding a row (and its source).

Targets: ``sm_80`` is portable (built for each device's own ``sm_XY``, compute capability
>= 8.0); an arch-specific target such as ``sm_90a`` is built as is and runs on exactly that
compute capability. Where several forward rows accept a problem, the most specific wins.

``sparse`` (forward rows' ``accepts`` and ``tiles``): False, True (block lists of an unknown
block size) or the lists' ``(block_m, block_n)``, which decides whether a row's tiles fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import backward_sm90, env, forward_sm90
from .arrays import ArrayInfo
from .device import DeviceProps, parse_arch
from .validate import Problem


class SpecShape(Protocol):
    """What a row's formulas read of a ``KernelSpec`` (spec.py imports this module)."""
    head_dim: int
    block_m: int
    block_n: int
    num_warps: int
    stages: int
    has_mask: bool
    has_bias: bool
    bias_key_row: bool


HEAD_DIMS = (32, 64, 96, 128, 192, 256)


def padded_head_dim(d: int) -> int:
    """Smallest specialized head dim >= ``d`` (the kernel zero-fills the padding)."""
    for hd in HEAD_DIMS:
        if d <= hd:
            return hd
    raise ValueError(f"head dim must be <= {HEAD_DIMS[-1]}, got {d}")


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    stages: int = 1
    head_dim: int | None = None  # the specialized head dim; None: padded_head_dim(problem's)
    bias_key_row: bool = False   # a spec whose bias stages hold one key row (fwd_sm90's _krow)


def _warps_x32(s: SpecShape) -> int:
    return 32 * s.num_warps


SparseArg = bool | tuple[int, int]   # no lists / lists / lists of this (block_m, block_n)


def _never(pb: Problem, dev: DeviceProps, sparse: SparseArg) -> bool:
    return False


def _no_tiles(pb: Problem, sparse: SparseArg) -> tuple[Tile, ...]:
    return ()


def _no_extra_args(pb: Problem, out: ArrayInfo, spec: SpecShape) -> tuple[Any, ...]:
    return ()


def _no_extra_slots(pb: Problem, spec: SpecShape) -> tuple[tuple[str, int, int], ...] | None:
    return ()


def _no_counter(spec: SpecShape) -> tuple[int, int] | None:
    return None


def _grid_m_h_b(pb: Problem, spec: SpecShape, sm_count: int) -> tuple[int, int, int]:
    """(query tiles, heads, batch)."""
    return max(1, -(-pb.seqlen_q // spec.block_m)), pb.heads, pb.batch


@dataclass(frozen=True)
class Family:
    name: str                             # KernelSpec.family and the first word of its id
    source: str                           # path under cuda_src/
    kernel: str                           # the templated __global__, namespace included
    template_args: tuple[str, ...]        # KernelSpec fields, in the template's order
    params: str                           # the struct the kernel reads: FwdParams | BwdParams
    arch: str                             # cubin target: "sm_80" (portable) | "sm_90a" | ...
    smem: Callable[[SpecShape], int]            # dynamic shared memory bytes of a spec
    threads: Callable[[SpecShape], int] = _warps_x32
    role: str = ""                        # "forward": chosen by select.forward
    accepts: Callable[[Problem, DeviceProps, SparseArg], bool] = _never  # (problem, dev, sparse)
    tiles: Callable[[Problem, SparseArg], tuple[Tile, ...]] = _no_tiles  # (problem, sparse)
    # kernel parameters after the params record, as NumPy records (e.g. a 64-byte aligned
    # struct of CUDA tensor maps passed as ``const __grid_constant__``): (problem, out, spec)
    extra_args: Callable[[Problem, ArrayInfo, SpecShape], tuple[Any, ...]] = _no_extra_args
    # forward role: (problem, spec, the device's SM count)
    grid: Callable[[Problem, SpecShape, int], tuple[int, int, int]] = _grid_m_h_b
    # where pointers sit inside ``extra_args``: (operand "q".."bias", extra arg index, byte
    # offset), so a cached launch patches them; None: the extra args are rebuilt per call
    extra_slots: Callable[[Problem, SpecShape], tuple[tuple[str, int, int], ...] | None] = \
        _no_extra_slots
    # switches the kernel reads at run time (params fields), not template arguments
    runtime_switches: tuple[str, ...] = ()
    # forward role: a work counter the kernel claims items from and leaves zero (launch_plan's
    # ``Alloc.counter``): (extra arg index, byte offset) of its pointer, or None: none needed
    counter_slot: Callable[[SpecShape], tuple[int, int] | None] = _no_counter

    @property
    def min_cc(self) -> tuple[int, int]:
        return parse_arch(self.arch)[0]

    @property
    def arch_specific(self) -> bool:
        return parse_arch(self.arch)[1]

    def runs_on(self, cc: tuple[int, int]) -> bool:
        return cc == self.min_cc if self.arch_specific else cc >= self.min_cc

    def target_for(self, arch: str) -> str | None:
        """The cubin target of this family for a device class ``arch`` (``sm_86``...), or
        None when its kernels do not run there."""
        cc, _ = parse_arch(arch)
        if not self.runs_on(cc):
            return None
        return self.arch if self.arch_specific else f"sm_{cc[0]}{cc[1]}"


# --- shared-memory formulas (bytes); each mirrors its kernel's layout -------------------------

def decode_stages(spec_stages: int) -> int:
    """K/V pipeline depth of a decode spec (cuda_src/sm80/fwd_decode.cu, ``decode_stages``):
    ``spec_stages`` where it is >= 2, else (KernelSpec's default 1) the default depth: 2 (at
    d <= 128 three CTAs share an SM), or N under the A/B define ``DM_DECODE_STAGES=N`` in
    DMATTN_NVRTC_DEFINES."""
    if spec_stages >= 2:
        return spec_stages
    for d in env.nvrtc_defines():
        name, _, val = d.partition("=")
        if name == "DM_DECODE_STAGES" and val.isdigit() and int(val) > 0:
            return int(val)
    return 2


def _smem_fwd_mma(s: SpecShape) -> int:
    """fwd_mma.cu: Q | K x2 | V x2 | bias x2 | mask; Q/K/V and bias rows padded by 8
    elements, mask rows by 16 bytes."""
    stride = s.head_dim + 8
    elems = s.block_m * stride + 4 * s.block_n * stride
    if s.has_bias:
        elems += 2 * s.block_m * (s.block_n + 8)
    return 2 * elems + (s.block_m * (s.block_n + 16) if s.has_mask else 0)


DECODE_BT_SLOTS = 8     # fwd_decode.cu kDecodeBtSlots: block-table ring, 4 page ids a tile
DECODE_MAX_SLOTS = 16   # staged mask/bias rows per tensor at most (one per packed row)


def decode_kv_stride(head_dim: int) -> int:
    """Elements per K/V stage row of fwd_decode.cu (``kKVStride``): unpadded where the rows are
    swizzled (head dims of whole 128-byte chunk groups, unless ``DM_DECODE_SWIZZLE=0`` in
    DMATTN_NVRTC_DEFINES), else padded by 8."""
    if head_dim % 64 == 0 and env.nvrtc_define_int("DM_DECODE_SWIZZLE", 1) != 0:
        return head_dim
    return head_dim + 8


def decode_smem(s: SpecShape, mask_rows: int, bias_rows: int) -> int:
    """fwd_decode.cu: Q slab (rows padded by 8) + kStages K and V tiles (decode_kv_stride), the
    block-table ring, the staged rows' offsets (2 x 16 int64), then per stage ``mask_rows`` +
    ``bias_rows`` staged rows of block_n 32-bit words (the launch passes its own counts; see
    decode.staged_rows)."""
    st = decode_stages(s.stages)
    kv = 2 * st * s.block_n * decode_kv_stride(s.head_dim)
    base = (s.block_m * (s.head_dim + 8) + kv) * 2 + DECODE_BT_SLOTS * 16 + 256
    rows = (mask_rows if s.has_mask else 0) + (bias_rows if s.has_bias else 0)
    return base + st * rows * s.block_n * 4


def _smem_decode(s: SpecShape) -> int:
    """The most a decode spec can be launched with (16 staged rows per tensor)."""
    return decode_smem(s, DECODE_MAX_SLOTS, DECODE_MAX_SLOTS)


def _smem_none(s: SpecShape) -> int:
    return 0


def _smem_bwd_dkdv(s: SpecShape) -> int:
    """bwd.cu dK/dV: Q, dO (x stages), K, V; P, dS; lse, dsum (x stages); bias fp32 + raw
    16-bit (x stages)."""
    m, n, row = s.block_m, s.block_n, (s.head_dim + 8) * 2
    bias = m * (n + 8) * 4 if s.has_bias else 0
    st = 2 if s.head_dim <= 128 else 1
    raw = st * m * (n + 8) * 2 if s.has_bias else 0
    return (2 * m * st + 2 * n) * row + 2 * m * (n + 8) * 2 + 2 * m * 4 * st + bias + raw


def _smem_bwd_dq(s: SpecShape) -> int:
    """bwd.cu dQ: Q, dO, K, V; bias tile."""
    m, n, row = s.block_m, s.block_n, (s.head_dim + 8) * 2
    return (2 * m + 2 * n) * row + (m * (n + 8) * 4 if s.has_bias else 0)


# --- forward tiles of fwd_mma: tables, first matching row wins ------------------------------
# (head dims, mask, bias, varlen) -> Tile; None matches either value. 4 warps x 128 rows (two
# m16 slabs per warp) is the fastest shape measured but register-hungry: it is used where it
# compiles without spills on sm_80 and sm_90 (precompile --check-spills); elsewhere 8 warps.

_ANY = None
_MMA_DENSE_TILES: tuple[tuple[tuple[int, ...], bool | None, bool | None, bool | None, Tile],
                        ...] = (
    ((32,), _ANY, _ANY, _ANY, Tile(128, 64, 4)),
    ((64,), _ANY, _ANY, _ANY, Tile(128, 32, 4)),
    ((96,), False, _ANY, _ANY, Tile(128, 32, 4)),
    ((128,), False, False, False, Tile(128, 32, 4)),
    ((96, 128), _ANY, _ANY, _ANY, Tile(128, 64, 8)),
    ((192,), _ANY, _ANY, _ANY, Tile(128, 32, 8)),
    ((256,), False, False, _ANY, Tile(128, 32, 8)),
    ((256,), _ANY, _ANY, _ANY, Tile(128, 16, 8)),
)
# Block-sparse lists: 64-row tiles, so that 64-row mask blocks fit.
_MMA_SPARSE_TILES: tuple[tuple[tuple[int, ...], bool | None, bool | None, bool | None, Tile],
                         ...] = (
    ((32, 64, 96, 128), _ANY, _ANY, _ANY, Tile(64, 64, 4)),
    ((192,), True, True, _ANY, Tile(64, 16, 4)),
    ((192,), _ANY, _ANY, _ANY, Tile(64, 32, 4)),
    ((256,), _ANY, _ANY, _ANY, Tile(64, 16, 4)),
)


def lookup_tile(table: tuple, head_dim: int, has_mask: bool, has_bias: bool,
                varlen: bool) -> Tile:
    """The first row of ``table`` matching (head_dim, has_mask, has_bias, varlen)."""
    for dims, mask, bias, vl, tile in table:
        if head_dim in dims and mask in (None, has_mask) and bias in (None, has_bias) \
                and vl in (None, varlen):
            return tile
    raise ValueError(f"no tile for head_dim={head_dim} mask={has_mask} bias={has_bias} "
                     f"varlen={varlen}")


def sparse_supported(head_dim: int, has_mask: bool, has_bias: bool) -> bool:
    """Block lists + attn_mask at head dim 256 spill registers (ptxas, NVRTC 12 and 13)."""
    return not (head_dim > 192 and has_mask)


def _mma_accepts(pb: Problem, dev: DeviceProps, sparse: SparseArg) -> bool:
    return True  # the portable forward takes every problem


def _mma_tiles(pb: Problem, sparse: SparseArg) -> tuple[Tile, ...]:
    """The table's tile, then 64-row tiles for devices with less shared memory per block.
    ``DMATTN_FWD_TILE=MxNxW`` overrides (tuning)."""
    forced = env.fwd_tile_override()
    if forced is not None:
        return (Tile(*forced),)
    from_table = lookup_tile(_MMA_SPARSE_TILES if sparse else _MMA_DENSE_TILES,
                             padded_head_dim(pb.head_dim), pb.mask is not None,
                             pb.bias is not None, pb.varlen)
    smaller = tuple(Tile(64, n, 4) for n in (64, 32, 16) if n <= from_table.block_n)
    return (from_table,) + smaller


# --- the Hopper forward (sm90/fwd.cu; host half in forward_sm90) -----------------------------

def _sm90_accepts(pb: Problem, dev: DeviceProps, sparse: SparseArg) -> bool:
    items = -(-pb.seqlen_q // forward_sm90.BLOCK_M) * pb.heads * pb.batch
    if items > forward_sm90.MAX_ITEMS:
        return False
    return forward_sm90.tile_for(pb.head_dim, pb.q, pb.k, pb.v, pb.mask, pb.bias, pb.seqlen_q,
                                 pb.seqlen_k, dev.smem_per_block, varlen=pb.varlen,
                                 sparse=sparse) is not None


def _sm90_tiles(pb: Problem, sparse: SparseArg) -> tuple[Tile, ...]:
    hd = forward_sm90.padded_head_dim(pb.head_dim)
    tile = forward_sm90.tile(hd, pb.mask is not None, pb.bias is not None)
    if tile is None:
        return ()
    return (Tile(forward_sm90.BLOCK_M, tile[0], forward_sm90.THREADS // 32, stages=tile[1],
                 head_dim=hd,
                 bias_key_row=forward_sm90.key_row_spec(pb.mask, pb.bias, pb.varlen)),)


def _sm90_smem(s: SpecShape) -> int:
    return forward_sm90.smem_bytes(s.head_dim, s.block_n, s.stages, s.has_mask, s.has_bias,
                                   s.bias_key_row)


def _sm90_args(pb: Problem, out: ArrayInfo, spec: SpecShape) -> tuple[Any, ...]:
    """Sm90FwdArgs; a mask beside a spec without mask tiles is read by the pack warps
    (forward.py's route for it: OPERAND_PACK_WARPS, no map)."""
    mask = pb.mask if spec.has_mask else None
    rec = forward_sm90.build_args(pb.q, pb.k, pb.v, mask, pb.bias, spec.block_n, pb.varlen)
    if pb.mask is not None and mask is None:
        rec["mask_mode"] = forward_sm90.OPERAND_PACK_WARPS
    return (rec[0],)


def _sm90_slots(pb: Problem, spec: SpecShape) -> tuple[tuple[str, int, int], ...] | None:
    mask = pb.mask if spec.has_mask else None
    slots = forward_sm90.address_slots(pb.q, pb.k, pb.v, mask, pb.bias, spec.block_n,
                                       pb.varlen)
    return None if slots is None else tuple((name, 0, off) for name, off in slots)


def _sm90_counter(spec: SpecShape) -> tuple[int, int] | None:
    """The dynamic scheduler's counter (DM_SM90_PERSISTENT=2) in Sm90FwdArgs."""
    off = forward_sm90.counter_offset()
    return None if off is None else (0, off)


def _sm90_grid(pb: Problem, spec: SpecShape, sm_count: int) -> tuple[int, int, int]:
    """Work items (query tile, head, batch), one CTA each or a persistent grid
    (forward_sm90.launch_ctas); the kernel numbers them longest first (or query tile fastest
    where all are equal: fwd.cu, DM_SM90_HEAD_MAJOR)."""
    items = max(1, -(-pb.seqlen_q // spec.block_m)) * pb.heads * pb.batch
    return forward_sm90.launch_ctas(items, sm_count), 1, 1


# --- the Hopper backward (sm90/bwd.cu; host half in backward_sm90, chosen by select) ----------

def _sm90_bwd_smem(s: SpecShape) -> int:
    return backward_sm90.smem_bytes(s.head_dim, s.has_bias and not s.bias_key_row, s.has_mask)


_SM90_FWD_ARGS = ("dtype", "head_dim", "block_n", "stages", "has_mask", "has_bias",
                  "bias_key_row", "debug_counters")

_SM80_ARGS = ("dtype", "head_dim", "block_m", "block_n", "num_warps", "has_mask", "has_bias",
              "varlen", "sparse", "debug_counters")
_SM80_DECODE_ARGS = _SM80_ARGS[:8]  # no block lists, no debug counters
_SM80_DECODE_STAGED_ARGS = _SM80_DECODE_ARGS + ("stages",)
_SM80_DKDV_ARGS = ("dtype", "head_dim", "block_m", "block_n", "num_warps", "has_mask",
                   "has_bias", "varlen", "deterministic")
_SM80_DQ_ARGS = _SM80_DKDV_ARGS[:8]  # deterministic mode only

FAMILY_ROWS: tuple[Family, ...] = (
    Family("fwd_mma", "sm80/fwd_mma.cu", "dm::flash_fwd_mma_kernel", _SM80_ARGS, "FwdParams",
           "sm_80", _smem_fwd_mma, role="forward", accepts=_mma_accepts, tiles=_mma_tiles),
    Family("fwd_sm90", "sm90/fwd.cu", "dm::flash_fwd_sm90_kernel", _SM90_FWD_ARGS, "FwdParams",
           "sm_90a", _sm90_smem, threads=lambda s: forward_sm90.THREADS, role="forward",
           accepts=_sm90_accepts, tiles=_sm90_tiles, extra_args=_sm90_args, grid=_sm90_grid,
           extra_slots=_sm90_slots, runtime_switches=("varlen", "sparse"),
           counter_slot=_sm90_counter),
    Family("fwd_decode", "sm80/fwd_decode.cu", "dm::flash_fwd_decode_kernel",
           _SM80_DECODE_STAGED_ARGS, "FwdParams", "sm_80", _smem_decode),
    Family("fwd_combine", "fwd_combine.cu", "dm::flash_fwd_combine_kernel",
           ("dtype", "head_dim", "num_warps"), "FwdParams", "sm_80", _smem_none),
    Family("fwd_row_bias", "fwd_row_bias.cu", "dm::flash_fwd_row_bias_kernel",
           ("dtype", "num_warps"), "FwdParams", "sm_80", _smem_none),
    Family("kv_append", "kv_append.cu", "dm::kv_append_kernel", ("num_warps",),
           "KvAppendParams", "sm_80", _smem_none),
    Family("row_pad", "row_pad.cu", "dm::row_pad_kernel", ("num_warps",), "RowPadParams",
           "sm_80", _smem_none),
    Family("mask_pack", "mask_pack.cu", "dm::mask_pack_kernel", ("num_warps",),
           "MaskPackParams", "sm_80", _smem_none),
    Family("mask_lists", "mask_pack.cu", "dm::mask_lists_kernel", ("num_warps",),
           "MaskListsParams", "sm_80", _smem_none),
    # (a MaskListsParams record after its MaskPackParams; its counts' shared memory is the
    # launch's: mask_pack.plan_lists)
    Family("mask_rows", "mask_pack.cu", "dm::mask_rows_kernel", ("num_warps",),
           "MaskPackParams", "sm_80", _smem_none),
    Family("bwd_pre", "sm80/bwd.cu", "dm::flash_bwd_pre_kernel", ("dtype", "num_warps", "varlen"),
           "BwdParams", "sm_80", _smem_none),
    Family("bwd_post", "sm80/bwd.cu", "dm::flash_bwd_post_kernel",
           ("dtype", "num_warps", "varlen"), "BwdParams", "sm_80", _smem_none),
    Family("bwd_dkdv", "sm80/bwd.cu", "dm::flash_bwd_dkdv_kernel", _SM80_DKDV_ARGS, "BwdParams",
           "sm_80", _smem_bwd_dkdv),
    Family("bwd_dq", "sm80/bwd.cu", "dm::flash_bwd_dq_kernel", _SM80_DQ_ARGS, "BwdParams",
           "sm_80", _smem_bwd_dq),
    Family("bwd_sm90", "sm90/bwd.cu", "dm::flash_bwd_sm90_kernel",
           ("dtype", "head_dim", "has_mask", "has_bias", "bias_key_row", "sparse"), "BwdParams",
           "sm_90a",
           _sm90_bwd_smem,
           threads=lambda s: backward_sm90.THREADS),
    Family("bwd_grid", "sm80/bwd.cu", "dm::flash_bwd_sparse_grid_kernel", ("num_warps",),
           "BwdParams", "sm_80", _smem_none),
    Family("bwd_order", "sm80/bwd.cu", "dm::flash_bwd_sparse_order_kernel", ("num_warps",),
           "BwdParams", "sm_80", _smem_none),
    Family("fwd_order", "sm90/fwd.cu", "dm::flash_fwd_sparse_order_kernel", ("num_warps",),
           "FwdParams", "sm_90a", _smem_none),
)

# The table every other module reads; tests may add a row to it.
FAMILIES: dict[str, Family] = {f.name: f for f in FAMILY_ROWS}
