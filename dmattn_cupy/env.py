"""Every ``DMATTN_*`` environment variable, read here and nowhere else.

Each is read at call time (not at import), so tests and users may change it between calls.
A malformed value raises ValueError naming the variable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    """A variable with a fixed set of values (empty: ``default``); anything else is a
    ValueError."""
    val = os.environ.get(name, default) or default
    if val not in allowed:
        raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {val!r}")
    return val


def _switch(name: str, default: str) -> bool:
    """A strict ``0``/``1`` variable (empty: ``default``)."""
    return _choice(name, default, ("0", "1")) == "1"


def cache_dir() -> Path:
    """``DMATTN_CACHE_DIR``: the compiled-kernel cache (default ~/.cache/dmattn_cupy)."""
    env = os.environ.get("DMATTN_CACHE_DIR")
    return Path(env) if env else Path(os.path.expanduser("~")) / ".cache" / "dmattn_cupy"


def verbose() -> bool:
    """``DMATTN_VERBOSE=1``: print each compilation with its duration."""
    return _flag("DMATTN_VERBOSE")


def check_enabled() -> bool:
    """``DMATTN_CHECK=1``: validate device-side inputs (cu_seqlens) at the cost of a sync."""
    return _flag("DMATTN_CHECK")


def fwd_tile_override() -> tuple[int, int, int] | None:
    """``DMATTN_FWD_TILE=MxNxW``: force the forward tile (block_m, block_n, num_warps)."""
    env = os.environ.get("DMATTN_FWD_TILE")
    if not env:
        return None
    try:
        bm, bn, w = (int(x) for x in env.lower().split("x"))
    except ValueError:
        raise ValueError(f"DMATTN_FWD_TILE must look like 128x64x8, got {env!r}") from None
    return bm, bn, w


def decode_mode() -> str:
    """``DMATTN_DECODE``: ``auto`` (short queries take the decode path), ``0`` or ``1``."""
    mode = os.environ.get("DMATTN_DECODE", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"DMATTN_DECODE must be 'auto', '0' or '1', got {mode!r}")
    return mode


def forced_splits() -> int | None:
    """``DMATTN_NUM_SPLITS``: None for ``auto`` (the heuristic), else an integer >= 1."""
    val = os.environ.get("DMATTN_NUM_SPLITS", "auto")
    if val in ("", "auto"):
        return None
    try:
        n = int(val)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"DMATTN_NUM_SPLITS must be 'auto' or an integer >= 1, got {val!r}")
    return n


def decode_stages() -> int | None:
    """``DMATTN_DECODE_STAGES``: None for ``auto`` (decode.choose_stages), else 2 or 3."""
    val = os.environ.get("DMATTN_DECODE_STAGES", "auto")
    if val in ("", "auto"):
        return None
    if val not in ("2", "3"):
        raise ValueError(f"DMATTN_DECODE_STAGES must be 'auto', '2' or '3', got {val!r}")
    return int(val)


def split_combine() -> str:
    """``DMATTN_SPLIT_COMBINE``: who merges a split decode's partials: ``auto`` (default:
    decode.fused_combine's rule), ``grid`` (the decode grid's last CTA per group, always) or
    ``kernel`` (fwd_combine.cu's launch, always)."""
    return _choice("DMATTN_SPLIT_COMBINE", "auto", ("auto", "grid", "kernel"))


def forward_family_override() -> str | None:
    """``DMATTN_FWD_FAMILY``: ``auto`` (default: the most specific family that takes the
    problem) or a forward family's name (e.g. ``fwd_mma`` to keep the portable kernel on a
    Hopper GPU; tests run both). A family that cannot take the problem is not forced."""
    val = os.environ.get("DMATTN_FWD_FAMILY", "auto")
    return None if val in ("", "auto") else val


def nvrtc_defines() -> tuple[str, ...]:
    """``DMATTN_NVRTC_DEFINES``: extra preprocessor definitions for kernel experiments (A/B
    runs of a source switch without editing it), space-separated ``NAME`` or ``NAME=VALUE``,
    e.g. ``DM_EXP2_POLY_EVERY=4``. They are part of the kernel cache key."""
    val = os.environ.get("DMATTN_NVRTC_DEFINES", "").split()
    for d in val:
        if not re.fullmatch(r"[A-Za-z_]\w*(=[\w.+-]*)?", d):
            raise ValueError("DMATTN_NVRTC_DEFINES must be space-separated NAME or NAME=VALUE "
                             f"(letters, digits, _), got {d!r}")
    return tuple(val)


def nvrtc_define_int(name: str, default: int) -> int:
    """An integer A/B define of the kernel sources from DMATTN_NVRTC_DEFINES (``NAME=N``), or
    ``default``; host halves read the ones that change their tiles or shared memory."""
    for d in nvrtc_defines():
        key, _, val = d.partition("=")
        if key == name and val.isdigit():
            return int(val)
    return default


BACKWARD_FAMILIES = ("bwd_dkdv", "bwd_sm90")


def backward_family_override() -> str | None:
    """``DMATTN_BWD_FAMILY``: ``auto`` (default) and ``bwd_sm90`` run the sm_90a backward on
    compute capability 9.0 wherever it takes the problem, the portable one elsewhere;
    ``bwd_dkdv`` keeps the portable backward everywhere."""
    val = os.environ.get("DMATTN_BWD_FAMILY", "auto")
    if val in ("", "auto"):
        return None
    if val not in BACKWARD_FAMILIES:
        raise ValueError(f"DMATTN_BWD_FAMILY must be 'auto' or one of {BACKWARD_FAMILIES}, "
                         f"got {val!r}")
    return val


def sm90_bwd_sparse() -> bool:
    """``DMATTN_SM90_BWD_SPARSE``: on by default (anything but ``0``), the sm_90a backward also
    takes block-sparse masks (block lists of full blocks whose size tiles its 64 x 128 items);
    ``0`` keeps the portable backward for them. A plan variable: the thin path caches
    backward plans with block lists."""
    return os.environ.get("DMATTN_SM90_BWD_SPARSE", "1") != "0"


def sm90_bwd_order() -> bool:
    """``DMATTN_SM90_BWD_ORDER``: on by default (anything but ``0``), the sm_90a backward of a
    block mask runs its CTAs longest first within groups of 128 (the bwd_order kernel ranks
    them by listed blocks); ``0`` keeps the grid order. A plan variable."""
    return os.environ.get("DMATTN_SM90_BWD_ORDER", "1") != "0"


def sm90_fwd_order() -> bool:
    """``DMATTN_SM90_FWD_ORDER``: on by default (anything but ``0``), the sm_90a forward of a
    block mask runs its work items longest first within groups of 128 (the fwd_order kernel
    ranks them by listed blocks); ``0`` keeps its own order. A plan variable."""
    return os.environ.get("DMATTN_SM90_FWD_ORDER", "1") != "0"


def programmatic_launches() -> bool:
    """``DMATTN_PDL``: on by default (anything but ``0``), on compute capability 9.0+ a kernel
    that only reads what the launch before it wrote (the split-KV combine) is launched with
    programmatic stream serialization, so its launch overlaps the end of the previous kernel;
    ``0`` launches it plainly. A plan variable."""
    return os.environ.get("DMATTN_PDL", "1") != "0"


def mask_pack_kernel() -> bool:
    """``DMATTN_MASK_PACK``: ``1`` lets ``MixedMask.from_dense_mask`` pack a GPU mask with one
    kernel (cuda_src/mask_pack.cu, the default) instead of CuPy array operations; ``0`` keeps
    the array operations. Same result bit for bit (tests/gpu/test_mask_pack.py)."""
    return _switch("DMATTN_MASK_PACK", "1")


def fwd_row_bias() -> bool:
    """``DMATTN_FWD_ROW_BIAS``: ``1`` runs a dense forward whose bias is one value per query
    row ((.., Sq, 1) or a scalar) on the Hopper family without the bias, then shifts lse by it
    (``row_bias``, the default: tests/gpu/test_row_bias.py), and the Hopper backward runs
    without it on lse minus it (``backward``, unshift); ``0`` leaves such a bias to the
    portable families. A plan variable."""
    return _switch("DMATTN_FWD_ROW_BIAS", "1")


def mask_route() -> str:
    """``DMATTN_MASK_ROUTE``: whether the Hopper forward reads a (.., Sq, Sk) ``attn_mask`` as
    block lists that two kernels pack from it in each call (``mask_pack.routes_mask``) or the
    mask's bytes tile by tile. ``auto`` (default): the lists where one packing serves several
    (batch, head) pairs (a mask broadcast over batch or heads), or where a mask of its own per
    pair would otherwise run slower (``routes_mask``); ``1``: the lists for every mask;
    ``0``: the bytes; ``warps``: beside a tile bias, packed by the warps of the forward's bias
    spec that are idle otherwise (``mask_pack.packs_in_forward``), else as ``auto``;
    ``overlap``: the lists for every mask, and where the mask is one of its own per (batch,
    head) with 16-byte aligned rows, packed by a few CTAs while the forward runs beside them
    (``mask_pack.overlaps``; not measured yet). A plan variable."""
    return _choice("DMATTN_MASK_ROUTE", "auto", ("auto", "0", "1", "warps", "overlap"))


def mask_overlap_ctas() -> int:
    """``DMATTN_MASK_OVERLAP_CTAS``: the CTAs (one per SM) that pack an ``attn_mask`` beside the
    forward under ``DMATTN_MASK_ROUTE=overlap``; 0 or empty (default): a sixth of the SMs. A
    plan variable."""
    val = os.environ.get("DMATTN_MASK_OVERLAP_CTAS", "") or "0"
    if not val.isdigit():
        raise ValueError(f"DMATTN_MASK_OVERLAP_CTAS must be a count of CTAs (0: a sixth of the "
                         f"SMs), got {val!r}")
    return int(val)


# Variables that change which plan a call gets (family, tile, decode, splits, device checks).
PLAN_VARIABLES = ("DMATTN_FWD_FAMILY", "DMATTN_BWD_FAMILY", "DMATTN_FWD_TILE", "DMATTN_DECODE",
                  "DMATTN_NUM_SPLITS", "DMATTN_CHECK", "DMATTN_NVRTC_DEFINES",
                  "DMATTN_SM90_BWD_SPARSE", "DMATTN_SM90_BWD_ORDER", "DMATTN_SM90_FWD_ORDER",
                  "DMATTN_DECODE_STAGES", "DMATTN_PDL", "DMATTN_MASK_ROUTE",
                  "DMATTN_FWD_ROW_BIAS", "DMATTN_SPLIT_COMBINE", "DMATTN_MASK_OVERLAP_CTAS")
_environ_data = getattr(os.environ, "_data", None)
_encoded = tuple(os.environ.encodekey(n) for n in PLAN_VARIABLES) \
    if _environ_data is not None and hasattr(os.environ, "encodekey") else None


def plan_state() -> tuple:
    """The raw values of ``PLAN_VARIABLES`` (part of every cached plan's key, so changing one
    between calls takes effect at the next call). Reads ``os.environ``'s own dict where it has
    one (a dict lookup per variable, no decoding)."""
    if _encoded is not None:
        return tuple(map(_environ_data.get, _encoded))
    return tuple(os.environ.get(n) for n in PLAN_VARIABLES)
