"""The Hopper forward's work-item schedules (cuda_src/sm90/fwd.cu: DM_SM90_PERSISTENT) on the
GPU. Each case runs with the static persistent (1) and the dynamic (2) schedule, on grids capped
small (DM_SM90_MAX_CTAS: every CTA walks many items, skipped varlen items and items without a
key tile included), and must equal the one-CTA-per-item launch (=0) bit for bit (an item's
arithmetic does not depend on the CTA that runs it) and the float64 reference. The debug tile
counters count every item exactly once; the dynamic scheduler's counter is zero after every
launch (nothing resets it between launches but the kernel), in CUDA graphs and on concurrent
streams.

The whole forward suite also runs under a schedule through the environment, e.g.
``DMATTN_NVRTC_DEFINES="DM_SM90_PERSISTENT=2 DM_SM90_MAX_CTAS=5" pytest -m gpu
tests/gpu/test_forward_sm90.py``."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from gpu_helpers import assert_fa_close, f64
from test_graphs import _capture

import dmattn_cupy as dm
from dmattn_cupy import forward_sm90, scratch
from dmattn_cupy.forward import forward_call, run_forward, select_fwd_spec
from dmattn_cupy.validate import check_dense, check_varlen

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("hopper_only")]


# (name, DM_SM90_PERSISTENT, DM_SM90_MAX_CTAS (0: min(items, SMs)), DM_SM90_LPT_HEADS (None:
# the kernel's default sections, where they divide batch * heads))
SCHEDULES = [("static_3", 1, 3, None), ("dynamic_1", 2, 1, None), ("dynamic_3", 2, 3, None),
             ("dynamic_7", 2, 7, None), ("dynamic_sms", 2, 0, None),
             ("dynamic_3_lpt0", 2, 3, 0), ("dynamic_sms_lpt8", 2, 0, 8)]


ONE_PER_ITEM = "DM_SM90_PERSISTENT=0"   # the reference launch: one CTA per item
AMBIENT_DEFINES = os.environ.get("DMATTN_NVRTC_DEFINES", "").strip()


def _defines(mode: int, cap: int, section: int | None = None) -> str:
    return (f"DM_SM90_PERSISTENT={mode}" + (f" DM_SM90_MAX_CTAS={cap}" if cap else "")
            + (f" DM_SM90_LPT_HEADS={section}" if section is not None else ""))


def _under(monkeypatch, defines: str, fn):
    # The schedule's defines join those the run started with (a racecheck build's).
    defines = " ".join(d for d in (AMBIENT_DEFINES, defines) if d)
    if defines:
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
    else:
        monkeypatch.delenv("DMATTN_NVRTC_DEFINES", raising=False)
    res = fn()
    torch.cuda.synchronize()
    return res


def _rand(shape, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to("cuda", dtype)


def _qkv(b, sq, sk, h, hk, d, seed, dtype=torch.bfloat16):
    return (_rand((b, sq, h, d), seed, dtype), _rand((b, sk, hk, d), seed + 1, dtype),
            _rand((b, sk, hk, d), seed + 2, dtype))


def _dense_case(name: str):
    """(q, k, v, kwargs of flash_dmattn_func)."""
    if name == "causal_gqa":        # 8 query tiles x 16 (batch, head): 128 items
        return (*_qkv(2, 1000, 1300, 8, 2, 128, 1), {"is_causal": True})
    if name == "window":
        return (*_qkv(2, 1000, 1300, 8, 2, 128, 2), {"window_size": (200, 30)})
    if name == "sq_gt_sk_causal":   # bottom-right causal: query tiles 0-3 see no key at all
        return (*_qkv(1, 700, 200, 4, 4, 64, 3), {"is_causal": True})
    if name == "d256_softcap":     # 6 (batch, head) pairs: not a multiple of the LPT sections
        return (*_qkv(1, 600, 700, 6, 2, 256, 4, torch.float16),
                {"is_causal": True, "softcap": 8.0})
    if name == "kbias":
        q, k, v = _qkv(2, 300, 1000, 4, 2, 128, 5)
        bias = 2 * _rand((2, 4, 1, 1000), 6)
        bias[..., 17::97] = float("-inf")
        return q, k, v, {"attn_bias": bias}
    if name == "mask_bias":         # mask ring + 3-stage K/V/bias ring across items
        q, k, v = _qkv(2, 300, 1008, 4, 2, 64, 7)
        g = torch.Generator().manual_seed(8)
        mask = torch.rand(2, 4, 300, 1008, generator=g) > 0.1
        mask[0, 1, :, 128:320] = False
        mask[1, 2, :, 448:576] = True
        bias = torch.randn(2, 4, 300, 1008, generator=g).to(torch.bfloat16)
        return q, k, v, {"attn_mask": mask.cuda(), "attn_bias": bias.cuda(), "is_causal": True}
    raise ValueError(name)


DENSE = ("causal_gqa", "window", "sq_gt_sk_causal", "d256_softcap", "kbias", "mask_bias")


def _reference_check(q, k, v, out, lse, kw):
    window = list(kw.get("window_size", (-1, -1)))
    if kw.get("is_causal"):
        window[1] = 0 if window[1] < 0 else min(window[1], 0)
    assert_fa_close(out, lse, dict(q=f64(q), k=f64(k), v=f64(v), mask=f64(kw.get("attn_mask")),
                                   bias=f64(kw.get("attn_bias")), scale=q.shape[-1] ** -0.5,
                                   softcap=kw.get("softcap", 0.0), window=tuple(window)),
                    str(q.dtype).removeprefix("torch."))


@pytest.mark.parametrize("sched", SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("name", DENSE)
def test_schedules_equal_one_cta_per_item(monkeypatch, name, sched):
    _, mode, cap, section = sched
    q, k, v, kw = _dense_case(name)
    pb = check_dense(q, k, v, kw.get("attn_mask"), kw.get("attn_bias"), None,
                     kw.get("is_causal", False), kw.get("window_size", (-1, -1)),
                     kw.get("softcap", 0.0), "cuda")
    assert select_fwd_spec(pb).family == "fwd_sm90"

    def call():
        return dm.flash_dmattn_func(q, k, v, return_lse=True, **kw)

    base = _under(monkeypatch, ONE_PER_ITEM, call)
    got = _under(monkeypatch, _defines(mode, cap, section), call)
    for a, b in zip(base, got, strict=True):
        assert torch.equal(a, b), f"max diff {(a.float() - b.float()).abs().max().item()}"
    _reference_check(q, k, v, *got, kw)
    # the launch really was the capped persistent grid
    items = math.ceil(q.shape[1] / forward_sm90.BLOCK_M) * q.shape[0] * q.shape[2]
    _, _, plan = _under(monkeypatch, _defines(mode, cap, section),
                        lambda: forward_call(pb, q))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    want = items if mode == 0 else min(items, sms, cap or sms)
    assert plan.launches[0].grid == (want, 1, 1)


LENS = {   # per sequence (len_q, len_k): empty sequences, len_q > len_k, tiles past a sequence
    "empty": ([0, 300, 17, 0, 129], [12, 0, 304, 0, 200]),
    "q_gt_k": ([300, 7, 129, 250], [100, 7, 0, 304]),
}


@pytest.mark.parametrize("sched", SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lens", list(LENS), ids=list(LENS))
def test_varlen_items_past_a_sequence_are_passed_over(monkeypatch, lens, causal, sched):
    """Varlen query tiles of max_seqlen_q past their own sequence have nothing to do: the
    dynamic producer claims the next item without telling the consumers."""
    _, mode, cap, section = sched
    lq, lk = LENS[lens]
    g = torch.Generator().manual_seed(21)
    cu_q = torch.tensor(np.concatenate([[0], np.cumsum(lq)]), dtype=torch.int32)
    cu_k = torch.tensor(np.concatenate([[0], np.cumsum(lk)]), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), 4, 64, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(int(cu_k[-1]), 2, 64, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(int(cu_k[-1]), 2, 64, generator=g).to("cuda", torch.bfloat16)
    bias = torch.randn(int(cu_k[-1]), 2, generator=g).to("cuda", torch.bfloat16)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    pb = check_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), None, bias, None, causal,
                      (-1, -1), 0.0, "cuda")
    assert select_fwd_spec(pb).family == "fwd_sm90"

    def call():
        return dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                           attn_bias=bias, is_causal=causal, return_lse=True)

    base = _under(monkeypatch, ONE_PER_ITEM, call)
    got = _under(monkeypatch, _defines(mode, cap, section), call)
    for a, b in zip(base, got, strict=True):
        assert torch.equal(a, b)
    assert_fa_close(got[0], got[1], dict(q=f64(q), k=f64(k), v=f64(v), cu_q=cu_q.cpu().numpy(),
                                         cu_k=cu_k.cpu().numpy(), mask=None, bias=f64(bias),
                                         scale=64 ** -0.5,
                                         window=(-1, 0) if causal else (-1, -1)),
                    "bfloat16", varlen=True)


@pytest.mark.parametrize("sched", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_tile_counters_count_every_item_once(monkeypatch, sched):
    """Debug builds count per item the tiles loaded and masked: a claimed-twice item would
    count twice, a lost one zero."""
    _, mode, cap, section = sched
    # Sk 1104: the mask's rows are 16-byte multiples, as TMA (the sm_90a family) needs
    q, k, v = _qkv(2, 900, 1104, 4, 4, 64, 9)
    mask = torch.rand(2, 4, 900, 1104, device="cuda") > 0.2
    mask[0, :, :, 256:512] = False      # all-false tiles: never loaded
    mask[1, :, :, 640:768] = True       # all-true: loaded, not masked

    def counted():
        pb = check_dense(q, k, v, mask, None, None, True, (-1, -1), 0.0, "cuda")
        spec = select_fwd_spec(pb, debug_counters=True)
        assert spec.family == "fwd_sm90"
        nm = math.ceil(q.shape[1] / spec.block_m)
        counters = torch.zeros(2, 4, nm, 2, dtype=torch.int32, device="cuda")
        out, lse = run_forward(pb, q, tile_counters=counters)
        return out, lse, counters

    base = _under(monkeypatch, ONE_PER_ITEM, counted)
    got = _under(monkeypatch, _defines(mode, cap, section), counted)
    assert (base[2][..., 0] > 0).all()
    for a, b in zip(base, got, strict=True):
        assert torch.equal(a, b)


def _kept_counters() -> list[int]:
    return [int(buf[0].item()) for buf in scratch._counters.values()]


def test_counter_is_zero_after_every_launch_of_changing_problems(monkeypatch):
    """One kept counter per stream serves every launch; each launch leaves it at 0 (atomicInc
    wraps at the last claim). If it did not, the next launch would skip its first items."""
    cases = [_dense_case(n) for n in DENSE]
    base = [_under(monkeypatch, ONE_PER_ITEM, lambda c=c: dm.flash_dmattn_func(
        c[0], c[1], c[2], return_lse=True, **c[3])) for c in cases]
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", _defines(2, 5))
    scratch.clear()
    for rep in range(3):
        for i in [0, 1, 4, 2, 5, 3][rep:] + [0, 1, 4, 2, 5, 3][:rep]:
            q, k, v, kw = cases[i]
            out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True, **kw)
            torch.cuda.synchronize()
            assert torch.equal(out, base[i][0]) and torch.equal(lse, base[i][1]), (rep, i)
            assert _kept_counters() == [0]


def test_concurrent_streams_use_their_own_counters(monkeypatch):
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", _defines(2, 4))
    q, k, v, kw = _dense_case("causal_gqa")
    want = dm.flash_dmattn_func(q, k, v, **kw)
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in range(3)]
    outs = []
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            outs.append([dm.flash_dmattn_func(q, k, v, **kw) for _ in range(4)])
    torch.cuda.synchronize()
    for o in outs:
        for x in o:
            assert torch.equal(x, want)
    assert len(scratch._counters) >= 3 and all(c == 0 for c in _kept_counters())


def test_cuda_graph_replays_with_its_own_counter(monkeypatch):
    """A captured launch gets a fresh zero-filled counter (the fill is part of the graph);
    replays give the eager answer, also after the inputs change in place, and leave the kept
    counters of the eager calls alone."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", _defines(2, 6))
    q, k, v, kw = _dense_case("mask_bias")

    def fn():
        return dm.flash_dmattn_func(q, k, v, return_lse=True, **kw)

    graph, static = _capture(fn)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        eager = fn()
        torch.cuda.synchronize()
        assert torch.equal(static[0], eager[0]) and torch.equal(static[1], eager[1])
    q.copy_(_rand(q.shape, 77))
    graph.replay()
    torch.cuda.synchronize()
    eager = fn()
    torch.cuda.synchronize()
    assert torch.equal(static[0], eager[0])
    assert all(c == 0 for c in _kept_counters())
