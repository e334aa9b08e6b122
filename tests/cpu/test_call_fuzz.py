"""Random calls of the public API on the CPU (tools/call_fuzz.py), the GPU stubbed by
tools/host_profile.stub_gpu: malformed calls give a result or a ValueError/TypeError/
NotImplementedError and the two backends agree on what they accept; the well-formed calls that
tests/gpu/test_random_calls.py checks on a GPU are valid for both backends; and the defects this
fuzzing found stay fixed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import call_fuzz  # noqa: E402  (tools/, on the path by tests/conftest.py)
import host_profile  # noqa: E402

import dmattn_cupy as dm  # noqa: E402

CHUNK = 1000


@pytest.fixture
def checked(monkeypatch):
    monkeypatch.setenv("DMATTN_CHECK", "1")   # device-side values checked on the cuda backend


@pytest.mark.parametrize("chunk", range(8))
def test_malformed_calls_raise_named_errors_only(checked, chunk):
    found = call_fuzz.findings(chunk * CHUNK, CHUNK)
    assert not found, "\n".join(found[:5])


def test_the_fuzzer_reports_a_crash_and_a_disagreement(checked, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyError("planted")
    monkeypatch.setattr(dm, "flash_dmattn_func", crash)
    found = call_fuzz.findings(0, 200)
    assert any("KeyError: 'planted'" in f for f in found)
    monkeypatch.undo()
    monkeypatch.setenv("DMATTN_CHECK", "0")    # the cuda backend no longer reads cu_seqlens
    found = call_fuzz.findings(0, 3000)
    assert any("cuda: ok" in f and "cu_seqlens" in f for f in found)


@pytest.mark.parametrize("seed", range(0, 120, 3))
def test_good_cases_are_valid_for_both_backends(seed):
    case = call_fuzz.good_case(seed, "cpu", call_fuzz.CPU_SIZES if seed % 2 else
                               call_fuzz.GPU_SIZES)
    assert call_fuzz.outcome(case, backend="reference") == ("ok", "")
    with host_profile.stub_gpu():
        assert call_fuzz.outcome(case, backend="cuda") == ("ok", "")


@pytest.mark.parametrize("chunk", range(4))
def test_a_gradient_changes_nothing_of_what_is_accepted(chunk):
    """Good dense and varlen calls (the GPU's sizes, stubbed) run with a gradient wherever they
    run without one (autograd and the forward route masks alike: a block mask beside attn_mask
    at d256 once raised NotImplementedError without a gradient only)."""
    with host_profile.stub_gpu():
        for seed in range(1000 + 25 * chunk, 1025 + 25 * chunk):
            case = call_fuzz.good_case(seed, "cpu", call_fuzz.GPU_SIZES, ("dense", "varlen"))
            assert call_fuzz.outcome(case) == ("ok", ""), seed
            assert call_fuzz.outcome(call_fuzz.Case("grad", dict(case.kwargs))) == ("ok", ""), \
                seed


def test_good_cases_cover_the_layouts():
    cases = [call_fuzz.good_case(s, "cpu", call_fuzz.CPU_SIZES) for s in range(400)]
    kw = [c.kwargs for c in cases]
    assert {c.api for c in cases} == {"dense", "varlen", "kv"}
    assert any(isinstance(k.get("sparse_mask"), dm.MixedMask) for k in kw)
    assert any("block_table" in k for k in kw) and any("k" in k for k in kw)
    assert any(k.get("attn_bias") is not None and k["attn_bias"].dim() == 2 for k in kw)
    assert any(k.get("attn_mask") is not None and 0 in k["attn_mask"].stride() for k in kw)
    assert any(not k["query"].is_contiguous() for k in kw)
    assert any(k["query"].data_ptr() % 16 for k in kw)


# ----------------------------------------------------------------------------- found, fixed


def _bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


@pytest.mark.parametrize("backend", ["cuda", "reference"])
def test_zero_query_heads_give_empty_results(backend):
    q, k = _bf16(2, 3, 0, 64), _bf16(2, 5, 2, 64)
    cu_q = torch.tensor([0, 3, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 10], dtype=torch.int32)
    cache = _bf16(2, 16, 2, 64)
    with host_profile.stub_gpu():
        out, lse = dm.flash_dmattn_func(q, k, k, attn_bias=_bf16(2, 2, 3, 5), return_lse=True,
                                        backend=backend)
        assert out.shape == (2, 3, 0, 64) and lse.shape == (2, 0, 3)
        out, lse = dm.flash_dmattn_varlen_func(q.reshape(6, 0, 64), k.reshape(10, 2, 64),
                                               k.reshape(10, 2, 64), cu_q, cu_k, 3, 5,
                                               return_lse=True, backend=backend)
        assert out.shape == (6, 0, 64) and lse.shape == (0, 6)
        out = dm.flash_dmattn_with_kvcache(q, cache, cache, cache_seqlens=4, backend=backend)
        assert out.shape == (2, 3, 0, 64)
        qg = q.clone().requires_grad_(True)
        kg = k.clone().requires_grad_(True)
        dq, dk = torch.autograd.grad(dm.flash_dmattn_func(qg, kg, kg, backend=backend)
                                     .float().sum(), (qg, kg))
        assert dq.shape == q.shape and dk.shape == k.shape and not bool(dk.any())


def test_numpy_num_splits_is_an_int():
    q, cache = _bf16(3, 1, 4, 64), _bf16(3, 64, 2, 64)
    with host_profile.stub_gpu():
        out = dm.flash_dmattn_with_kvcache(q, cache, cache, cache_seqlens=20,
                                           num_splits=np.int32(2))
    assert out.shape == q.shape


@pytest.mark.parametrize("name", ["seqlen_q", "seqlen_k"])
def test_mask_lengths_beyond_int32(name):
    lengths = {"seqlen_q": 8, "seqlen_k": 8, name: 2**31}
    with pytest.raises(ValueError, match=f"{name} must be <= 2147483647"):
        dm.CausalMask(**lengths)
    dm.CausalMask(**dict(lengths, **{name: 2**31 - 1}))


@pytest.mark.parametrize("window", [(2**31, 0), (-1, 2**40)])
def test_window_beyond_int32_beside_a_parametric_mask(window):
    q = _bf16(1, 5, 2, 64)
    with host_profile.stub_gpu(), pytest.raises(ValueError, match="2\\*\\*31 - 1"):
        dm.flash_dmattn_func(q, q, q, sparse_mask=dm.CausalMask(5, 5), window_size=window)


def test_checked_varlen_backward_reads_cu_seqlens(checked):
    q, k = _bf16(6, 2, 64), _bf16(10, 2, 64)
    lse = torch.zeros(2, 6)
    cu_q, cu_k = torch.tensor([0, 3, 6], dtype=torch.int32), torch.tensor([0, 5, 9],
                                                                          dtype=torch.int32)
    with host_profile.stub_gpu(), pytest.raises(ValueError, match="cu_seqlens_k\\[-1\\]"):
        dm.flash_dmattn_varlen_backward(q, q, k, k, q, lse, cu_q, cu_k, 3, 5)
