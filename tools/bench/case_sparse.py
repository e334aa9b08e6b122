"""Block-sparse forward cases: CausalWindowMask(1024) (and the same pattern as window_size
(1023, 0)), and random 10% of 128x128 blocks (+ diagonal) as a BlockBitsetMask. Rows come
from case_forward.setup_forward; TFLOP/s counts allowed elements, 'tile TF/s' visited tiles."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .case_forward import Dims, Kind, setup_forward
from .cases import SPARSE_BLOCK, SPARSE_DENSITY, WINDOW
from .common import Impl, Setup, additive, block_dense, causal_allowed, make_bitset_mask
from .ctx import Ctx
from .flops import (
    attn_fwd_flops,
    block_table_allowed,
    causal_window_allowed,
    causal_window_tiles,
    elements_flops,
    random_block_table,
    visited_tile_flops,
)

_NOTE = "TFLOP/s counts allowed elements only; tile TF/s counts visited tiles (SDPA: every tile)"


class Window(Kind):
    """CausalWindowMask(WINDOW): key j allowed for 0 <= i + Sk - Sq - j < WINDOW."""

    def __init__(self, ctx: Ctx, d: Dims):
        super().__init__(ctx, d)
        allowed = causal_window_allowed(d.Sq, d.Sk, WINDOW)
        tiles = causal_window_tiles(d.Sq, d.Sk, WINDOW, 128, 128)
        self.flops = elements_flops(allowed, d.B, d.H, d.D)
        self.visited = visited_tile_flops(tiles, 128, 128, d.B, d.H, d.D)
        self.dense_tiles = attn_fwd_flops(d.B, d.H, d.Sq, d.Sk, d.D)
        self.info = [f"CausalWindowMask({WINDOW}): {allowed / (d.Sq * d.Sk):.2%} of elements "
                     f"allowed, {tiles} of {math.ceil(d.Sq / 128) * math.ceil(d.Sk / 128)} "
                     "128x128 tiles visited", _NOTE]

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        return {"sparse_mask": self.ctx.dm_attr("CausalWindowMask")(WINDOW, self.d.Sq,
                                                                     self.d.Sk)}

    def dm_variants(self) -> list[Impl]:
        ctx = self.ctx

        def make(inp: dict[str, Any], note: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_func")
            q, k, v = inp["q"], inp["k"], inp["v"]
            return lambda: f(q, k, v, window_size=(WINDOW - 1, 0))

        return [Impl(f"dmattn window_size=({WINDOW - 1},0)", "variant", make,
                     flops=self.flops)]

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        d = self.d
        ok = causal_allowed(d.torch, 0, d.Sq, d.Sq, d.Sk, d.dev, WINDOW)
        return additive(d.torch, ok, None, d.dt)[None, None], False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        from torch.nn.attention.flex_attention import create_block_mask

        d = self.d
        off = d.Sk - d.Sq

        def window_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
            dd = qi + off - kv
            return (dd >= 0) & (dd < WINDOW)

        return {"block_mask": create_block_mask(window_mm, None, None, d.Sq, d.Sk,
                                                device=d.dev)}

    def fa4_kwargs(self, inp: dict[str, Any]) -> dict[str, Any]:
        return {"window_size": (WINDOW - 1, 0)}

    def ref_add(self, inp: dict[str, Any], r0: int, r1: int, nb: int) -> Any:
        d = self.d
        return additive(d.torch, causal_allowed(d.torch, r0, r1, d.Sq, d.Sk, d.dev, WINDOW))


class RandomBlocks(Kind):
    """BlockBitsetMask of a random block table (fixed seed, every block row keeps one)."""

    fa4 = False    # FA4's own block sparsity is reached through flex-flash

    def __init__(self, ctx: Ctx, d: Dims):
        super().__init__(ctx, d)
        nrb, ncb = math.ceil(d.Sq / SPARSE_BLOCK), math.ceil(d.Sk / SPARSE_BLOCK)
        table = random_block_table(nrb, ncb, SPARSE_DENSITY, d.seed)
        allowed = block_table_allowed(table, d.Sq, d.Sk, SPARSE_BLOCK, SPARSE_BLOCK)
        kept = sum(map(sum, table))
        self.flops = elements_flops(allowed, d.B, d.H, d.D)
        self.visited = visited_tile_flops(kept, SPARSE_BLOCK, SPARSE_BLOCK, d.B, d.H, d.D)
        self.dense_tiles = attn_fwd_flops(d.B, d.H, d.Sq, d.Sk, d.D)
        self.table_t = d.torch.tensor(table, dtype=d.torch.bool, device=d.dev)
        self.info = [f"random blocks: {kept} of {nrb * ncb} {SPARSE_BLOCK}x{SPARSE_BLOCK} "
                     f"blocks kept ({kept / (nrb * ncb):.1%}; p={SPARSE_DENSITY} + one per "
                     f"block row), {allowed / (d.Sq * d.Sk):.2%} of elements", _NOTE]

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        return {"sparse_mask": make_bitset_mask(self.ctx, self.table_t, self.d.Sq, self.d.Sk,
                                                note)}

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        d = self.d
        ok = block_dense(d.torch, self.table_t, d.Sq, d.Sk)
        return additive(d.torch, ok, None, d.dt)[None, None], False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        from torch.nn.attention.flex_attention import create_block_mask

        d = self.d
        tab = self.table_t
        if flash:
            flat, ncb = tab.reshape(-1), tab.shape[1]

            def random_flat(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return flat[(qi // SPARSE_BLOCK) * ncb + kv // SPARSE_BLOCK]

            mm = random_flat
        else:
            def random_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return tab[qi // SPARSE_BLOCK, kv // SPARSE_BLOCK]

            mm = random_mm
        return {"block_mask": create_block_mask(mm, None, None, d.Sq, d.Sk, device=d.dev)}

    def ref_add(self, inp: dict[str, Any], r0: int, r1: int, nb: int) -> Any:
        d = self.d
        return additive(d.torch, block_dense(d.torch, self.table_t, d.Sq, d.Sk)[r0:r1])


SPARSE_KINDS: dict[str, type[Kind]] = {"sparse_window": Window, "sparse_random": RandomBlocks}


def setup_sparse(ctx: Ctx, name: str, shape: dict[str, Any]) -> Setup:
    return setup_forward(ctx, name, shape, SPARSE_KINDS[name])
