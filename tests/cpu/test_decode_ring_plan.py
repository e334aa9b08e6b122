"""The sm_90a ring decode (sm90/fwd_decode_ring.cu) without a GPU: its shared-memory layout
against the kernel's own constants (NVRTC), stage counts and when it takes a call, the
persistent work split and the mbarrier ring schedule (a NumPy model of both roles). The
producer's K/V boxes over dense, varlen and paged caches: tests/cpu/test_ring_maps.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import decode, env, families
from dmattn_cupy.arrays import ArrayInfo
from dmattn_cupy.device import PRESETS
from dmattn_cupy.spec import HEAD_DIMS, KernelSpec

H200 = PRESETS["sm_90"]  # 132 SMs, 227 KB opt-in shared memory per block
A100 = PRESETS["sm_80"]


def _problem(batch=64, sq=1, sk=4096, h=32, hk=8, d=128, mask=True, bias=True, varlen=True,
             kv_ptr=0, kv_strides=None):
    """The bench shape; K/V packed (total_k, hk, d) when varlen, else (batch, sk, hk, d)."""
    q = ArrayInfo("cupy", "bfloat16", (1, 1, 1, d), (d, d, d, 1), 0, 0)
    shape = (batch * sk, hk, d) if varlen else (batch, sk, hk, d)
    strides = (hk * d, d, 1) if varlen else (sk * hk * d, hk * d, d, 1)
    kv = ArrayInfo("cupy", "bfloat16", shape, kv_strides or strides, 0, kv_ptr)
    mb = ArrayInfo("cupy", "bool", (1, 1), (1, 1), 0, 0)
    return decode.Problem(kind="cupy", backend="cuda", varlen=varlen, batch=batch, seqlen_q=sq,
                          seqlen_k=sk, heads=h, kv_heads=hk, head_dim=d, dtype="bfloat16",
                          scale=1.0, softcap=0.0, window=(-1, -1), q=q, k=kv, v=kv,
                          mask=mb if mask else None, bias=q if bias else None)


@pytest.fixture
def ring_on(monkeypatch):
    monkeypatch.setenv("DMATTN_DECODE_RING", "1")
    monkeypatch.delenv("DMATTN_DECODE_RING_STAGES", raising=False)
    monkeypatch.delenv("DMATTN_NUM_SPLITS", raising=False)


def _layout_model(d: int, warps: int) -> dict[str, int]:
    """RingLayout's regions, summed independently of families.ring_fixed_bytes."""
    stride = d + 8
    regions = [("q", 2 * 16 * stride * 2), ("o", 16 * (d + 4) * 4), ("lse", warps * 16 * 4),
               ("off", 2 * 16 * 8), ("bars", 2 * 8 * 8)]
    at, out = 0, {}
    for name, size in regions:
        out[name] = at
        at += size
    out["ring"] = (at + 127) // 128 * 128
    return out


@pytest.mark.parametrize("d", HEAD_DIMS)
def test_layout_model_matches_host(d):
    w = families.ring_warps(d)
    m = _layout_model(d, w)
    assert families.ring_fixed_bytes(d, w) == m["ring"]
    assert m["o"] % 16 == 0 and m["off"] % 8 == 0 and m["bars"] % 8 == 0
    for rows in (0, 1, 2, 16, 32):  # stages keep K/V boxes 128-byte aligned (TMA)
        assert families.ring_stage_bytes(d, rows, 0) % 128 == 0
        assert families.ring_tile_bytes(d) % 128 == 0


def test_layout_matches_the_kernel_constants():
    """The kernel derives its stage count from the launch's shared memory: its RingLayout must
    be the host's formula exactly (NVRTC static_asserts over every head dim)."""
    checks = "".join(
        f"static_assert(dm::RingLayout<{d}, {w}>::kRing == {families.ring_fixed_bytes(d, w)});\n"
        f"static_assert(dm::RingLayout<{d}, {w}>::kO == {_layout_model(d, w)['o']});\n"
        f"static_assert(dm::RingLayout<{d}, {w}>::kBars == {_layout_model(d, w)['bars']});\n"
        for d in HEAD_DIMS for w in (4, 8))
    checks += f"static_assert(dm::kRingMaxStages == {families.RING_MAX_STAGES});\n"
    compile_static_asserts('#include "sm90/fwd_decode_ring.cu"\n' + checks, "ring_layout.cu")


def test_stage_counts_on_h200(ring_on, monkeypatch):
    pb = _problem()
    # key-based (total_k, Hk) mask + bias: one staged row each -> 6 stages (the default cap)
    assert decode.ring_stages(pb, H200, 1, 1) == 6
    assert families.ring_smem(128, 8, 1, 1, 6) == 18048 + 6 * 35328 <= H200.smem_per_block
    assert families.ring_smem(128, 8, 1, 1, 7) > H200.smem_per_block  # 7 would not fit
    # query-based layouts stage 16 rows per tensor: fewer stages fit
    assert decode.ring_stages(pb, H200, 16, 16) == 4
    assert decode.ring_stages(_problem(d=256), H200, 16, 16) == 2
    assert families.ring_smem(256, 4, 16, 16, 2) == 34176 + 2 * (2 * 2 * 64 * 136 * 2 + 8192)
    assert decode.ring_stages(_problem(d=64), H200, 0, 0) == 6
    monkeypatch.setenv("DMATTN_DECODE_RING_STAGES", "8")
    assert decode.ring_stages(_problem(d=64), H200, 0, 0) == 8
    monkeypatch.setenv("DMATTN_DECODE_RING_STAGES", "3")
    assert decode.ring_stages(pb, H200, 1, 1) == 3


def test_when_the_ring_takes_a_call(ring_on, monkeypatch):
    pb = _problem()
    assert decode.ring_stages(pb, A100, 1, 1) == 0            # compute capability 9.0 only
    assert decode.ring_stages(_problem(d=36), H200, 1, 1) == 0    # 72-byte rows
    assert decode.ring_stages(_problem(d=40), H200, 1, 1) > 0     # 80 B
    assert decode.ring_stages(_problem(kv_ptr=8), H200, 1, 1) == 0   # base not 16-byte aligned
    assert decode.ring_stages(_problem(kv_strides=(1056, 132, 1)), H200, 1, 1) == 0  # 264 B
    # tensor maps cannot step a broadcast or negative stride: the cp.async kernel serves them
    assert decode.ring_stages(_problem(varlen=False), H200, 1, 1) == 6
    assert decode.ring_stages(_problem(varlen=False, kv_strides=(0, 1024, 128, 1)), H200, 1,
                              1) == 0
    assert decode.ring_stages(_problem(varlen=False, kv_strides=(0, -1024, 128, 1)), H200, 1,
                              1) == 0
    # a paged pool (num_pages, page_size, hk, d): its rows per page must be the page size
    pool = dataclasses.replace(_problem(varlen=False), varlen=False)
    assert decode.ring_stages(pool, H200, 1, 1, page_size=4096) == 6
    assert decode.ring_stages(pool, H200, 1, 1, page_size=64) == 0
    monkeypatch.setenv("DMATTN_DECODE_RING", "0")
    assert decode.ring_stages(pb, H200, 1, 1) == 0


def test_env_switches(monkeypatch):
    monkeypatch.delenv("DMATTN_DECODE_RING", raising=False)
    assert not env.decode_ring()
    monkeypatch.setenv("DMATTN_DECODE_RING", "yes")
    with pytest.raises(ValueError, match="DMATTN_DECODE_RING"):
        env.decode_ring()
    for bad in ("1", "9", "x"):
        monkeypatch.setenv("DMATTN_DECODE_RING_STAGES", bad)
        with pytest.raises(ValueError, match="DMATTN_DECODE_RING_STAGES"):
            env.decode_ring_stages()
    assert {"DMATTN_DECODE_RING", "DMATTN_DECODE_RING_STAGES"} <= set(env.PLAN_VARIABLES)


def test_specs():
    pb = _problem()
    spec = decode.ring_spec(pb)
    assert spec.id == "fwd_decode_ring_bf16_d128_m16n64w8_mask1_bias1_varlen1"
    assert spec.arch == "sm_90a" and spec.threads == 288
    assert spec.dynamic_smem == families.RING_SMEM
    assert spec.name_expression.startswith(
        "dm::flash_fwd_decode_ring_kernel<dm::BFloat16, 128, 16, 64, 8, true, true, true>")
    on_90 = [s for s in decode.all_decode_specs("sm_90") if s.family == "fwd_decode_ring"]
    assert len(on_90) == len({s.id for s in on_90}) == 2 * 6 * 8
    assert {s.num_warps for s in on_90 if s.head_dim <= 128} == {8}
    assert {s.num_warps for s in on_90 if s.head_dim > 128} == {4}
    assert decode.ring_spec(dataclasses.replace(pb, head_dim=256)).threads == 160
    assert not [s for s in decode.all_decode_specs("sm_80") if s.family == "fwd_decode_ring"]
    assert all(isinstance(s, KernelSpec) for s in on_90)


def test_splits_and_grid(ring_on):
    pb = _problem()
    spec = decode.ring_spec(pb)
    # the bench shape: 512 items on 132 persistent CTAs (3.88 items each): no split
    assert decode.choose_num_splits(pb, spec, 166, H200) == 1
    assert decode.ring_grid(pb, 1, H200) == (132, 1, 1)
    one = dataclasses.replace(pb, batch=1)           # 8 items: split up to the SMs
    ns = decode.choose_num_splits(one, spec, 166, H200)
    assert 8 < ns <= 64
    assert decode.ring_grid(one, ns, H200)[0] == min(132, 8 * ns)
    assert decode.ring_grid(dataclasses.replace(pb, batch=2, kv_heads=1, heads=4), 1,
                            H200) == (2, 1, 1)


# ---- NumPy model of the kernel's schedule -------------------------------------------------

def _items(batch, hk, m_blocks, ns):
    """ring_item's decomposition: item -> (b, kvh, m_block, split)."""
    out = []
    for item in range(batch * hk * m_blocks * ns):
        split = item % ns
        m_block = (item // ns) % m_blocks
        bh = item // (ns * m_blocks)
        out.append((bh // hk, bh % hk, m_block, split))
    return out


def _split_tiles(first, last, split, ns):
    n = last - first + 1
    t0 = first + n * split // ns
    return t0, first + n * (split + 1) // ns - t0


@pytest.mark.parametrize("batch,hk,m_blocks,ns,grid", [(64, 8, 1, 1, 132), (3, 2, 2, 7, 42),
                                                       (1, 1, 1, 1, 1), (5, 3, 1, 4, 132)])
def test_items_cover_the_old_grid_once(batch, hk, m_blocks, ns, grid):
    items = _items(batch, hk, m_blocks, ns)
    # the old kernel's grid (m_block * ns + split, kvh, b), in the same order
    old = [(b, kvh, x // ns, x % ns) for b in range(batch) for kvh in range(hk)
           for x in range(m_blocks * ns)]
    assert items == old
    taken = sorted(i for c in range(min(grid, len(items))) for i in range(c, len(items), grid))
    assert taken == list(range(len(items)))


@pytest.mark.parametrize("first,last,ns", [(0, 63, 1), (0, 63, 3), (2, 4, 7), (5, 5, 4),
                                           (0, -1, 2)])
def test_split_tiles_partition_the_span(first, last, ns):
    got = []
    for s in range(ns):
        t0, n = _split_tiles(first, last, s, ns)
        assert n >= 0
        got += list(range(t0, t0 + n))
    assert got == list(range(first, last + 1))


def _simulate_ring(tile_counts, stages, groups, seed):
    """Both roles of the ring as the kernel runs them, in a random interleaving: the producer
    fills tile T into stage T % stages after waiting `empty` with parity phase ^ 1; consumer
    group T % groups waits `full` with parity phase, computes, and its 4 warps arrive on
    `empty`. mbarrier model: a phase completes when its pending count reaches 0; waiting on
    parity p returns once the phase of parity p (the current one, or the one before) has
    completed. Returns the (tile, stage) each group computed, and asserts no stage is
    refilled before it was released."""
    rng = np.random.default_rng(seed)
    total = sum(tile_counts)
    full_phase = [0] * stages    # completed phases so far
    empty_phase = [0] * stages
    empty_pending = [4] * stages
    content = [None] * stages
    prod = {"T": 0, "stage": 0, "phase": 0}
    cons = [{"T": 0, "stage": 0, "phase": 0, "done": []} for _ in range(groups)]

    def passed(completed, parity):  # try_wait.parity: phase `parity` completed?
        # the current phase is `completed`; the phase with parity p before it has completed
        return completed % 2 != parity

    steps = 0
    while prod["T"] < total or any(c["T"] < total for c in cons):
        steps += 1
        assert steps < 100000, "deadlock"
        actors = ["p"] * (prod["T"] < total) + [g for g in range(groups) if cons[g]["T"] < total]
        a = actors[rng.integers(len(actors))]
        if a == "p":
            s = prod["stage"]
            if not passed(empty_phase[s], prod["phase"] ^ 1):
                continue
            assert content[s] is None, "a stage refilled before its consumers released it"
            content[s] = prod["T"]
            full_phase[s] += 1
            prod["T"] += 1
            prod["stage"] = (s + 1) % stages
            prod["phase"] ^= int(prod["stage"] == 0)
        else:
            c = cons[a]
            s = c["stage"]
            if c["T"] % groups == a:
                if not passed(full_phase[s], c["phase"]):
                    continue
                assert content[s] == c["T"], "a group read a stage holding another tile"
                c["done"].append((c["T"], s))
                empty_pending[s] -= 4
                if empty_pending[s] == 0:
                    empty_pending[s] = 4
                    empty_phase[s] += 1
                    content[s] = None
            c["T"] += 1
            c["stage"] = (s + 1) % stages
            c["phase"] ^= int(c["stage"] == 0)
    return [c["done"] for c in cons]


@pytest.mark.parametrize("stages", [2, 3, 6, 8])
@pytest.mark.parametrize("groups", [1, 2])
def test_ring_schedule_model(stages, groups):
    counts = [64, 0, 21, 1, 5]  # items of a CTA: n_my tiles each (0: no tiles)
    done = _simulate_ring(counts, stages, groups, seed=stages * 10 + groups)
    total = sum(counts)
    seen = sorted(t for d in done for t, _ in d)
    assert seen == list(range(total))                   # each tile computed exactly once
    for g, d in enumerate(done):
        assert all(t % groups == g and s == t % stages for t, s in d)
