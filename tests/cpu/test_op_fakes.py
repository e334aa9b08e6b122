"""The custom ops' fake (meta) implementations against their real ones over random calls
(tools/call_fuzz.good_case, dense and varlen, the GPU stubbed): torch.library.opcheck's schema
and fake-tensor checks, which compare every output's shape, dtype and strides. torch.compile
plans memory by the fake outputs, so a stride the real op does not produce would be read
wrongly there."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import call_fuzz  # noqa: E402  (tools/, on the path by tests/conftest.py)
import host_profile  # noqa: E402

from dmattn_cupy import autograd  # noqa: E402
from dmattn_cupy.validate import check_options  # noqa: E402

CHECKS = ("test_schema", "test_faketensor")


def _op_args(kw: dict) -> tuple:
    """The fwd op's arguments for call ``kw`` (as autograd.dense / varlen pass them)."""
    q = kw["query"]
    scale, cap, window = check_options(kw.get("softmax_scale"), kw.get("softcap", 0.0),
                                       kw.get("window_size", (-1, -1)),
                                       kw.get("is_causal", False), q.shape[-1])
    return (q, kw["key"], kw["value"], kw.get("attn_mask"), kw.get("attn_bias"),
            kw.get("cu_seqlens_q"), kw.get("cu_seqlens_k"), kw.get("max_seqlen_q", 0),
            kw.get("max_seqlen_k", 0), scale, window[0], window[1], cap,
            bool(kw.get("deterministic", False)), "auto", [], 0, 0)


@pytest.mark.parametrize("seed", range(0, 150, 5))
def test_fake_outputs_match_the_real_ops(seed, monkeypatch):
    case = call_fuzz.good_case(seed, "cpu", call_fuzz.CPU_SIZES, apis=("dense", "varlen"))
    case.kwargs.pop("sparse_mask", None)
    fwd_args = _op_args(case.kwargs)
    with host_profile.stub_gpu():
        monkeypatch.setattr(autograd, "_kernel_device", lambda query, backend: True)
        torch.library.opcheck(torch.ops.dmattn_cupy.fwd.default, fwd_args, test_utils=CHECKS)
        out, lse = torch.ops.dmattn_cupy.fwd(*fwd_args)[:2]
        q, k, v, mask, bias, cu_q, cu_k, max_q, max_k, *opts = fwd_args[:15]
        for need_dbias in ({bias is not None, False}):
            bwd_args = (torch.randn(q.shape).to(q.dtype), q, k, v, out, lse, None, mask, bias,
                        cu_q, cu_k, max_q, max_k, *opts[:5], need_dbias, "auto", [], 0, 0)
            torch.library.opcheck(torch.ops.dmattn_cupy.bwd.default, bwd_args,
                                  test_utils=CHECKS)
