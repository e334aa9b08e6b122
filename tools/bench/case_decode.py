"""Varlen decode: many sequences x a few queries against long keys, key-based bool mask +
bias (total_k, Hk), GQA; reported in GB/s of K+V+mask+bias read. SDPA and Flex run the
padded batch with the mask folded into an additive (B,H,1,Sk) bias / a score_mod."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .cases import CASES, MASK_KEEP
from .common import Impl, Setup, additive, ref_dense, torch_dtype, tr
from .ctx import Ctx
from .flops import attn_fwd_flops
from .peers import flex_impl, sdpa_peer


def setup_decode(ctx: Ctx, shape: dict[str, Any], name: str = "decode") -> Setup:
    torch = ctx.torch
    dev = ctx.device
    B, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    Sq, Sk, D = shape["seqlen"], shape["seqlen_k"], shape["headdim"]
    if H % Hk:
        raise ValueError(f"heads {H} is not a multiple of kv_heads {Hk}")
    g = H // Hk
    dt = torch_dtype(torch, shape["dtype"])
    esz = 2
    tq, tk = B * Sq, B * Sk
    kv_bytes = 2 * tk * Hk * D * esz
    mb_bytes = tk * Hk * (1 + esz)
    nbytes = kv_bytes + mb_bytes
    flops = attn_fwd_flops(B, H, Sq, Sk, D)
    seed = ctx.args.seed
    info = [f"varlen: {B} sequences x {Sq} query x {Sk} keys; mask (total_k, Hk) bool "
            f"({MASK_KEEP:.0%} kept) + bias (total_k, Hk) {shape['dtype']}",
            f"GB/s counts K+V+mask+bias = {nbytes / 1e6:.1f} MB per call (Q/O ignored); "
            "SDPA peers: padded batch with a pre-combined additive (B,H,1,Sk) bias"]

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=dev, dtype=dt)

        mask = torch.rand(tk, Hk, generator=gen, device=dev) < MASK_KEEP
        mask.view(B, Sk, Hk)[:, -1, :] = True   # never an empty row
        return {"q": rn(tq, H, D), "k": rn(tk, Hk, D), "v": rn(tk, Hk, D), "mask": mask,
                "bias": rn(tk, Hk),
                "cu_q": torch.arange(0, B + 1, device=dev, dtype=torch.int32) * Sq,
                "cu_k": torch.arange(0, B + 1, device=dev, dtype=torch.int32) * Sk}

    def make_dm(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_varlen_func")
        a = (inp["q"], inp["k"], inp["v"], inp["cu_q"], inp["cu_k"], Sq, Sk)
        kw = {"attn_mask": inp["mask"], "attn_bias": inp["bias"]}
        return lambda: f(*a, **kw)

    def padded(inp: dict[str, Any]) -> tuple[Any, Any, Any]:
        q = tr(inp["q"].view(B, Sq, H, D))
        k = tr(inp["k"].view(B, Sk, Hk, D))
        v = tr(inp["v"].view(B, Sk, Hk, D))
        return q, k, v

    def combined(inp: dict[str, Any], dtype: Any) -> Any:
        """(B,H,1,Sk) additive bias expanded from the per-kv-head mask/bias."""
        m = inp["mask"].view(B, Sk, Hk).permute(0, 2, 1)
        b = inp["bias"].view(B, Sk, Hk).permute(0, 2, 1)
        add = additive(torch, m, b, dtype)                  # (B, Hk, Sk)
        return add.repeat_interleave(g, dim=1)[:, :, None, :].contiguous()

    def to_ours(out: Any) -> Any:        # (B,H,Sq,D) -> (total_q, H, D)
        return tr(out).reshape(tq, H, D)

    impls = [Impl("dmattn varlen", "dmattn", make_dm, flops=flops, bytes=nbytes)]
    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers:
            continue

        def make_sdpa(inp: dict[str, Any], info_: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            q, k, v = padded(inp)
            am = combined(inp, dt)
            return sdpa_peer(ctx, peer, q, k, v, am, False, info_)

        impls.append(Impl(f"sdpa-{peer} padded", "peer", make_sdpa, flops=flops,
                          bytes=nbytes, to_ours=to_ours))
    if "flex" in ctx.peers:
        def flex_args(inp: dict[str, Any]) -> dict[str, Any]:
            q, k, v = padded(inp)
            m = inp["mask"].view(B, Sk, Hk)
            bb = inp["bias"].view(B, Sk, Hk)

            def dec_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return torch.where(m[b, kv, h // g], score + bb[b, kv, h // g],
                                   -float("inf"))

            return {"q": q, "k": k, "v": v, "score_mod": dec_sm, "enable_gqa": Hk != H}

        impls.append(flex_impl(ctx, "flex padded (score_mod)", flops, flex_args,
                                to_ours=to_ours))
        impls[-1].bytes = nbytes

    nseq = min(B, 8)

    def reference(inp: dict[str, Any]) -> list[Any]:
        q, k, v = padded(inp)
        am = combined(inp, torch.float32)[:nseq]
        out = ref_dense(ctx, tr(q[:nseq]), tr(k[:nseq]), tr(v[:nseq]),
                         lambda r0, r1: am, nseq)
        return [out.reshape(nseq * Sq, H, D)]

    def select(out: Any) -> list[Any]:
        return [out[: nseq * Sq]]

    return Setup(CASES[name], shape, "gbps", make_inputs, impls, reference, select,
                 f"fp32 SDPA-math on the first {nseq} sequences", info)



PAGE_SIZES = (64, 16, 256)  # decode_paged: the first is the headline row, the rest variants


def setup_decode_paged(ctx: Ctx, shape: dict[str, Any]) -> Setup:
    """The decode case through ``flash_dmattn_with_kvcache``: the same K/V, key-based mask and
    bias as a paged cache (pages shuffled in the pool by a random block table) at each page
    size, and as a dense (B, S, Hk, D) cache; same bytes, peers and reference as ``decode``."""
    torch = ctx.torch
    base = setup_decode(ctx, shape)
    B, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    Sq, Sk, D = shape["seqlen"], shape["seqlen_k"], shape["headdim"]
    tq = B * Sq
    nbytes, flops = base.impls[0].bytes, base.impls[0].flops

    def paged(x: Any, ps: int, perm: Any) -> Any:
        """(B*Sk, ...) rows as a pool of (B*Sk/ps) pages of ps rows, page j at perm[j]."""
        pages = x.reshape((B * Sk // ps, ps) + tuple(x.shape[1:]))
        pool = torch.empty_like(pages)
        pool[perm] = pages
        return pool

    def make_kv(ps: int | None) -> Callable[[dict[str, Any], dict[str, Any]], Callable[[], Any]]:
        def make(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_with_kvcache")
            q = inp["q"].view(B, Sq, H, D)
            lens = torch.full((B,), Sk, dtype=torch.int32, device=q.device)
            if ps is None:
                kv = (inp["k"].view(B, Sk, Hk, D), inp["v"].view(B, Sk, Hk, D))
                mb = (inp["mask"].view(B, Sk, Hk), inp["bias"].view(B, Sk, Hk))
                table = None
            else:
                if Sk % ps:
                    raise ValueError(f"seqlen_k {Sk} is not a multiple of page size {ps}")
                gen = torch.Generator(device=q.device).manual_seed(ps)
                perm = torch.randperm(B * Sk // ps, generator=gen, device=q.device)
                kv = (paged(inp["k"], ps, perm), paged(inp["v"], ps, perm))
                mb = (paged(inp["mask"], ps, perm), paged(inp["bias"], ps, perm))
                table = perm.view(B, Sk // ps).to(torch.int32)
            return lambda: f(q, *kv, cache_seqlens=lens, block_table=table, attn_mask=mb[0],
                             attn_bias=mb[1])
        return make

    def to_ours(out: Any) -> Any:  # (B, Sq, H, D) -> (total_q, H, D)
        return out.reshape(tq, H, D)

    rows = [Impl(f"dmattn kvcache paged{ps}", "dmattn" if i == 0 else "variant", make_kv(ps),
                 flops=flops, bytes=nbytes, to_ours=to_ours)
            for i, ps in enumerate(PAGE_SIZES)]
    rows.append(Impl("dmattn kvcache dense", "variant", make_kv(None), flops=flops,
                     bytes=nbytes, to_ours=to_ours))
    base.impls[0].role = "variant"  # the varlen call: the unpaged rate paged is held to
    info = base.info + [f"kvcache rows: paged caches of page size {', '.join(map(str, PAGE_SIZES))}"
                        " (pages shuffled by a random block table) and a dense cache; target: "
                        "paged >= 0.9x the unpaged (varlen / dense cache) rate"]
    return Setup(CASES["decode_paged"], shape, "gbps", base.make_inputs,
                 rows + base.impls, base.reference, base.select, base.ref_note, info)
