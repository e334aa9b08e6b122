"""Forward cases on (B,S,H,D) inputs: dense, causal, mask + bias, key-side bias, GQA, softcap,
the head-dim / dtype rows; and the builder the sparse family reuses (case_sparse.py).

A ``Kind`` says what a case adds to plain attention (inputs, dmattn keyword arguments,
the SDPA mask, the Flex score_mod / block mask, FA4 arguments, the reference); ``setup_forward``
turns a kind into the rows: dmattn (and its variants), SDPA flash / cuDNN / efficient, Flex
(Triton and FLASH backends), FA4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .cases import CASES, DOC_COUNT, MASK_KEEP, SOFTCAP
from .common import (
    Impl,
    Setup,
    additive,
    causal_allowed,
    mask_visited,
    ref_dense,
    smoke_batches,
    torch_dtype,
    tr,
)
from .ctx import Ctx
from .flops import attn_fwd_flops
from .peers import fa4_impl, flex_impl, flex_names, sdpa_peer


@dataclass
class Dims:
    torch: Any
    dev: Any
    B: int
    H: int
    Hk: int
    Sq: int
    Sk: int
    D: int
    dt: Any
    seed: int

    @property
    def g(self) -> int:
        return self.H // self.Hk

    @property
    def gqa(self) -> bool:
        return self.Hk != self.H


class Kind:
    """Plain attention: no mask, no bias."""

    causal = False
    softcap = 0.0
    sdpa = True          # SDPA can run it
    fa4 = True           # FA4 can run it

    def __init__(self, ctx: Ctx, d: Dims):
        self.ctx = ctx
        self.d = d
        self.info: list[str] = []
        self.flops = attn_fwd_flops(d.B, d.H, d.Sq, d.Sk, d.D, self.causal)
        self.visited: float | None = None        # dmattn / flex visited-tile FLOPs
        self.dense_tiles: float | None = None    # SDPA visited FLOPs (every tile)

    def inputs(self, gen: Any, rn: Callable[..., Any]) -> dict[str, Any]:
        return {}

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.causal:
            kw["is_causal"] = True
        if self.softcap:
            kw["softcap"] = self.softcap
        return kw

    def dm_variants(self) -> list[Impl]:
        return []

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        """attn_mask for SDPA (additive, query dtype, built once) and is_causal."""
        d = self.d
        if self.causal:
            if d.Sq == d.Sk:
                return None, True
            from torch.nn.attention.bias import causal_lower_right

            return causal_lower_right(d.Sq, d.Sk), False
        return None, False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        """score_mod / block_mask for Flex (``flash``: FLASH backend, index flat tensors)."""
        d = self.d
        a: dict[str, Any] = {}
        if self.causal:
            from torch.nn.attention.flex_attention import create_block_mask

            off = d.Sk - d.Sq

            def causal_mm(b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return qi + off >= kv

            a["block_mask"] = create_block_mask(causal_mm, None, None, d.Sq, d.Sk,
                                                device=d.dev)
        if self.softcap:
            cap = self.softcap
            torch = d.torch

            def softcap_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return cap * torch.tanh(score / cap)

            a["score_mod"] = softcap_sm
        return a

    def fa4_kwargs(self, inp: dict[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.causal:
            kw["causal"] = True
        if self.softcap:
            kw["softcap"] = self.softcap
        return kw

    def ref_add(self, inp: dict[str, Any], r0: int, r1: int, nb: int) -> Any:
        """Additive fp32 mask rows r0:r1 for the reference (None: nothing)."""
        d = self.d
        if self.causal:
            return additive(d.torch, causal_allowed(d.torch, r0, r1, d.Sq, d.Sk, d.dev))
        return None

    def reference(self, inp: dict[str, Any], nb: int) -> list[Any]:
        return [ref_dense(self.ctx, inp["q"], inp["k"], inp["v"],
                          lambda r0, r1: self.ref_add(inp, r0, r1, nb), nb)]


class Causal(Kind):
    causal = True


class MaskBias(Kind):
    """Full (B,H,Sq,Sk) bool mask + bias; SDPA (cuDNN included) gets them pre-combined into
    one additive bias."""

    fa4 = False

    def __init__(self, ctx: Ctx, d: Dims):
        super().__init__(ctx, d)
        self.info = ["SDPA rows (cuDNN included): mask and bias pre-combined into one additive "
                     "(B,H,Sq,Sk) bias outside timing; Flex: score_mod (flex-flash: flat index)"]

    def inputs(self, gen: Any, rn: Callable[..., Any]) -> dict[str, Any]:
        d = self.d
        return {"mask": d.torch.rand(d.B, d.H, d.Sq, d.Sk, generator=gen, device=d.dev)
                < MASK_KEEP, "bias": rn(d.B, d.H, d.Sq, d.Sk)}

    per_call_variant = True   # a row that prepares the mask as a MixedMask in every call

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        return {"attn_mask": inp["mask"], "attn_bias": inp["bias"]}

    def dm_variants(self) -> list[Impl]:
        """The mask packed into a MixedMask inside every call (from_dense_mask, then the lists
        route): what routing ``attn_mask`` that way would cost with today's API (its packing
        kernel under ``DMATTN_MASK_PACK=1``)."""
        if not self.per_call_variant:
            return []
        ctx = self.ctx

        def make(inp: dict[str, Any], note: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_func")
            pack = ctx.dm_attr("MixedMask").from_dense_mask
            q, k, v, mask, bias = (inp[n] for n in ("q", "k", "v", "mask", "bias"))
            return lambda: f(q, k, v, attn_bias=bias, sparse_mask=pack(mask, (128, 128)))

        return [Impl("dmattn MixedMask per call", "variant", make,
                     flops=self.flops)]

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        return additive(self.d.torch, inp["mask"], inp["bias"], self.d.dt), False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        d = self.d
        torch = d.torch
        mask, bias = inp["mask"], inp["bias"]
        per_head = mask.shape[1] > 1   # else one (B,1,Sq,Sk) mask shared by the heads

        def mh(h: Any) -> Any:
            return h if per_head else 0

        if flash:   # the FLASH backend wants 1-D indexing of captured tensors
            mf, bf = mask.reshape(-1), bias.reshape(-1)
            H, HM, Sq, Sk = d.H, mask.shape[1], d.Sq, d.Sk

            def mb_flat(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return torch.where(mf[((b * HM + mh(h)) * Sq + qi) * Sk + kv],
                                   score + bf[((b * H + h) * Sq + qi) * Sk + kv], -float("inf"))

            return {"score_mod": mb_flat}

        def mb_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
            return torch.where(mask[b, mh(h), qi, kv], score + bias[b, h, qi, kv],
                               -float("inf"))

        return {"score_mod": mb_sm}

    def ref_add(self, inp: dict[str, Any], r0: int, r1: int, nb: int) -> Any:
        return additive(self.d.torch, inp["mask"][:nb, :, r0:r1],
                        inp["bias"][:nb, :, r0:r1].float())


class PreparedMixed:
    """A mask + bias kind whose mask is prepared once, outside timing (as cuDNN's pre-combined
    bias is), by ``MixedMask.from_dense_mask``: it travels as block lists with element bits on
    the 128-key bias spec (mixed in before the kind's class)."""

    per_call_variant = False

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        mixed = self.ctx.dm_attr("MixedMask").from_dense_mask(inp["mask"], (128, 128))
        return {"attn_bias": inp["bias"], "sparse_mask": mixed}


class MaskBiasMixed(PreparedMixed, MaskBias):
    """mask_bias with its mask prepared once: block lists instead of (Sq, Sk) bytes beside the
    bias in shared memory."""


class MaskBiasDoc(MaskBias):
    """mask_bias with a structured mask: packed documents (DOC_COUNT per sequence, random
    lengths), each query seeing its own document's keys, one (B,1,Sq,Sk) mask shared by the
    heads (transformers' layout) beside the full bias. Most key tiles of a query tile are then
    all false, which a mask route that classifies tiles never loads."""

    def __init__(self, ctx: Ctx, d: Dims):
        super().__init__(ctx, d)
        self.info[0] += f"; {DOC_COUNT} documents per sequence, dense FLOPs counted"

    def inputs(self, gen: Any, rn: Callable[..., Any]) -> dict[str, Any]:
        d = self.d
        torch = d.torch
        if d.Sq > d.Sk:
            raise ValueError("mask_bias_doc needs seqlen <= seqlen_k")
        docs = []
        for _ in range(d.B):   # document ids of the keys; queries: bottom-right aligned
            cuts = torch.randperm(d.Sk - 1, generator=gen, device=d.dev)[:DOC_COUNT - 1] + 1
            ids = torch.zeros(d.Sk, dtype=torch.int32, device=d.dev)
            ids[cuts] = 1
            docs.append(ids.cumsum(0))
        kd = torch.stack(docs)                                     # (B, Sk)
        qd = kd[:, d.Sk - d.Sq:]
        mask = (qd[:, None, :, None] == kd[:, None, None, :])      # (B, 1, Sq, Sk)
        return {"mask": mask, "bias": rn(d.B, d.H, d.Sq, d.Sk)}


class MaskBiasDocMixed(PreparedMixed, MaskBiasDoc):
    """mask_bias_doc with its (B,1,Sq,Sk) mask prepared once (element bits for the partial
    blocks on the document edges): what the attn_mask route can reach, less its one read of
    the mask."""


class FullBias(Kind):
    """A full (B,H,Sq,Sk) bias without a mask (fwd_sm90's 128-key bias-tile spec: what
    mask_bias could reach with the mask out of shared memory)."""

    fa4 = False

    def inputs(self, gen: Any, rn: Callable[..., Any]) -> dict[str, Any]:
        d = self.d
        return {"bias": rn(d.B, d.H, d.Sq, d.Sk)}

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        return {"attn_bias": inp["bias"]}

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        return inp["bias"], False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        d = self.d
        bias = inp["bias"]
        if flash:   # the FLASH backend wants 1-D indexing of captured tensors
            bf, H, Sq, Sk = bias.reshape(-1), d.H, d.Sq, d.Sk

            def b_flat(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return score + bf[((b * H + h) * Sq + qi) * Sk + kv]

            return {"score_mod": b_flat}

        def b_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
            return score + bias[b, h, qi, kv]

        return {"score_mod": b_sm}

    def ref_add(self, inp: dict[str, Any], r0: int, r1: int, nb: int) -> Any:
        return inp["bias"][:nb, :, r0:r1].float()


class MaskHF(Kind):
    """A transformers-style (B,1,Sq,Sk) bool mask (every head shares it); at an odd Sk its rows
    are no 16-byte multiple (the row padding's case). SDPA gets it as an additive bias."""

    fa4 = False

    def inputs(self, gen: Any, rn: Callable[..., Any]) -> dict[str, Any]:
        d = self.d
        return {"mask": d.torch.rand(d.B, 1, d.Sq, d.Sk, generator=gen, device=d.dev)
                < MASK_KEEP}

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        return {"attn_mask": inp["mask"]}

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        return additive(self.d.torch, inp["mask"], None, self.d.dt), False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        d = self.d
        torch = d.torch
        mask = inp["mask"]
        if flash:   # the FLASH backend wants 1-D indexing of captured tensors
            mf, Sq, Sk = mask.reshape(-1), d.Sq, d.Sk

            def m_flat(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return torch.where(mf[(b * Sq + qi) * Sk + kv], score, -float("inf"))

            return {"score_mod": m_flat}

        def m_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
            return torch.where(mask[b, 0, qi, kv], score, -float("inf"))

        return {"score_mod": m_sm}

    def ref_add(self, inp: dict[str, Any], r0: int, r1: int, nb: int) -> Any:
        return additive(self.d.torch, inp["mask"][:nb, :, r0:r1])


class KBias(Kind):
    """Key-side bias (B,Hb,1,Sk) with Hb = H (kbias) or Hk (kbias_hk)."""

    fa4 = False
    per_kv_head = False

    def inputs(self, gen: Any, rn: Callable[..., Any]) -> dict[str, Any]:
        d = self.d
        return {"bias": rn(d.B, d.Hk if self.per_kv_head else d.H, 1, d.Sk)}

    def dm_kwargs(self, inp: dict[str, Any], note: dict[str, Any]) -> dict[str, Any]:
        return {"attn_bias": inp["bias"]}

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        b = inp["bias"]
        return (b.repeat_interleave(self.d.g, dim=1) if self.per_kv_head else b), False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        d = self.d
        bias = inp["bias"]
        g, Sk = d.g, d.Sk
        hb = d.Hk if self.per_kv_head else d.H
        if flash:   # bias[b, h, 0, kv] fails on the FLASH backend; index the flat bias
            bf = bias.reshape(-1)
            if self.per_kv_head:
                def kbh_flat(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                    return score + bf[(b * hb + h // g) * Sk + kv]

                return {"score_mod": kbh_flat}

            def kb_flat(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return score + bf[(b * hb + h) * Sk + kv]

            return {"score_mod": kb_flat}
        if self.per_kv_head:
            def kbh_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
                return score + bias[b, h // g, 0, kv]

            return {"score_mod": kbh_sm}

        def kb_sm(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
            return score + bias[b, h, 0, kv]

        return {"score_mod": kb_sm}

    def ref_add(self, inp: dict[str, Any], r0: int, r1: int, nb: int) -> Any:
        b = inp["bias"][:nb].float()
        return b.repeat_interleave(self.d.g, dim=1) if self.per_kv_head else b


class KBiasHk(KBias):
    per_kv_head = True


class QBias(FullBias):
    """Query-side bias (B,H,Sq,1): one value per query row. Softmax does not see it; it moves
    lse. The Hopper forward takes it under DMATTN_FWD_ROW_BIAS=1 (an lse shift after the
    forward), the portable one otherwise."""

    def inputs(self, gen: Any, rn: Callable[..., Any]) -> dict[str, Any]:
        d = self.d
        return {"bias": rn(d.B, d.H, d.Sq, 1)}

    def sdpa_mask(self, inp: dict[str, Any]) -> tuple[Any, bool]:
        # SDPA's cuDNN backend faults on this broadcast (misaligned address, torch 2.11), which
        # poisons the process: the peers get it materialized (outside the timed calls)
        d = self.d
        return inp["bias"].expand(d.B, d.H, d.Sq, d.Sk).contiguous(), False

    def flex_args(self, inp: dict[str, Any], flash: bool) -> dict[str, Any]:
        bf, H, Sq = inp["bias"].reshape(-1), self.d.H, self.d.Sq   # flat: the FLASH backend

        def qb_flat(score: Any, b: Any, h: Any, qi: Any, kv: Any) -> Any:
            return score + bf[(b * H + h) * Sq + qi]

        return {"score_mod": qb_flat}


class Softcap(Kind):
    """``softcap * tanh(s / softcap)`` on the scaled scores; SDPA has no softcap."""

    softcap = SOFTCAP
    sdpa = False

    def reference(self, inp: dict[str, Any], nb: int) -> list[Any]:
        d = self.d
        torch = d.torch
        q = tr(inp["q"][:nb].float())
        k = tr(inp["k"][:nb].float()).repeat_interleave(d.g, dim=1)
        v = tr(inp["v"][:nb].float()).repeat_interleave(d.g, dim=1)
        scale = 1.0 / math.sqrt(d.D)
        outs = []
        for r0 in range(0, d.Sq, 1024):
            s = q[:, :, r0:r0 + 1024] @ k.transpose(-1, -2) * scale
            s = self.softcap * torch.tanh(s / self.softcap)
            outs.append(torch.softmax(s, dim=-1) @ v)
        return [tr(torch.cat(outs, dim=2))]


KINDS: dict[str, type[Kind]] = {
    "dense": Kind, "dense_d64": Kind, "dense_d256": Kind, "dense_fp16": Kind, "gqa": Kind,
    "causal": Causal, "mask_bias": MaskBias, "mask_bias_mixed": MaskBiasMixed,
    "mask_bias_doc": MaskBiasDoc, "mask_bias_doc_mixed": MaskBiasDocMixed,
    "bias": FullBias, "mask_hf": MaskHF,
    "kbias": KBias,
    "kbias_hk": KBiasHk,
    "qbias": QBias,
    "softcap": Softcap,
}


def dims_of(ctx: Ctx, shape: dict[str, Any]) -> Dims:
    torch = ctx.torch
    d = Dims(torch, ctx.device, shape["batch"], shape["heads"], shape["kv_heads"],
             shape["seqlen"], shape["seqlen_k"], shape["headdim"],
             torch_dtype(torch, shape["dtype"]), ctx.args.seed)
    if d.H % d.Hk:
        raise ValueError(f"heads {d.H} is not a multiple of kv_heads {d.Hk}")
    return d


def setup_forward(ctx: Ctx, name: str, shape: dict[str, Any],
                  kind_cls: type[Kind] | None = None) -> Setup:
    """Rows of a forward case of kind ``kind_cls`` (default: ``KINDS[name]``)."""
    d = dims_of(ctx, shape)
    kind = (kind_cls or KINDS[name])(ctx, d)
    torch = d.torch
    flops = kind.flops

    def make_inputs(i: int) -> dict[str, Any]:
        gen = torch.Generator(device=d.dev).manual_seed(d.seed * 1000 + i)

        def rn(*s: int) -> Any:
            return torch.randn(*s, generator=gen, device=d.dev, dtype=d.dt)

        inp = {"q": rn(d.B, d.Sq, d.H, d.D), "k": rn(d.B, d.Sk, d.Hk, d.D),
               "v": rn(d.B, d.Sk, d.Hk, d.D)}
        inp.update(kind.inputs(gen, rn))
        return inp

    # ---- dmattn ----
    def make_dm(inp: dict[str, Any], note: dict[str, Any]) -> Callable[[], Any]:
        f = ctx.dm_attr("flash_dmattn_func")
        q, k, v = inp["q"], inp["k"], inp["v"]
        kw = kind.dm_kwargs(inp, note)
        if "sparse_mask" in kw:
            mask_visited(ctx, kw["sparse_mask"], d.B, d.H, d.D, note)
        return lambda: f(q, k, v, **kw)

    impls = [Impl("dmattn", "dmattn", make_dm, flops=flops, visited_flops=kind.visited)]
    if kind.causal:
        def make_dm_cm(inp: dict[str, Any], note: dict[str, Any]) -> Callable[[], Any]:
            f = ctx.dm_attr("flash_dmattn_func")
            m = ctx.dm_attr("CausalMask")(d.Sq, d.Sk)
            mask_visited(ctx, m, d.B, d.H, d.D, note)
            q, k, v = inp["q"], inp["k"], inp["v"]
            return lambda: f(q, k, v, sparse_mask=m)

        impls.append(Impl("dmattn sparse_mask=CausalMask", "variant", make_dm_cm, flops=flops))
    impls += kind.dm_variants()

    # ---- SDPA ----
    for peer in ("flash", "cudnn", "efficient"):
        if peer not in ctx.peers or not kind.sdpa:
            continue

        def make_sdpa(inp: dict[str, Any], note: dict[str, Any], peer: str = peer
                      ) -> Callable[[], Any]:
            am, ic = kind.sdpa_mask(inp)
            return sdpa_peer(ctx, peer, tr(inp["q"]), tr(inp["k"]), tr(inp["v"]), am, ic, note)

        impls.append(Impl(f"sdpa-{peer}", "peer", make_sdpa, flops=flops,
                          visited_flops=kind.dense_tiles, to_ours=tr))

    # ---- FlexAttention (Triton, FLASH) ----
    for fname, flash in flex_names(ctx):
        def flex_args(inp: dict[str, Any]) -> dict[str, Any]:
            a: dict[str, Any] = {"q": tr(inp["q"]), "k": tr(inp["k"]), "v": tr(inp["v"])}
            if d.gqa:
                a["enable_gqa"] = True
            a.update(kind.flex_args(inp, bool(inp.get("flash"))))
            return a

        impls.append(flex_impl(ctx, fname, flops, flex_args, kind.visited, flash=flash))

    # ---- FlashAttention-4 ----
    if "fa4" in ctx.peers and kind.fa4:
        impls.append(fa4_impl(ctx, "fa4", flops, kind.fa4_kwargs, kind.visited))

    nb = smoke_batches(shape)
    return Setup(CASES[name], shape, "tflops", make_inputs, impls,
                 lambda inp: kind.reference(inp, nb), lambda out: [out[:nb]],
                 f"fp32 SDPA-math on batch[:{nb}]", kind.info)
