"""Peer callables: torch SDPA per backend, FlexAttention (compiled Triton, or the FLASH
backend), FlashAttention-4 (flash_attn.cute)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from .common import Impl, tr
from .ctx import Ctx


def sdpa_backend(torch: Any, peer: str) -> Any:
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[peer]


def sdpa_call(ctx: Ctx, peer: str, q: Any, k: Any, v: Any, attn_mask: Any = None,
               is_causal: bool = False, gqa: bool = False) -> Callable[[], Any]:
    """A callable running SDPA with one backend on (B,H,S,D) views."""
    torch = ctx.torch
    from torch.nn.attention import sdpa_kernel

    F = torch.nn.functional
    backend = sdpa_backend(torch, peer)
    kw: dict[str, Any] = {"attn_mask": attn_mask, "is_causal": is_causal}
    if gqa:
        kw["enable_gqa"] = True

    def fn() -> Any:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return fn


def sdpa_peer(ctx: Ctx, peer: str, q: Any, k: Any, v: Any, attn_mask: Any, is_causal: bool,
               info: dict[str, Any], grad: bool = False) -> Callable[[], Any]:
    """SDPA with GQA through ``enable_gqa=True``; where the backend refuses that, K/V are
    ``repeat_interleave``d (once, outside timing; inside the call when gradients flow to
    the un-expanded K/V) and the row says so."""
    H, Hk = q.shape[1], k.shape[1]
    if H == Hk:
        return sdpa_call(ctx, peer, q, k, v, attn_mask, is_causal)
    fn = sdpa_call(ctx, peer, q, k, v, attn_mask, is_causal, gqa=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
        return fn
    except RuntimeError:
        g = H // Hk
        info["note"] = "GQA via repeat_interleave (enable_gqa refused)"
        if not grad:
            return sdpa_call(ctx, peer, q, k.repeat_interleave(g, dim=1),
                              v.repeat_interleave(g, dim=1), attn_mask, is_causal)

        def expanded() -> Any:
            return sdpa_call(ctx, peer, q, k.repeat_interleave(g, dim=1),
                              v.repeat_interleave(g, dim=1), attn_mask, is_causal)()

        return expanded


FLEX_FLASH = {"BACKEND": "FLASH"}


def flex_call(ctx: Ctx, flash: bool) -> Callable[..., Any]:
    """Compiled FlexAttention; with ``flash`` its FLASH backend (FA4's CuTe kernels), which
    needs flash_attn.cute importable (checked here so the row says why)."""
    flex = ctx.flex()
    if not flash:
        return flex
    ctx.fa4()   # raises with the reason when flash_attn.cute is missing

    def fn(q: Any, k: Any, v: Any, **kw: Any) -> Any:
        return flex(q, k, v, kernel_options=FLEX_FLASH, **kw)

    return fn


def flex_names(ctx: Ctx) -> list[tuple[str, bool]]:
    """The selected Flex peers: ("flex", False) for Triton, ("flex-flash", True)."""
    return [(n, n == "flex-flash") for n in ("flex", "flex-flash") if n in ctx.peers]


def flex_impl(ctx: Ctx, name: str, flops: float,
              make_args: Callable[[dict[str, Any]], dict], visited: float | None = None,
              to_ours: Callable[[Any], Any] | None = None, flash: bool = False) -> Impl:
    """FlexAttention peer: ``make_args(inputs)`` returns q/k/v (B,H,S,D) views and the
    flex keyword arguments (score_mod, block_mask, enable_gqa) built outside timing; with
    ``flash`` the FLASH backend runs it (``make_args`` then gets ``flash=True`` in the
    inputs dict's copy so score_mods can index flattened tensors)."""

    def make(inp: dict[str, Any], info: dict[str, Any]) -> Callable[[], Any]:
        flex = flex_call(ctx, flash)
        a = make_args(dict(inp, flash=flash))
        q, k, v = a.pop("q"), a.pop("k"), a.pop("v")

        def fn() -> Any:
            return flex(q, k, v, **a)

        return fn

    return Impl(name, "peer", make, flops=flops, visited_flops=visited,
                to_ours=to_ours or tr)


def fa4_impl(ctx: Ctx, name: str, flops: float,
             make_args: Callable[[dict[str, Any]], dict[str, Any]],
             visited: float | None = None) -> Impl:
    """FlashAttention-4 peer on the (B,S,H,D) inputs: ``make_args(inputs)`` gives the keyword
    arguments of ``flash_attn_func`` (causal, window_size, softcap); the callable returns the
    output only (FA4 returns ``(out, lse)``)."""

    def make(inp: dict[str, Any], info: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.fa4()
        kw = make_args(inp)
        q, k, v = inp["q"], inp["k"], inp["v"]

        def fn() -> Any:
            return f(q, k, v, **kw)[0]

        return fn

    return Impl(name, "peer", make, flops=flops, visited_flops=visited, to_ours=None)
