"""Which kernel family and tile a problem gets on a device (pure: no GPU objects).

``forward`` reads the family table: among the rows of role ``forward`` whose kernels run on
the device's compute capability, whose template has the switches the problem needs (mask,
bias, varlen, block-sparse lists, debug counters) and that accept the problem (``accepts``:
layout, alignment, shared memory), the most specific target wins
(``sm_90a`` before the portable ``sm_80``, then table order); its first tile whose shared
memory fits the device is taken. The backward and decode plans are fixed per family; their
tall/short choices read the same ``DeviceProps``.
"""

from __future__ import annotations

import dataclasses

from . import backward_sm90, env
from .arrays import ArrayInfo
from .device import DeviceProps
from .families import FAMILIES, Family, SparseArg, padded_head_dim
from .spec import KernelSpec
from .validate import Problem

__all__ = ["backward", "backward_family", "backward_sm90_spec", "forward", "forward_family",
           "forward_spec", "spec_dtype", "supports"]


def spec_dtype(dtype: str) -> str:
    """'float16' / 'bfloat16' (or already 'fp16' / 'bf16') -> the spec's dtype name."""
    return "fp16" if dtype in ("float16", "fp16") else "bf16"


def supports(fam: Family, pb: Problem, sparse: SparseArg = False,
             debug_counters: bool = False) -> bool:
    """Whether ``fam``'s kernel has every switch the problem needs on (as a template argument
    or read at run time)."""
    needed = {"has_mask": pb.mask is not None, "has_bias": pb.bias is not None,
              "varlen": pb.varlen, "sparse": bool(sparse), "debug_counters": debug_counters}
    have = fam.template_args + fam.runtime_switches
    return all(name in have for name, on in needed.items() if on)


def forward_family(pb: Problem, dev: DeviceProps, sparse: SparseArg = False,
                   debug_counters: bool = False) -> Family:
    """The forward family for ``pb`` on ``dev``: the most specific row that runs there, has
    the switches the problem needs, and accepts it."""
    rows = [f for f in FAMILIES.values()
            if f.role == "forward" and f.runs_on(dev.cc)
            and supports(f, pb, sparse, debug_counters) and f.accepts(pb, dev, sparse)]
    forced = env.forward_family_override()
    if forced is not None:
        if forced not in FAMILIES or FAMILIES[forced].role != "forward":
            raise ValueError(f"DMATTN_FWD_FAMILY must be 'auto' or a forward family, got "
                             f"{forced!r}")
        rows = [f for f in rows if f.name == forced] or rows
    if not rows:
        raise NotImplementedError(f"no forward kernel family runs on compute capability "
                                  f"{dev.cc[0]}.{dev.cc[1]}; use backend='reference'")
    return max(rows, key=lambda f: (f.arch_specific, f.min_cc))  # max keeps table order on ties


def forward(pb: Problem, dev: DeviceProps, sparse: SparseArg = False,
            debug_counters: bool = False) -> KernelSpec:
    """The forward specialization of ``pb`` on ``dev``."""
    fam = forward_family(pb, dev, sparse, debug_counters)
    return forward_spec(fam, pb, dev, sparse, debug_counters)


def forward_spec(fam: Family, pb: Problem, dev: DeviceProps, sparse: SparseArg = False,
                 debug_counters: bool = False) -> KernelSpec:
    """``fam``'s specialization of ``pb`` on ``dev``: its first tile that fits
    ``dev.smem_per_block`` (its last tile when none does: the launch then refuses it).
    ``sparse``: False, True or the block lists' (block_m, block_n). Switches the family reads
    at run time are not part of the spec."""
    arch = fam.target_for(dev.arch)
    if arch is None:
        raise ValueError(f"family {fam.name!r} ({fam.arch}) does not run on {dev.arch}")
    spec = None
    for tile in fam.tiles(pb, sparse):
        spec = KernelSpec(family=fam.name, dtype=spec_dtype(pb.dtype),
                          head_dim=tile.head_dim or padded_head_dim(pb.head_dim),
                          block_m=tile.block_m,
                          block_n=tile.block_n, num_warps=tile.num_warps, stages=tile.stages,
                          has_mask=pb.mask is not None, has_bias=pb.bias is not None,
                          bias_key_row=tile.bias_key_row,
                          varlen=pb.varlen and "varlen" in fam.template_args,
                          sparse=bool(sparse) and "sparse" in fam.template_args,
                          debug_counters=debug_counters,
                          arch=arch)
        if spec.dynamic_smem <= dev.smem_per_block:
            break
    if spec is None:
        raise ValueError(f"family {fam.name!r} lists no tiles")
    return spec


def backward(dtype: str, head_dim: int, has_mask: bool, has_bias: bool, varlen: bool,
             deterministic: bool, sparse: bool, dev: DeviceProps
             ) -> tuple[KernelSpec, KernelSpec, KernelSpec | None, KernelSpec | None,
                        KernelSpec]:
    """(preprocess, dK/dV, dQ or None, sparse grid or None, dQ cast) specs for a problem; the
    cast (dq_accum -> dq) runs wherever dQ goes through the fp32 workspace, the portable
    deterministic mode excepted (its dQ kernel writes dq). A block-sparse mask runs the
    has_mask kernels (its grid is read at run time). Without mask or bias the
    dK/dV kernel takes 128 query rows per step (half the barriers and Q/dO tile switches per
    FLOP) where its 208 KB of shared memory fit ``dev.smem_per_block``."""
    dt, hd, arch = spec_dtype(dtype), padded_head_dim(head_dim), dev.arch
    pre = KernelSpec(family="bwd_pre", dtype=dt, head_dim=128, block_m=8, block_n=32,
                     num_warps=8, varlen=varlen, arch=arch)
    common = dict(dtype=dt, head_dim=hd, block_m=64, block_n=64 if hd <= 128 else 32,
                  has_mask=has_mask or sparse, has_bias=has_bias, varlen=varlen, arch=arch)
    dkdv = KernelSpec(family="bwd_dkdv", num_warps=8, deterministic=deterministic, **common)
    if not (has_mask or has_bias or sparse) and hd <= 128:
        tall = dataclasses.replace(dkdv, block_m=128)
        if tall.dynamic_smem <= dev.smem_per_block:
            dkdv = tall
    dq = KernelSpec(family="bwd_dq", num_warps=4, **common) if deterministic else None
    grid = (KernelSpec(family="bwd_grid", dtype=dt, head_dim=128, block_m=8, block_n=32,
                       num_warps=4, arch=arch) if sparse else None)
    return pre, dkdv, dq, grid, dataclasses.replace(pre, family="bwd_post")


def backward_family(pb: Problem, dout: ArrayInfo, deterministic: bool, sparse: SparseArg,
                    dev: DeviceProps, sparse_partial: bool = False) -> str:
    """``bwd_sm90`` (the Hopper backward) on compute capability 9.0 wherever it takes the
    problem (backward_sm90.accepts), else ``bwd_dkdv`` (the portable kernels of ``backward``).
    ``DMATTN_BWD_FAMILY=bwd_dkdv`` keeps the portable kernels everywhere. ``dout``: the
    incoming gradient as the kernel reads it; ``sparse``: False or the block lists'
    (block_m, block_n) (``sparse_partial``: they carry element bits)."""
    if env.backward_family_override() == "bwd_dkdv":
        return "bwd_dkdv"
    if not FAMILIES["bwd_sm90"].runs_on(dev.cc):
        return "bwd_dkdv"
    ok = backward_sm90.accepts(pb.head_dim, pb.dtype, pb.q, pb.k, pb.v, dout, pb.bias,
                               pb.mask is not None, pb.varlen, deterministic, sparse, pb.batch,
                               pb.heads, pb.kv_heads, pb.seqlen_q, pb.seqlen_k,
                               dev.smem_per_block, sparse_partial)
    return "bwd_sm90" if ok else "bwd_dkdv"


def backward_order_spec(arch: str = "sm_80") -> KernelSpec:
    """The block lists' longest-first order of the Hopper backward's CTAs (sm80/bwd.cu
    flash_bwd_sparse_order_kernel: one CTA of 1024 threads, 8 per CTA ranked, per group of 128
    CTAs; arch-neutral)."""
    return KernelSpec(family="bwd_order", block_m=1, block_n=1, num_warps=32, arch=arch)


def forward_order_spec() -> KernelSpec:
    """The block lists' longest-first order of the Hopper forward's work items (sm90/fwd.cu
    flash_fwd_sparse_order_kernel: one CTA of 128 threads per group of 128 items)."""
    return KernelSpec(family="fwd_order", block_m=1, block_n=1, num_warps=4)


def backward_sm90_spec(dtype: str, head_dim: int, has_mask: bool, has_bias: bool,
                       bias_key_row: bool = False, listed_bits: bool = False) -> KernelSpec:
    """The Hopper backward's specialization (dtype x padded head dim x mask x bias: none, a
    full tile or a key row); the deterministic mode is a runtime field (Sm90BwdArgs::dq_sem).
    ``listed_bits``: block lists with partial blocks and no mask (the spec's ``sparse``: a mask
    spec whose mask warps read the blocks' element bits)."""
    return KernelSpec(family="bwd_sm90", dtype=spec_dtype(dtype),
                      head_dim=backward_sm90.padded_head_dim(head_dim),
                      block_m=backward_sm90.BLOCK_M, block_n=backward_sm90.BLOCK_N,
                      num_warps=backward_sm90.THREADS // 32,
                      has_mask=backward_sm90.spec_has_mask(has_mask, listed_bits),
                      has_bias=has_bias, bias_key_row=has_bias and bias_key_row,
                      sparse=listed_bits)
