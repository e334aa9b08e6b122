"""Varlen prefill: sequences of random lengths packed, key-based bias (total_k, H),
non-causal; beside a dense dmattn row of the same FLOPs, SDPA on the padded batch and Flex on
the packed batch with a document block mask."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .cases import CASES
from .common import Impl, Setup, ref_dense, torch_dtype, tr
from .ctx import Ctx
from .flops import attn_fwd_flops, varlen_fwd_flops, varlen_lengths
from .peers import flex_impl, sdpa_peer


def setup_prefill(ctx: Ctx, shape: dict[str, Any]) -> Setup:
    torch = ctx.torch
    dev = ctx.device
    n, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    D, smax = shape["headdim"], shape["seqlen"]
    if H % Hk:
        raise ValueError(f"heads {H} is not a multiple of kv_heads {Hk}")
    dt = torch_dtype(torch, shape["dtype"])
    seed = ctx.args.seed
    lens = varlen_lengths(n, max(1, smax // 8), smax, seed)
    shape = dict(shape, lens=lens)
    total = sum(lens)
    maxlen = max(lens)
    cu = [0]
    for L in lens:
        cu.append(cu[-1] + L)
    flops = varlen_fwd_flops(lens, lens, H, D)
    s_eq = max(1, round(math.sqrt(sum(L * L for L in lens) / n)))
    dense_flops = attn_fwd_flops(n, H, s_eq, s_eq, D)
    info = [f"{n} sequences, lengths {lens} (seed {seed}), total {total}; non-causal; "
            f"key-based bias (total_k, H)",
            f"dmattn dense reference row: B={n} S={s_eq} (same FLOPs: sqrt(mean L^2)) with a "
            "(B,H,1,S) key bias; SDPA peers run the padded batch (S=max len, -inf on padding "
            "keys; TFLOP/s counts real work only); flex runs the packed batch with a document "
            "block mask"]

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=dev, dtype=dt)

        return {"q": rn(total, H, D), "k": rn(total, Hk, D), "v": rn(total, Hk, D),
                "bias": rn(total, H),
                "cu": torch.tensor(cu, device=dev, dtype=torch.int32)}

    def make_dm(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_varlen_func")
        a = (inp["q"], inp["k"], inp["v"], inp["cu"], inp["cu"], maxlen, maxlen)
        kw = {"attn_bias": inp["bias"]}
        return lambda: f(*a, **kw)

    def make_dense(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        gen = torch.Generator(device=dev).manual_seed(seed + 7)
        q = torch.randn(n, s_eq, H, D, generator=gen, device=dev, dtype=dt)
        k = torch.randn(n, s_eq, Hk, D, generator=gen, device=dev, dtype=dt)
        v = torch.randn(n, s_eq, Hk, D, generator=gen, device=dev, dtype=dt)
        b = torch.randn(n, H, 1, s_eq, generator=gen, device=dev, dtype=dt)
        return lambda: f(q, k, v, attn_bias=b)

    impls = [Impl("dmattn varlen", "dmattn", make_dm, flops=flops),
             Impl(f"dmattn dense B={n} S={s_eq} kbias", "variant", make_dense,
                  flops=dense_flops, check=False)]

    def padded(inp: dict[str, Any], dtype: Any) -> tuple[Any, Any, Any, Any]:
        q = torch.zeros(n, maxlen, H, D, device=dev, dtype=dt)
        k = torch.zeros(n, maxlen, Hk, D, device=dev, dtype=dt)
        v = torch.zeros(n, maxlen, Hk, D, device=dev, dtype=dt)
        am = torch.full((n, H, 1, maxlen), float("-inf"), device=dev, dtype=dtype)
        for i, L in enumerate(lens):
            s = slice(cu[i], cu[i + 1])
            q[i, :L], k[i, :L], v[i, :L] = inp["q"][s], inp["k"][s], inp["v"][s]
            am[i, :, 0, :L] = inp["bias"][s].t().to(dtype)
        return q, k, v, am

    def to_ours(out: Any) -> Any:   # (n,H,maxlen,D) -> (total,H,D)
        return torch.cat([tr(out)[i, :L] for i, L in enumerate(lens)], dim=0)

    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers:
            continue

        def make_sdpa(inp: dict[str, Any], info_: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            q, k, v, am = padded(inp, dt)
            return sdpa_peer(ctx, peer, tr(q), tr(k), tr(v), am, False, info_)

        impls.append(Impl(f"sdpa-{peer} padded", "peer", make_sdpa, flops=flops,
                          visited_flops=attn_fwd_flops(n, H, maxlen, maxlen, D),
                          to_ours=to_ours))
    if "flex" in ctx.peers:
        def flex_args(inp: dict[str, Any]) -> dict[str, Any]:
            from torch.nn.attention.flex_attention import create_block_mask

            doc = torch.repeat_interleave(torch.arange(n, device=dev),
                                          torch.tensor(lens, device=dev))
            kb = inp["bias"]

            def doc_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return doc[qi] == doc[kv]

            def kb_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return score + kb[kv, h]

            bm = create_block_mask(doc_mm, None, None, total, total, device=dev)
            return {"q": tr(inp["q"][None]), "k": tr(inp["k"][None]), "v": tr(inp["v"][None]),
                    "score_mod": kb_sm, "block_mask": bm, "enable_gqa": Hk != H}

        impls.append(flex_impl(ctx, "flex packed (doc mask)", flops, flex_args,
                                to_ours=lambda o: tr(o)[0]))

    def reference(inp: dict[str, Any]) -> list[Any]:
        outs = []
        for i in range(n):
            s = slice(cu[i], cu[i + 1])
            am = inp["bias"][s].t().float()[None, :, None, :]
            outs.append(ref_dense(ctx, inp["q"][s][None], inp["k"][s][None],
                                   inp["v"][s][None], lambda r0, r1, am=am: am, 1)[0])
        return [torch.cat(outs, dim=0)]

    def select(out: Any) -> list[Any]:
        return [out]

    return Setup(CASES["prefill_varlen"], shape, "tflops", make_inputs, impls, reference,
                 select, "fp32 SDPA-math per sequence", info)


