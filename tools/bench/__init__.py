"""Benchmark ``dmattn_cupy`` against torch SDPA (flash / cuDNN / efficient), FlexAttention
(compiled Triton and the FLASH backend) and FlashAttention-4 (``flash_attn.cute``).

Run from the repository root::

    PYTHONPATH=$PWD python3 tools/bench                      # every case
    PYTHONPATH=$PWD python3 tools/bench --suite issue12      # the issue-12 forward cases
    PYTHONPATH=$PWD python3 tools/bench --case decode --case sparse_random --quick
    PYTHONPATH=$PWD python3 tools/bench --suite fwdbwd --json out.json --plot out.png
    PYTHONPATH=$PWD python3 tools/bench --suite host         # host time per call

Everything runs in one process (but the host_first_call case, which starts new ones).
Timings are CUDA-event timings of the callable only (inputs, combined biases, block masks,
compiled FlexAttention are all built beforehand), the median of many repetitions after a
warm-up. The CPU is queued ahead of the GPU (a ``torch.cuda._sleep`` before each batch of
repetitions), so ``ms`` is GPU time; ``wall ms`` is back-to-back calls timed on the host,
host overhead included. Host cases: see host.py.

Layout: cases.py (names, suites, shapes), flops.py (FLOP / byte rules), timing.py,
targets.py (per-case targets), report.py (tables, JSON, plot), cli.py (arguments, main);
ctx.py (torch, dmattn, peer detection), peers.py (SDPA / Flex / FA4 callables),
common.py (shared helpers); one file per case family: case_forward.py, case_sparse.py,
case_decode.py, case_prefill.py, case_backward.py, host.py; runner.py runs a case.

Only the standard library is imported at import time: torch, CuPy, dmattn_cupy, FA4 and
matplotlib are imported inside functions, so the pure parts (FLOP counting, argument parsing,
table formatting, JSON writing) are testable on a machine without them. Only the public API
of dmattn_cupy is used.
"""

from __future__ import annotations

from .cases import (
                    CASE_DEFAULTS,
                    CASES,
                    HOST_CASES,
                    MASK_KEEP,
                    PEERS,
                    SHAPE_KEYS,
                    SOFTCAP,
                    SPARSE_BLOCK,
                    SPARSE_DENSITY,
                    SUITES,
                    WINDOW,
                    case_shape,
)
from .cli import build_parser, collect_meta, list_text, main, parse_args, print_header
from .flops import (
                    BWD_FACTOR,
                    FLOP_CONVENTION,
                    RATIO_CONVENTION,
                    attn_fwd_flops,
                    block_table_allowed,
                    causal_window_allowed,
                    causal_window_tiles,
                    elements_flops,
                    fwd_bwd_flops,
                    gbps,
                    random_block_table,
                    tflops,
                    varlen_fwd_flops,
                    varlen_lengths,
                    visited_tile_flops,
)
from .report import (
                    CaseResult,
                    ImplResult,
                    format_case,
                    format_table,
                    plot_results,
                    results_to_json,
                    summary_line,
                    write_json,
)
from .targets import TARGETS, Target, target_line, target_status
from .timing import percentile, rotation_sets

__all__ = [
    "BWD_FACTOR", "CASES", "CASE_DEFAULTS", "FLOP_CONVENTION", "HOST_CASES", "MASK_KEEP",
    "PEERS", "RATIO_CONVENTION", "SHAPE_KEYS", "SOFTCAP", "SPARSE_BLOCK", "SPARSE_DENSITY",
    "SUITES", "TARGETS", "Target", "WINDOW", "CaseResult", "ImplResult", "attn_fwd_flops",
    "block_table_allowed", "build_parser", "case_shape", "causal_window_allowed",
    "causal_window_tiles", "collect_meta", "elements_flops", "format_case", "format_table",
    "fwd_bwd_flops", "gbps", "list_text", "main", "parse_args", "percentile", "plot_results",
    "print_header", "random_block_table", "results_to_json", "rotation_sets", "summary_line",
    "target_line", "target_status", "tflops", "varlen_fwd_flops", "varlen_lengths",
    "visited_tile_flops", "write_json",
]
