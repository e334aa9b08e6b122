"""Forward + backward cases (torch autograd): no mask, causal, full (B,H,S,S) bias with grad,
key-side (B,H,1,S) bias with grad, full bool mask + full bias with grad, random 10% of 128x128
blocks. Timed: forward + torch.autograd.grad(out, leaves, dout). Every case but the sparse one
also times dmattn's deterministic mode (a variant row: issue 14 wants it within 15%)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from .cases import CASES, MASK_KEEP, SPARSE_BLOCK, SPARSE_DENSITY
from .common import (
    Impl,
    Setup,
    additive,
    block_dense,
    causal_allowed,
    make_bitset_mask,
    torch_dtype,
    tr,
)
from .ctx import Ctx
from .flops import (
    attn_fwd_flops,
    block_table_allowed,
    elements_flops,
    fwd_bwd_flops,
    random_block_table,
    visited_tile_flops,
)
from .peers import flex_call, flex_names, sdpa_peer


def setup_backward(ctx: Ctx, name: str, shape: dict[str, Any]) -> Setup:
    torch = ctx.torch
    dev = ctx.device
    B, H, Hk = shape["batch"], shape["heads"], shape["kv_heads"]
    Sq, Sk, D = shape["seqlen"], shape["seqlen_k"], shape["headdim"]
    if H % Hk:
        raise ValueError(f"heads {H} is not a multiple of kv_heads {Hk}")
    g = H // Hk
    gqa = Hk != H
    dt = torch_dtype(torch, shape["dtype"])
    with_mask = name == "backward_mask_bias"
    with_bias = name in ("backward_bias", "backward_kbias", "backward_qbias",
                         "backward_mask_bias", "backward_bias_b1", "backward_kbias_b1")
    kbias = name in ("backward_kbias", "backward_kbias_b1")
    qbias = name == "backward_qbias"   # SDPA's cuDNN faults on this broadcast: no SDPA rows
    shared = name.endswith("_b1")   # the bias shared by the batch: (1, H, .., S)
    sparse = name == "backward_sparse"
    causal = name == "backward_causal"
    seed = ctx.args.seed
    flops = fwd_bwd_flops(attn_fwd_flops(B, H, Sq, Sk, D, causal))
    visited = None
    info = ["timed: forward + torch.autograd.grad(out, (q, k, v" +
            (", bias" if with_bias else "") + "), dout)"]
    if with_mask:
        info.append("SDPA rows: mask and bias combined into one additive bias inside the timing "
                    "(the bias gradient flows through it); Flex: score_mod")
    table_t = None
    if sparse:
        nrb, ncb = math.ceil(Sq / SPARSE_BLOCK), math.ceil(Sk / SPARSE_BLOCK)
        table = random_block_table(nrb, ncb, SPARSE_DENSITY, seed)
        allowed = block_table_allowed(table, Sq, Sk, SPARSE_BLOCK, SPARSE_BLOCK)
        kept = sum(map(sum, table))
        flops = fwd_bwd_flops(elements_flops(allowed, B, H, D))
        visited = fwd_bwd_flops(visited_tile_flops(kept, SPARSE_BLOCK, SPARSE_BLOCK, B, H, D))
        table_t = torch.tensor(table, dtype=torch.bool, device=dev)
        info.append(f"random blocks: {kept} of {nrb * ncb} {SPARSE_BLOCK}x{SPARSE_BLOCK} blocks "
                    f"kept ({kept / (nrb * ncb):.1%}); TFLOP/s counts allowed elements only")

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=dev).manual_seed(seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=dev, dtype=dt)

        inp = {"q": rn(B, Sq, H, D).requires_grad_(), "k": rn(B, Sk, Hk, D).requires_grad_(),
               "v": rn(B, Sk, Hk, D).requires_grad_(), "dout": rn(B, Sq, H, D)}
        if with_bias:
            inp["bias"] = rn(1 if shared else B, H, 1 if kbias else Sq,
                             1 if qbias else Sk).requires_grad_()
        if with_mask:
            inp["mask"] = torch.rand(B, H, Sq, Sk, generator=gen, device=dev) < MASK_KEEP
        return inp

    def leaves(inp: dict[str, Any]) -> list[Any]:
        return [inp["q"], inp["k"], inp["v"]] + ([inp["bias"]] if with_bias else [])

    def fwd_bwd(fwd: Callable[[], Any], inp: dict[str, Any], ours: bool) -> Callable[[], Any]:
        lv = leaves(inp)
        dout = inp["dout"] if ours else tr(inp["dout"])

        def fn() -> Any:
            out = fwd()
            grads = torch.autograd.grad(out, lv, dout)
            return (out.detach() if ours else tr(out.detach()), *grads)

        return fn

    def make_dm(inp: dict[str, Any], info_: dict[str, Any], deterministic: bool = False
                ) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        q, k, v = inp["q"], inp["k"], inp["v"]
        kw: dict[str, Any] = {"attn_bias": inp["bias"]} if with_bias else {}
        if with_mask:
            kw["attn_mask"] = inp["mask"]
        if causal:
            kw["is_causal"] = True
        if sparse:
            kw["sparse_mask"] = make_bitset_mask(ctx, table_t, Sq, Sk, info_)
        if deterministic:
            kw["deterministic"] = True
        return fwd_bwd(lambda: f(q, k, v, **kw), inp, True)

    def make_dm_det(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
        return make_dm(inp, info_, deterministic=True)

    impls = [Impl("dmattn fwd+bwd", "dmattn", make_dm, flops=flops, visited_flops=visited,
                  to_ours=None)]
    if not sparse:
        impls.append(Impl("dmattn fwd+bwd, deterministic=True", "variant", make_dm_det,
                          flops=flops, to_ours=None))
    if with_mask:
        def make_dm_mixed(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            """The mask prepared once, outside timing (as the peers' pre-combined bias is not:
            a training step that reuses a mask prepares it once)."""
            f = ctx.dm_attr("flash_dmattn_func")
            mixed = ctx.dm_attr("MixedMask").from_dense_mask(inp["mask"], (128, 128))
            q, k, v = inp["q"], inp["k"], inp["v"]
            return fwd_bwd(lambda: f(q, k, v, attn_bias=inp["bias"], sparse_mask=mixed), inp,
                           True)

        impls.append(Impl("dmattn fwd+bwd, the mask prepared once as a MixedMask", "variant",
                          make_dm_mixed, flops=flops, to_ours=None))
    if sparse:
        def make_dm_dense(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_func")
            q, k, v = inp["q"], inp["k"], inp["v"]
            mask = block_dense(torch, table_t, Sq, Sk)[None, None]
            return fwd_bwd(lambda: f(q, k, v, attn_mask=mask), inp, True)

        impls.append(Impl("dmattn fwd+bwd, same pattern as a dense attn_mask", "variant",
                          make_dm_dense, flops=flops))
    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers or qbias:
            continue

        def make_sdpa(inp: dict[str, Any], info_: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            am = inp["bias"] if with_bias else None
            if with_mask:   # pre-combined, inside the timing (the bias gradient flows through)
                am = additive(torch, inp["mask"], am, dt)
            if sparse:
                am = additive(torch, block_dense(torch, table_t, Sq, Sk), None, dt)[None, None]
            if causal and Sq != Sk:
                am = additive(torch, causal_allowed(torch, 0, Sq, Sq, Sk, dev), None,
                              dt)[None, None]
            fwd = sdpa_peer(ctx, peer, tr(inp["q"]), tr(inp["k"]), tr(inp["v"]), am,
                            causal and Sq == Sk, info_, grad=True)
            return fwd_bwd(fwd, inp, False)

        impls.append(Impl(f"sdpa-{peer} fwd+bwd", "peer", make_sdpa, flops=flops))
    for fname, flash in flex_names(ctx):
        if flash and with_bias:
            continue    # the FLASH backend refuses captured tensors that require grad

        def make_flex(inp: dict[str, Any], info_: dict[str, Any], flash: bool = flash
                      ) -> Callable[[], Any]:
            from torch.nn.attention.flex_attention import create_block_mask

            flex = flex_call(ctx, flash)
            q, k, v = tr(inp["q"]), tr(inp["k"]), tr(inp["v"])
            kw: dict[str, Any] = {"enable_gqa": True} if gqa else {}
            if with_mask:
                mask, bias = inp["mask"], inp["bias"]

                def mb_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return torch.where(mask[b, h, qi, kv], score + bias[b, h, qi, kv],
                                       -float("inf"))

                kw["score_mod"] = mb_sm
            elif with_bias:
                bias = inp["bias"].expand(B, -1, -1, -1)   # a stride-0 view where shared
                if kbias:
                    def kbias_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                        return score + bias[b, h, 0, kv]

                    kw["score_mod"] = kbias_sm
                elif qbias:
                    def qbias_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                        return score + bias[b, h, qi, 0]

                    kw["score_mod"] = qbias_sm
                else:
                    def bias_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                        return score + bias[b, h, qi, kv]

                    kw["score_mod"] = bias_sm
            if sparse:
                flat, ncb = table_t.reshape(-1), table_t.shape[1]

                def random_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return flat[(qi // SPARSE_BLOCK) * ncb + kv // SPARSE_BLOCK]

                kw["block_mask"] = create_block_mask(random_mm, None, None, Sq, Sk, device=dev)
            if causal:
                off = Sk - Sq

                def causal_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return qi + off >= kv

                kw["block_mask"] = create_block_mask(causal_mm, None, None, Sq, Sk, device=dev)
            return fwd_bwd(lambda: flex(q, k, v, **kw), inp, False)

        impls.append(Impl(f"{fname} fwd+bwd", "peer", make_flex, flops=flops))
    if "fa4" in ctx.peers and not with_bias and not sparse:
        def make_fa4(inp: dict[str, Any], info_: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.fa4()
            q, k, v = inp["q"], inp["k"], inp["v"]
            return fwd_bwd(lambda: f(q, k, v, causal=causal)[0], inp, True)

        impls.append(Impl("fa4 fwd+bwd", "peer", make_fa4, flops=flops, to_ours=None))

    def reference(inp: dict[str, Any]) -> list[Any]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        F = torch.nn.functional
        lv = [x.detach().float().requires_grad_() for x in leaves(inp)]
        q, k, v = tr(lv[0]), tr(lv[1]), tr(lv[2])
        if gqa:
            k = k.repeat_interleave(g, dim=1)
            v = v.repeat_interleave(g, dim=1)
        am = lv[3] if with_bias else None
        if with_mask:
            am = additive(torch, inp["mask"], am)
        if sparse:
            am = additive(torch, block_dense(torch, table_t, Sq, Sk))[None, None]
        if causal:
            am = additive(torch, causal_allowed(torch, 0, Sq, Sq, Sk, dev))[None, None]
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=am)
        out = tr(out)
        grads = torch.autograd.grad(out, lv, inp["dout"].float())
        return [out.detach(), *grads]

    def select(out: Any) -> list[Any]:
        return list(out)

    return Setup(CASES[name], shape, "tflops", make_inputs, impls, reference, select,
                 "fp32 SDPA-math autograd (out, dq, dk, dv" + (", dbias" if with_bias else "")
                 + ")", info)


