"""A bias broadcast over keys on the Hopper forward (cuda_src/fwd_row_bias.cu).

A bias of one value per query row ((B|1, H|1, Sq|1, 1), or a scalar) moves every logit of its
row by the same amount, which softmax does not see: the forward runs without it (the Hopper
family takes that problem; it declines the bias itself, ``forward_sm90.tile_for``), and one
small launch after it adds the row's value to lse and handles the values that are not a plain
shift (NaN, +-inf, below LOWEST_LOGIT: the kernel's comment). Behind ``DMATTN_FWD_ROW_BIAS``
(on by default: tests/gpu/test_row_bias.py); dense problems only, block lists beside them
included. The same switch lets the Hopper backward run without such a bias, on lse minus it
(``backward.backward_call``).
"""

from __future__ import annotations

import dataclasses

from . import env, forward_sm90, runtime
from .arrays import ArrayInfo
from .device import DeviceProps
from .families import SparseArg
from .launch_plan import Launch, Plan
from .layout import build_fwd_params, fwd_pointer_fields
from .select import forward as select_forward
from .select import spec_dtype
from .spec import DTYPES, KernelSpec
from .validate import Problem

ROW_BIAS_WARPS = 4   # 128 rows per CTA, one thread each


def row_bias_spec(dtype: str, arch: str = "sm_80") -> KernelSpec:
    return KernelSpec(family="fwd_row_bias", dtype=dtype, block_m=1, block_n=1,
                      num_warps=ROW_BIAS_WARPS, arch=arch)


def all_row_bias_specs(arch: str = "sm_80") -> list[KernelSpec]:
    return [row_bias_spec(dt, arch) for dt in DTYPES]


def has_row_bias(pb: Problem) -> bool:
    """``DMATTN_FWD_ROW_BIAS=1`` and a dense problem whose bias is one value per query row (key
    dim 1, a scalar too): the Hopper kernels may run without it, forward (``shifts_bias``) and
    backward (``backward.backward_call``'s unshift)."""
    return pb.bias is not None and not pb.varlen and env.fwd_row_bias() \
        and forward_sm90.operand_mode(pb.bias) == forward_sm90.OPERAND_QUERY_ROW


def shifts_bias(pb: Problem, dev: DeviceProps, sparse: SparseArg = False) -> bool:
    """Whether the forward of ``pb`` (broadcasts collapsed) runs without its bias and shifts lse
    by it afterwards: ``has_row_bias``, the Hopper family for the problem without the bias and
    not with it (``sparse``: block lists' (block_m, block_n), as the selection is told)."""
    if not has_row_bias(pb):
        return False
    return select_forward(dataclasses.replace(pb, bias=None), dev, sparse).family == "fwd_sm90" \
        and select_forward(pb, dev, sparse).family != "fwd_sm90"


def grid(pb: Problem) -> tuple[int, int, int]:
    rows = pb.batch * pb.heads * pb.seqlen_q
    return -(-rows // (32 * ROW_BIAS_WARPS)), 1, 1


def add_launch(plan: Plan, pb: Problem, out: ArrayInfo, lse_ptr: int,
               renames: dict[str, str], out_names: tuple[str, ...]) -> None:
    """Appends the shift of ``pb``'s bias to ``plan``, after the forward's launch. ``pb``: the
    forward's problem with the bias put back (``shifts_bias`` held for it). The record is the
    forward's (every pointer slotted as the forward's is, ``renames``: padded copies) with the
    bias; the kernel reads the bias, out and lse of it."""
    rec = build_fwd_params(pb, out, lse_ptr)
    for name, field in fwd_pointer_fields(pb, out_names):
        plan.slot(renames.get(name, name), rec, field)
    kernel = runtime.get_kernel(row_bias_spec(spec_dtype(pb.dtype),
                                              runtime.device_props(pb.q.device).arch),
                                pb.q.device)
    plan.launches.append(Launch(kernel, grid(pb), (rec,)))
