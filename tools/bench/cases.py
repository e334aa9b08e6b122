"""Case names, suites, default shapes and the constants the cases share (no torch)."""

from __future__ import annotations

import argparse
from typing import Any

CASES: dict[str, str] = {
    "dense": "no mask, no bias",
    "causal": "causal (bottom-right aligned)",
    "mask_bias": "full (B,H,Sq,Sk) bool mask (random, 90% kept) + (B,H,Sq,Sk) bias",
    "mask_bias_mixed": "mask_bias with the mask prepared once (MixedMask.from_dense_mask, "
                       "outside timing like the peers' pre-combined bias): block lists with "
                       "element bits on the 128-key bias spec",
    "mask_bias_doc": "(B,1,Sq,Sk) document mask (8 packed documents of random lengths per "
                     "sequence: most key tiles all false) + (B,H,Sq,Sk) bias",
    "mask_bias_doc_mixed": "mask_bias_doc with the mask prepared once as a MixedMask (outside "
                           "timing): block lists, element bits on the documents' edges",
    "bias": "full (B,H,Sq,Sk) bias, no mask (mask_bias without its mask: 2 bytes per element "
            "instead of 3)",
    "mask_hf": "(B,1,Sq,Sk) bool mask (transformers' layout; default S=2527: rows of an odd "
               "number of bytes)",
    "kbias": "key-side bias (B,H,1,Sk)",
    "kbias_hk": "key-side bias (B,Hk,1,Sk) per kv head, GQA",
    "qbias": "query-side bias (B,H,Sq,1): one value per query row (the Hopper forward under "
             "DMATTN_FWD_ROW_BIAS=1, the portable one otherwise)",
    "dense_d64": "no mask, no bias, head dim 64",
    "dense_d256": "no mask, no bias, head dim 256",
    "dense_fp16": "no mask, no bias, fp16",
    "gqa": "no mask, no bias, GQA (H32 / Hk8)",
    "softcap": "no mask, no bias, softcap 30 (tanh capping of the scaled scores)",
    "sparse_window": "CausalWindowMask(1024) block-sparse (= window_size (1023, 0))",
    "sparse_random": "BlockBitsetMask: random 10% of 128x128 blocks (+ diagonal)",
    "decode": "varlen decode: key-based bool mask + bias (total_k, Hk), GQA",
    "decode_paged": "the decode case through flash_dmattn_with_kvcache: paged KV cache "
                    "(pages 64/16/256) and a dense cache, key-based mask + bias over it",
    "decode_b1": "the decode case for one sequence of 8192 keys (single-stream serving: a "
                 "split-KV grid and its combine)",
    "decode_b16": "the decode case for 16 sequences of 2048 keys (a split grid of 16-tile CTAs)",
    "prefill_varlen": "varlen prefill, random lengths, key-based bias (total_k, H)",
    "backward": "forward + backward, no mask / bias",
    "backward_bias": "forward + backward, full (B,H,S,S) bias with grad",
    "backward_sparse": "forward + backward, BlockBitsetMask: random 10% of 128x128 blocks "
                       "(+ diagonal)",
    "backward_causal": "forward + backward, causal",
    "backward_kbias": "forward + backward, key-side (B,H,1,S) bias with grad",
    "backward_qbias": "forward + backward, query-side (B,H,S,1) bias with grad (the Hopper "
                      "kernels without it under DMATTN_FWD_ROW_BIAS=1, the portable ones "
                      "otherwise)",
    "backward_bias_b1": "forward + backward, full (1,H,S,S) bias shared by the batch, with grad",
    "backward_kbias_b1": "forward + backward, key-side (1,H,1,S) bias shared by the batch, "
                         "with grad",
    "backward_mask_bias": "forward + backward, full (B,H,S,S) bool mask (random, 90% kept) + "
                          "full bias with grad",
    "host_fwd": "host time per call, forward, tiny shape (torch inputs; dmattn also CuPy)",
    "host_decode": "host time per call, decode step: 1 query, 4096 keys, H32/Hk8, key bias",
    "host_fwd_bwd": "host time per call, forward + backward (torch autograd), tiny shape",
    "host_first_call": "wall time of the first forward + backward in a new process",
}

# cases whose rows are host time per call (metric "us"), not GPU throughput
HOST_CASES = ("host_fwd", "host_decode", "host_fwd_bwd", "host_first_call")

SUITES: dict[str, list[str]] = {
    "all": list(CASES),
    "forward": ["dense", "causal", "mask_bias", "kbias", "kbias_hk", "dense_d64", "dense_d256",
                "dense_fp16", "gqa", "softcap"],
    "issue12": ["dense", "causal", "kbias", "mask_bias", "mask_bias_mixed", "dense_d64",
                "dense_d256", "dense_fp16"],
    "mask": ["mask_bias", "mask_bias_mixed", "mask_bias_doc", "mask_bias_doc_mixed", "bias",
             "mask_hf", "kbias", "kbias_hk", "decode"],
    "sparse": ["sparse_window", "sparse_random"],
    "varlen": ["decode", "prefill_varlen"],
    "decode": ["decode", "decode_paged", "decode_b1", "decode_b16"],
    "backward": ["backward", "backward_bias", "backward_sparse"],
    "fwdbwd": ["backward", "backward_causal", "backward_bias", "backward_kbias",
               "backward_qbias", "backward_bias_b1", "backward_kbias_b1",
               "backward_mask_bias", "backward_sparse"],
    "host": list(HOST_CASES),
}

# Per-case default shapes; every flag given on the command line overrides them.
# decode: batch = sequences, seqlen = queries per sequence, seqlen_k = keys per sequence.
# prefill_varlen: batch = sequences, seqlen = longest length (lengths in [seqlen/8, seqlen]).
_BASE: dict[str, Any] = {"batch": 2, "heads": 16, "kv_heads": None, "seqlen": 4096,
                         "seqlen_k": None, "headdim": 128, "dtype": "bf16"}
_HOST = {"batch": 1, "heads": 1, "seqlen": 128, "headdim": 64}
CASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "dense": {},
    "causal": {},
    "mask_bias": {},
    "mask_bias_mixed": {},
    "mask_bias_doc": {},
    "mask_bias_doc_mixed": {},
    "bias": {},
    "mask_hf": {"seqlen": 2527},
    "kbias": {},
    "kbias_hk": {"heads": 32, "kv_heads": 8},
    "qbias": {},
    "dense_d64": {"headdim": 64},
    "dense_d256": {"headdim": 256},
    "dense_fp16": {"dtype": "fp16"},
    "gqa": {"heads": 32, "kv_heads": 8},
    "softcap": {},
    "sparse_window": {"batch": 1, "seqlen": 16384},
    "sparse_random": {"batch": 1, "seqlen": 16384},
    "decode": {"batch": 64, "heads": 32, "kv_heads": 8, "seqlen": 1, "seqlen_k": 4096},
    "decode_paged": {"batch": 64, "heads": 32, "kv_heads": 8, "seqlen": 1, "seqlen_k": 4096},
    "decode_b1": {"batch": 1, "heads": 32, "kv_heads": 8, "seqlen": 1, "seqlen_k": 8192},
    "decode_b16": {"batch": 16, "heads": 32, "kv_heads": 8, "seqlen": 1, "seqlen_k": 2048},
    "prefill_varlen": {"batch": 8, "heads": 16, "seqlen": 4096},
    "backward": {"seqlen": 2048},
    "backward_bias": {"seqlen": 2048},
    "backward_sparse": {"batch": 1, "seqlen": 8192},
    "backward_causal": {"seqlen": 2048},
    "backward_kbias": {"seqlen": 2048},
    "backward_qbias": {"seqlen": 2048},
    "backward_bias_b1": {"seqlen": 2048},
    "backward_kbias_b1": {"seqlen": 2048},
    "backward_mask_bias": {"seqlen": 2048},
    "host_fwd": dict(_HOST),
    "host_decode": {"batch": 1, "heads": 32, "kv_heads": 8, "seqlen": 1, "seqlen_k": 4096},
    "host_fwd_bwd": dict(_HOST),
    "host_first_call": dict(_HOST),
}
SHAPE_KEYS = ("batch", "heads", "kv_heads", "seqlen", "seqlen_k", "headdim", "dtype")

WINDOW = 1024             # sparse_window: CausalWindowMask(WINDOW) == window_size (WINDOW-1, 0)
SPARSE_BLOCK = 128        # sparse_random: block size of the bitset mask
SPARSE_DENSITY = 0.10     # sparse_random: fraction of random blocks kept (diagonal added)
MASK_KEEP = 0.90          # mask_bias / decode: fraction of mask elements kept
DOC_COUNT = 8             # mask_bias_doc: packed documents per sequence
SOFTCAP = 30.0            # softcap case
# sdpa-*: torch SDPA backends; flex: compiled FlexAttention (Triton); flex-flash: the same with
# kernel_options={"BACKEND": "FLASH"} (runs FA4's CuTe kernels); fa4: flash_attn.cute
PEERS = ("flash", "cudnn", "efficient", "flex", "flex-flash", "fa4")


def case_shape(name: str, args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Default shape of a case with the command-line overrides applied."""
    if name not in CASES:
        raise KeyError(f"unknown case {name!r}")
    shape = dict(_BASE)
    shape.update(CASE_DEFAULTS[name])
    if args is not None:
        for key in SHAPE_KEYS:
            val = getattr(args, key, None)
            if val is not None:
                shape[key] = val
    kv = shape["kv_heads"]
    if kv is None or (getattr(args, "kv_heads", None) is None
                      and (kv > shape["heads"] or shape["heads"] % kv)):
        # --heads without --kv-heads: keep the case's GQA group when it still divides
        shape["kv_heads"] = shape["heads"]
    if shape["seqlen_k"] is None:
        shape["seqlen_k"] = shape["seqlen"]
    return shape
