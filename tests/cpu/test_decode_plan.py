"""Decode path planning without a GPU: the split heuristic, env switches, specs and smem."""

from __future__ import annotations

import dataclasses

import pytest

from dmattn_cupy import decode, env
from dmattn_cupy.arrays import ArrayInfo
from dmattn_cupy.device import PRESETS
from dmattn_cupy.spec import KernelSpec
from dmattn_cupy.validate import Problem

H100 = PRESETS["sm_90"]  # 132 SMs, 233472 bytes of shared memory per SM


def _problem(batch=64, sq=1, sk=4096, h=32, hk=8, d=128, mask=True, bias=True, varlen=True):
    info = ArrayInfo("cupy", "bfloat16", (1, 1, 1, d), (d, d, d, 1), 0, 0)
    mb = ArrayInfo("cupy", "bool", (1, 1), (1, 1), 0, 0)
    return Problem(kind="cupy", backend="cuda", varlen=varlen, batch=batch, seqlen_q=sq,
                   seqlen_k=sk, heads=h, kv_heads=hk, head_dim=d, dtype="bfloat16", scale=1.0,
                   softcap=0.0, window=(-1, -1), q=info, k=info, v=info,
                   mask=mb if mask else None, bias=info if bias else None)


def test_no_split_when_the_grid_fills_the_gpu():
    assert decode.num_splits_heuristic(ctas=512, slots=264, n_tiles=64) == 1
    assert decode.num_splits_heuristic(ctas=220, slots=264, n_tiles=64) == 1


def test_split_few_ctas_long_keys():
    s = decode.num_splits_heuristic(ctas=6, slots=264, n_tiles=64)
    assert 1 < s <= 64
    assert decode.num_splits_heuristic(ctas=1, slots=264, n_tiles=313) > 64
    assert decode.num_splits_heuristic(ctas=1, slots=264, n_tiles=1) == 1
    assert decode.num_splits_heuristic(ctas=4, slots=264, n_tiles=3) <= 3


def test_splits_only_where_they_shorten_the_work():
    for n_tiles in (5, 17, 64, 100):
        s = decode.num_splits_heuristic(ctas=2, slots=264, n_tiles=n_tiles)
        assert s == 1 or -(-n_tiles // s) != -(-n_tiles // (s - 1))


def test_env_switches(monkeypatch):
    pb = _problem()
    monkeypatch.delenv("DMATTN_DECODE", raising=False)
    assert decode.use_decode(pb)
    assert not decode.use_decode(dataclasses.replace(pb, seqlen_q=9))
    monkeypatch.setenv("DMATTN_DECODE", "1")
    assert decode.use_decode(dataclasses.replace(pb, seqlen_q=100))
    monkeypatch.setenv("DMATTN_DECODE", "0")
    assert not decode.use_decode(pb)
    monkeypatch.setenv("DMATTN_DECODE", "yes")
    with pytest.raises(ValueError, match="DMATTN_DECODE"):
        decode.use_decode(pb)
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "0")
    with pytest.raises(ValueError, match="DMATTN_NUM_SPLITS"):
        env.forced_splits()
    spec = decode.decode_spec(pb)
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "1000")  # capped by the key tiles (4096 / 64)
    assert decode.choose_num_splits(pb, spec, 128, H100) == 64
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "auto")
    assert decode.choose_num_splits(pb, spec, 185, H100) == 1  # 512 CTAs fill 132 SMs
    one = dataclasses.replace(pb, batch=1, kv_heads=1, heads=8)
    assert decode.choose_num_splits(one, spec, 185, H100) > 1


def test_fused_combine_where_a_group_s_partials_are_few(monkeypatch):
    """The decode grid merges its own partials where a group's (packed rows x splits x head
    dim, fp32) take at most FUSED_COMBINE_MAX_BYTES; DMATTN_SPLIT_COMBINE forces either way,
    and an unsplit launch never merges."""
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "auto")
    assert decode.FUSED_COMBINE_MAX_BYTES == 64 << 10
    pb = _problem(batch=1)                          # 1 query x 4 heads per kv head: 4 rows
    assert decode.fused_combine(pb, 32, 128) and not decode.fused_combine(pb, 33, 128)
    assert decode.fused_combine(pb, 64, 64) and not decode.fused_combine(pb, 65, 64)
    four = dataclasses.replace(pb, seqlen_q=4)      # 16 rows (4 queries x 4 heads)
    assert decode.fused_combine(four, 8, 128) and not decode.fused_combine(four, 9, 128)
    eight = dataclasses.replace(pb, seqlen_q=8)     # 32 packed rows: 16 per slab, as four's
    assert decode.fused_combine(eight, 8, 128) and not decode.fused_combine(eight, 9, 128)
    assert not decode.fused_combine(pb, 1, 128)
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "grid")
    assert decode.fused_combine(four, 128, 256) and not decode.fused_combine(four, 1, 256)
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "kernel")
    assert not decode.fused_combine(pb, 2, 128)
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "yes")
    with pytest.raises(ValueError, match="DMATTN_SPLIT_COMBINE"):
        decode.fused_combine(pb, 2, 128)


def test_specs_and_resources():
    pb = _problem()
    spec = decode.decode_spec(pb)
    assert spec.id == "fwd_decode_bf16_d128_m16n64w4_mask1_bias1_varlen1"
    assert spec.name_expression.startswith("dm::flash_fwd_decode_kernel<dm::BFloat16, 128, 16, 64")
    # Q slab (rows padded by 8) + 2 stages of K and V (64 keys, swizzled unpadded rows), the
    # block-table ring and the staged rows' offsets; then per stage the staged mask/bias words
    # (64 per staged row).
    kv = (16 * 136 + 2 * 2 * 64 * 128) * 2 + 8 * 16 + 256
    assert spec.dynamic_smem == kv + 2 * (16 + 16) * 64 * 4  # the most: 16 rows per tensor
    rec = decode.build_fwd_params(pb, pb.q, 0)[0]  # key-based (total_k, Hk) mask and bias
    assert decode.launch_smem(spec, rec) == kv + 2 * 2 * 64 * 4
    assert (rec["mask_slot_mode"], rec["bias_slot_mode"]) == (0, 0)
    # one staged row per tensor keeps three CTAs per H100 SM (at <= 168 registers: the
    # launch bounds' 3 blocks); 16 rows each hold two
    assert decode.resident_ctas(spec, 168, H100, decode.launch_smem(spec, rec)) == 3
    assert decode.resident_ctas(spec, registers=168, dev=H100) == 2
    assert decode.combine_spec(pb).id == "fwd_combine_bf16_d128_m1n1w8_mask0_bias0_varlen0"
    assert decode.num_m_blocks(dataclasses.replace(pb, seqlen_q=8)) == 2  # 8 q x 4 heads / 16
    specs = decode.all_decode_specs()
    # 96 decode + 12 combine; + 16 three-stage decode specs at d128 (the append spec: kvcache.py)
    assert len(specs) == len({s.id for s in specs}) == 124
    deep = [s for s in specs if s.stages == decode.DEEP_STAGES]
    assert len(deep) == 16 and {s.head_dim for s in deep} == {128}
    assert deep[0].id.endswith("_st3") and deep[0].name_expression.endswith(", 3>")
    assert all(isinstance(s, KernelSpec) for s in specs)


def test_decode_and_combine_compile_without_spills():
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy.compile import compile_spec

    pb = _problem()
    for spec in (decode.decode_spec(pb, "sm_90"), decode.combine_spec(pb, "sm_90")):
        ck = compile_spec(spec, use_disk_cache=False)
        assert not ck.spills, ck.log
        assert spec.family.replace("fwd_", "") in ck.lowered_name


def test_slot_modes():
    """fwd_decode.cu stages one mask/bias row per distinct row a CTA reads."""
    # key-based (stride 0 over queries): one row when all heads of a kv group share it
    assert decode.slot_mode(0, 0, head_ratio=32, q_per_kv=4) == 0   # h' = 1
    assert decode.slot_mode(0, 0, head_ratio=4, q_per_kv=4) == 0    # h' = Hk
    assert decode.slot_mode(0, 0, head_ratio=1, q_per_kv=1) == 0    # h' = H = Hk
    assert decode.slot_mode(0, 0, head_ratio=1, q_per_kv=4) == 1    # h' = H: one per head
    assert decode.staged_rows(1, 4) == 4
    assert decode.slot_mode(0, 0, head_ratio=1, q_per_kv=32) == 2   # > 16 heads in a group
    # query-based (a row stride, or a varlen per-query start): one row per packed row
    assert decode.slot_mode(4096, 0, head_ratio=32, q_per_kv=4) == 2
    assert decode.slot_mode(0, 4096, head_ratio=4, q_per_kv=4) == 2
    assert [decode.staged_rows(m, 4) for m in (0, 2)] == [1, 16]


def test_stage_switch_sizes_the_launch_like_the_kernel(monkeypatch):
    """DM_DECODE_STAGES=N (an A/B define of fwd_decode.cu) also sets the host's smem formula: the
    default 2 stages at d128 hold 3 CTAs per H100/H200 SM at <= 168 registers, a 3-stage build
    2. The bench's shape (512 CTAs) then fills 1.29 waves of 396 slots: 3 splits (3.88 waves),
    and no split on 264 slots (1.94 waves)."""
    pb = _problem()
    spec = decode.decode_spec(pb)
    rec = decode.build_fwd_params(pb, pb.q, 0)[0]
    monkeypatch.delenv("DMATTN_NUM_SPLITS", raising=False)
    monkeypatch.delenv("DMATTN_NVRTC_DEFINES", raising=False)
    smem2 = decode.launch_smem(spec, rec)
    assert smem2 == (16 * 136 + 2 * 2 * 64 * 128) * 2 + 8 * 16 + 256 + 2 * 2 * 64 * 4 == 71296
    assert decode.resident_ctas(spec, 168, H100, smem2) == 3
    assert decode.resident_ctas(spec, 176, H100, smem2) == 2  # registers cap it above 170
    assert decode.choose_num_splits(pb, spec, 168, H100, smem2) == 3
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_DECODE_STAGES=3 DM_DECODE_MIN_CTAS=2")
    smem3 = decode.launch_smem(spec, rec)
    assert smem3 == (16 * 136 + 2 * 3 * 64 * 128) * 2 + 8 * 16 + 256 + 3 * 2 * 64 * 4 == 104576
    assert decode.resident_ctas(spec, 168, H100, smem3) == 2
    assert decode.choose_num_splits(pb, spec, 168, H100, smem3) == 1


def test_at_most_a_cta_per_sm_splits_into_one_balanced_wave():
    """Grids of at most one CTA per SM split into one wave with the fewest key tiles on the
    busiest SM (H200 d128: 132 SMs x 3 slots), ~2 CTAs per SM: the counts measured faster than
    the 95% wave rule's ~3 (twenty-fifth session: 1 x 8192, 1 x 32768, 2 x 8192, 4 x 16384,
    8 x 4096 and 16 x 2048 keys at 8 KV heads). Larger grids keep that rule (unchanged)."""
    measured = {(8, 128): 32, (8, 512): 32, (16, 128): 16, (32, 256): 8, (64, 64): 4,
                (128, 32): 2}
    for (ctas, n_tiles), splits in measured.items():
        assert decode.num_splits_heuristic(ctas, 396, n_tiles, sms=132) == splits
    assert decode.num_splits_heuristic(200, 396, 64, sms=132) == \
        decode.num_splits_heuristic(200, 396, 64) > 2           # the 95% rule, multi-wave
    for ctas in (1, 3, 8, 40, 100, 132):
        for n_tiles in (2, 7, 64, 128, 513):
            s = decode.num_splits_heuristic(ctas, 396, n_tiles, sms=132)
            assert ctas * s <= 396 or s == 1            # one wave
            busiest = -(-ctas * s // 132) * -(-n_tiles // s)
            for t in range(1, min(n_tiles, 128) + 1):   # no one-wave count that adds a CTA
                if ctas * t <= 396 and (ctas * t > 132 or ctas * s <= 132):  # beats it
                    assert busiest <= -(-ctas * t // 132) * -(-n_tiles // t), (ctas, n_tiles, t)


def test_unsplit_where_one_cta_per_sm_draws_the_dram_bandwidth():
    """At most one CTA per SM, and enough of them that unsplit they draw most of the device's
    DRAM bandwidth (UNSPLIT_CTA_BYTES_PER_S each, UNSPLIT_DRAM_SHARE of the peak): no split
    (H100 d128, forty-second and forty-third sessions: 104-128 CTAs unsplit 3.7-10% faster than
    the split, 96 CTAs 3-10% slower). Only where measured: compute capability 9.0 at d128; an
    H200's bandwidth keeps every such grid split."""
    h100, h200 = 3.35e12, 4.8e12
    assert decode.num_splits_heuristic(128, 264, 32, sms=132) == 2
    assert decode.num_splits_heuristic(128, 264, 32, sms=132, dram_bytes_per_s=h100) == 1
    assert decode.num_splits_heuristic(128, 264, 128, sms=132, dram_bytes_per_s=h100) == 1
    for ctas in (104, 120):  # 13 and 15 sequences x 8 KV heads
        assert decode.num_splits_heuristic(ctas, 264, 16, sms=132) > 1
        assert decode.num_splits_heuristic(ctas, 264, 16, sms=132, dram_bytes_per_s=h100) == 1
    for ctas in (1, 8, 64, 96, 99, 100, 124, 128, 132):
        for n_tiles in (32, 128):
            base = decode.num_splits_heuristic(ctas, 264, n_tiles, sms=132)
            assert decode.num_splits_heuristic(ctas, 264, n_tiles, sms=132,
                                               dram_bytes_per_s=h200) == base
            if ctas < 100:
                assert decode.num_splits_heuristic(ctas, 264, n_tiles, sms=132,
                                                   dram_bytes_per_s=h100) == base
    # larger grids: the wave rules, whatever the bandwidth
    assert decode.num_splits_heuristic(512, 396, 64, sms=132, dram_bytes_per_s=h100) == 3
    # through choose_num_splits: 16 sequences x 8 KV heads x 2048 keys
    pb = _problem(batch=16, sk=2048)
    spec = decode.decode_spec(pb)
    sm90_h100 = dataclasses.replace(H100, dram_bytes_per_s=h100)
    assert decode.choose_num_splits(pb, spec, 168, sm90_h100) == 1
    assert decode.choose_num_splits(pb, spec, 168, dataclasses.replace(H100,
                                                                       dram_bytes_per_s=h200)) > 1
    assert decode.choose_num_splits(pb, spec, 168, H100) > 1      # bandwidth unknown
    other_cc = dataclasses.replace(sm90_h100, cc=(8, 9))
    assert decode.choose_num_splits(pb, spec, 168, other_cc) > 1  # not measured there
    pb64 = _problem(batch=16, sk=2048, d=64)
    assert decode.choose_num_splits(pb64, decode.decode_spec(pb64), 128, sm90_h100) == \
        decode.choose_num_splits(pb64, decode.decode_spec(pb64), 128, H100)


def test_tail_wave_splits():
    """Grids that fill the slots but leave a thin last wave split to fill it (the H200 decode
    case: 512 CTAs on 396 slots, 3 splits measured best); full-enough grids do not split."""
    assert decode.num_splits_heuristic(ctas=512, slots=396, n_tiles=64) == 3
    assert decode.num_splits_heuristic(ctas=396, slots=396, n_tiles=64) == 1
    assert decode.num_splits_heuristic(ctas=700, slots=396, n_tiles=64) == 1  # 0.88 of 2 waves


def test_deep_stages_where_the_grid_then_runs_unsplit(monkeypatch):
    """choose_stages: 3 stages at d128 where the grid, at the 2 CTAs per SM they leave, runs
    unsplit with >= 32 key tiles per CTA (the bench shape, 64 x 4096 keys: measured +2.5-5%);
    short rows (256 x 1024 keys: 16 tiles, -5.7% measured) and split grids keep 2."""
    for var in ("DMATTN_NUM_SPLITS", "DMATTN_NVRTC_DEFINES", "DMATTN_DECODE_STAGES"):
        monkeypatch.delenv(var, raising=False)

    def stages(pb, splits_given=False):
        spec = decode.decode_spec(pb)
        deep = dataclasses.replace(spec, stages=decode.DEEP_STAGES)
        rec = decode.build_fwd_params(pb, pb.q, 0)[0]
        smem = decode.launch_smem(deep, rec)
        return decode.choose_stages(pb, spec, 168, H100, smem, splits_given)

    bench = _problem()
    assert decode.launch_smem(dataclasses.replace(decode.decode_spec(bench), stages=3),
                              decode.build_fwd_params(bench, bench.q, 0)[0]) == 104576
    assert stages(bench) == 3
    assert stages(_problem(batch=256, sk=1024)) == 1       # 16 tiles per CTA
    assert stages(_problem(batch=8, sk=32768)) == 1        # split at either depth
    assert stages(_problem(batch=16, sk=8192)) == 1
    # 136-208 CTAs fill under 80% of the 264 deep slots yet split into no one wave with a
    # second CTA per SM: 2 stages and a split, as before the one-wave split rule
    assert [stages(_problem(batch=b, sk=4096)) for b in (17, 19, 26, 27, 32)] == [1, 1, 1, 3, 3]
    assert stages(_problem(d=64)) == 1                     # no 3-stage spec at d64
    assert stages(bench, splits_given=True) == 1           # the caller's split count
    monkeypatch.setenv("DMATTN_NUM_SPLITS", "2")
    assert stages(bench) == 1
    monkeypatch.setenv("DMATTN_DECODE_STAGES", "3")        # forced: any d128 problem
    assert stages(_problem(batch=256, sk=1024)) == 3
    assert stages(_problem(d=64)) == 1
    monkeypatch.setenv("DMATTN_DECODE_STAGES", "2")
    assert stages(bench) == 1
    monkeypatch.setenv("DMATTN_DECODE_STAGES", "4")
    with pytest.raises(ValueError, match="DMATTN_DECODE_STAGES"):
        stages(bench)


def test_combine_warps_per_pair_matches_the_kernel():
    """fwd_combine.cu merges a pair with combine_warps_per_pair(ns) warps, warp part taking
    splits part, part + wpp, ...: the host's grid holds every pair at that rate, each split is
    taken once, no warp loads more than one batch where the CTA's warps suffice, and the
    kernel's constexpr equals the host's mirror at every split count and CTA width."""
    from nvrtc_check import compile_static_asserts

    lines = ['#include "fwd_combine.cu"']
    for warps in (1, 2, 4, 8):
        for ns in range(1, decode.MAX_SPLITS + 1):
            wpp = decode.combine_warps_per_pair(ns, warps)
            assert wpp & (wpp - 1) == 0 and warps % wpp == 0
            taken = sorted(s for part in range(wpp) for s in range(part, ns, wpp))
            assert taken == list(range(ns))
            assert wpp == warps or -(-ns // wpp) <= decode.COMBINE_BATCH
            assert wpp == 1 or -(-ns // (wpp // 2)) > decode.COMBINE_BATCH   # the fewest
            lines.append(f"static_assert(dm::combine_warps_per_pair({ns}, {warps}) == {wpp});")
    for pairs in (1, 7, 32, 2048):
        for ns in (2, 5, 43, 128):
            per_cta = decode.COMBINE_WARPS // decode.combine_warps_per_pair(ns)
            assert decode.combine_grid(pairs, ns)[0] * per_cta >= pairs
            assert (decode.combine_grid(pairs, ns)[0] - 1) * per_cta < pairs
    lines.append(f"static_assert(dm::kCombineBatch == {decode.COMBINE_BATCH});")
    # the decode grid's own merge stages weights for at most MAX_SPLITS splits a row
    lines.append('#include "split_combine.cuh"')
    lines.append(f"static_assert(dm::kMaxCombineSplits == {decode.MAX_SPLITS});")
    compile_static_asserts("\n".join(lines) + "\n", "combine_check.cu")
