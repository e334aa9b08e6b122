"""The racecheck build computes what the default build computes, bit for bit.

DMATTN_NVRTC_DEFINES=DM_SM90_EACH_THREAD_ARRIVES=1 makes every thread that touched a ring stage
arrive on its barrier (cuda_src/sm90/primitives.cuh) instead of lane 0 after __syncwarp:
compute-sanitizer's racecheck follows only the former, so it runs on this build (BENCHMARKS,
fifteenth session). Its verdict speaks for the default kernels only if nothing else differs:
same outputs, lse and (deterministic) gradients. Forward: a mask + bias tile (the fold warps), a
key-row bias (the producer's rows), varlen under the dynamic scheduler; backward: the dQ writer
cases of test_backward_sm90_dq_writer (a mask + bias tile, a key-row bias with a window)."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward_sm90_dq_writer import check_builds_bitwise_equal
from test_forward_sm90 import _qkv

import dmattn_cupy as dm
from dmattn_cupy.forward import select_fwd_spec
from dmattn_cupy.validate import check_dense, check_varlen

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]

RACECHECK = "DM_SM90_EACH_THREAD_ARRIVES=1"


def _forward_case(name):
    """(the call, taking no arguments; its validated problem) of each forward case."""
    g = torch.Generator().manual_seed(7)
    if name == "mask_bias":  # 64-key tiles, the fold warps; whole tiles dropped
        q, k, v = _qkv(2, 300, 1008, 4, 2, 128, "bfloat16", 61)
        mask = torch.rand(2, 4, 300, 1008, generator=g) < 0.85
        mask[:, :, :128, 256:512] = False
        mask = mask.cuda()
        bias = torch.randn(2, 4, 300, 1008, generator=g).to("cuda", torch.bfloat16)
        return (lambda: dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias,
                                             return_lse=True),
                check_dense(q, k, v, mask, bias, None, False, (-1, -1), 0.0, "cuda"))
    if name == "key_row_bias":  # the producer warp stores the rows
        q, k, v = _qkv(2, 1000, 1300, 8, 2, 128, "float16", 62)
        bias = torch.randn(2, 8, 1, 1300, generator=g).to("cuda", torch.float16)
        bias[..., 5::113] = float("-inf")
        return (lambda: dm.flash_dmattn_func(q, k, v, attn_bias=bias, is_causal=True,
                                             return_lse=True),
                check_dense(q, k, v, None, bias, None, True, (-1, -1), 0.0, "cuda"))
    lq, lk = [300, 5, 700, 129], [500, 64, 650, 1]  # "varlen_key_bias"
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lq)]), dtype=torch.int32).cuda()
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lk)]), dtype=torch.int32).cuda()
    q = torch.randn(sum(lq), 4, 64, generator=g).to("cuda", torch.bfloat16)
    k, v = (torch.randn(sum(lk), 2, 64, generator=g).to("cuda", torch.bfloat16)
            for _ in range(2))
    bias = torch.randn(sum(lk), 2, generator=g).to("cuda", torch.bfloat16)
    return (lambda: dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                                attn_bias=bias, is_causal=True,
                                                return_lse=True),
            check_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), None, bias, None, True,
                         (-1, -1), 0.0, "cuda"))


@pytest.mark.parametrize("case", ["mask_bias", "key_row_bias", "varlen_key_bias"])
def test_forward_is_bitwise_the_default_builds(monkeypatch, case):
    call, pb = _forward_case(case)
    got = []
    for defines in ("", RACECHECK):
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
        assert select_fwd_spec(pb).family == "fwd_sm90", defines
        got.append(call())
        torch.cuda.synchronize()
    for name, a, b in zip(("out", "lse"), *got, strict=True):
        assert torch.equal(a, b), f"{name} of the racecheck build differs from the default's"


@pytest.mark.parametrize("case", ["d128", "d128_bias_mask", "d64_kbias_window"])
def test_backward_is_bitwise_the_default_builds(monkeypatch, case):
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_sm90")
    check_builds_bitwise_equal(monkeypatch, case, ("", RACECHECK))
