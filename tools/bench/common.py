"""What every case family shares: the Impl/Setup records, layout and mask helpers, the fp32
reference, and the dmattn sparse-mask helpers (torch imported by the caller)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cases import SPARSE_BLOCK
from .ctx import Ctx
from .flops import visited_tile_flops


@dataclass
class Impl:
    """``make(inputs, info)`` returns the timed callable for one input set (all preparation
    happens there, outside timing); it may store ``visited_flops``/``note`` into ``info``.
    ``to_ours(output)`` maps the callable's output onto the comparison layout."""

    name: str
    role: str
    make: Callable[[dict[str, Any], dict[str, Any]], Callable[[], Any]]
    flops: float | None = None
    visited_flops: float | None = None
    bytes: float | None = None
    to_ours: Callable[[Any], Any] | None = None
    check: bool = True


@dataclass
class Setup:
    title: str
    params: dict[str, Any]
    metric: str
    make_inputs: Callable[[int], dict[str, Any]]
    impls: list[Impl]
    reference: Callable[[dict[str, Any]], list[Any]] | None = None
    select: Callable[[Any], list[Any]] | None = None
    ref_note: str = ""
    info: list[str] = field(default_factory=list)


def torch_dtype(torch: Any, name: str) -> Any:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def tr(x: Any) -> Any:
    """(B,S,H,D) <-> (B,H,S,D) view."""
    return x.transpose(1, 2)


def additive(torch: Any, allowed: Any, bias: Any = None, dtype: Any = None) -> Any:
    """Additive mask: bias (or 0) where allowed, -inf elsewhere."""
    dtype = dtype or (bias.dtype if bias is not None else torch.float32)
    base = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype,
                                                               device=allowed.device)
    return torch.where(allowed, base, torch.tensor(float("-inf"), dtype=dtype,
                                                   device=allowed.device))


def ref_dense(ctx: Ctx, q: Any, k: Any, v: Any, add_fn: Callable[[int, int], Any] | None,
               nb: int, chunk: int = 1024) -> Any:
    """fp32 SDPA-math reference on batch[:nb], (B,S,H,D) in and out; ``add_fn(r0, r1)``
    gives the additive fp32 mask rows r0:r1 (broadcastable to (nb,H,rows,Sk)) or None."""
    torch = ctx.torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    H, Hk = q.shape[2], k.shape[2]
    qf = tr(q[:nb].float())
    kf = tr(k[:nb].float())
    vf = tr(v[:nb].float())
    if Hk != H:
        kf = kf.repeat_interleave(H // Hk, dim=1)
        vf = vf.repeat_interleave(H // Hk, dim=1)
    outs = []
    for r0 in range(0, q.shape[1], chunk):
        r1 = min(q.shape[1], r0 + chunk)
        am = add_fn(r0, r1) if add_fn is not None else None
        with sdpa_kernel(SDPBackend.MATH):
            outs.append(F.scaled_dot_product_attention(qf[:, :, r0:r1], kf, vf, attn_mask=am))
    out = tr(torch.cat(outs, dim=2))
    return torch.nan_to_num(out, nan=0.0)


def smoke_batches(shape: dict[str, Any]) -> int:
    return min(shape["batch"], 2)


def causal_allowed(torch: Any, r0: int, r1: int, sq: int, sk: int, device: Any,
                    window: int | None = None) -> Any:
    i = torch.arange(r0, r1, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    d = i + (sk - sq) - j
    ok = d >= 0
    if window is not None:
        ok = ok & (d < window)
    return ok


def block_dense(torch: Any, table_t: Any, sq: int, sk: int) -> Any:
    rows = torch.arange(sq, device=table_t.device) // SPARSE_BLOCK
    cols = torch.arange(sk, device=table_t.device) // SPARSE_BLOCK
    return table_t[rows][:, cols]


def to_numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    if hasattr(x, "get") and not isinstance(x, dict):
        return x.get()
    return np.asarray(x)


def make_bitset_mask(ctx: Ctx, table_t: Any, sq: int, sk: int, info: dict[str, Any]) -> Any:
    """``dm.BlockBitsetMask`` for the random block table: ``from_dense_mask`` on the dense
    element mask (torch, then NumPy), else the constructor on the block table; the first
    whose ``to_dense()`` matches is used."""
    import numpy as np

    cls = ctx.dm_attr("BlockBitsetMask")
    torch = ctx.torch
    dense_t = block_dense(torch, table_t, sq, sk)
    dense_np = to_numpy(dense_t)
    tab_np = to_numpy(table_t)
    bs = (SPARSE_BLOCK, SPARSE_BLOCK)
    attempts: list[tuple[str, Callable[[], Any]]] = []
    if hasattr(cls, "from_dense_mask"):
        attempts.append(("from_dense_mask(torch)",
                         lambda: cls.from_dense_mask(dense_t, block_size=bs)))
        attempts.append(("from_dense_mask(numpy)",
                         lambda: cls.from_dense_mask(dense_np, block_size=bs)))
    attempts.append(("BlockBitsetMask(table)", lambda: cls(tab_np, sq, sk, block_size=bs)))
    errors = []
    first = None
    for label, mk in attempts:
        try:
            m = mk()
        except (NotImplementedError, TypeError, ValueError, AttributeError) as e:
            errors.append(f"{label}: {type(e).__name__}: {e}")
            continue
        first = first or m
        try:
            got = np.asarray(to_numpy(m.to_dense()), dtype=bool).reshape(sq, sk)
            if np.array_equal(got, dense_np):
                return m
            errors.append(f"{label}: to_dense() differs from the block table")
        except Exception as e:  # noqa: BLE001 - can't verify, accept
            info["note"] = f"{label}: to_dense() unavailable ({type(e).__name__})"
            return m
    if first is not None:
        info["note"] = "; ".join(errors)
        return first
    raise NotImplementedError("BlockBitsetMask: " + "; ".join(errors))


def mask_visited(ctx: Ctx, mask: Any, batch: int, heads: int, headdim: int,
                  info: dict[str, Any]) -> None:
    """Visited-tile FLOPs from the mask's own ``block_map()`` and ``block_size`` (kept at the
    analytic count when the mask object cannot tell)."""
    import numpy as np

    try:
        bm = np.asarray(to_numpy(mask.block_map()))
        bsz = tuple(mask.block_size)
    except Exception:  # noqa: BLE001
        return
    lead = int(np.prod(bm.shape[:-2])) if bm.ndim > 2 else 1
    n = int(np.count_nonzero(bm))
    # tiles per (batch, head), averaged over leading dims where the mask has them
    info["visited_flops"] = visited_tile_flops(1, bsz[0], bsz[1], batch, heads, headdim) * n / lead
    note = f"mask blocks {bsz[0]}x{bsz[1]}: {n} of {bm.size} visited"
    try:
        note += f", estimate_speedup={float(ctx.dm.estimate_speedup(mask)):.2f}"
    except Exception:  # noqa: BLE001
        pass
    info.setdefault("note", note)


def reason(e: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """One line: the exception, with SDPA's "kernel not used because" warnings (which hold
    the real reason when the exception only says that no kernel is available)."""
    msg = str(e).strip().splitlines()
    first = msg[0] if msg else ""
    warn = [" ".join(re.sub(r"\(Triggered internally at [^)]*\)", "", str(w.message)).split())
            for w in caught]
    # drop the headers ("... not used because:") and the backends we switched off ourselves
    warn = [w for w in dict.fromkeys(warn) if w and not w.endswith("because:")
            and "runtime disabled" not in w]
    if warn and ("No available kernel" in first or "No viable backend" in first):
        text = f"{type(e).__name__}: " + "; ".join(warn) + f" ({first})"
    else:
        text = f"{type(e).__name__}: {first}"
        if warn:
            text += " [" + "; ".join(warn) + "]"
    return text[:600]
