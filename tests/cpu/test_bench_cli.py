"""CPU tests of the tools/bench package: FLOP counting, argument parsing, table/ratio
formatting, targets, JSON writing; plus (when torch is importable) a CPU dry run of every case
against a torch-math stand-in for dmattn_cupy, and the folder run ``python3 tools/bench``."""

from __future__ import annotations

import importlib
import json
import math
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

_TOOLS = Path(__file__).resolve().parents[2] / "tools"
_PKG = _TOOLS / "bench"


def _load():
    if str(_TOOLS) not in sys.path:
        sys.path.insert(0, str(_TOOLS))
    return importlib.import_module("bench")


bench = _load()


# ----------------------------------------------------------------------------- import


def test_module_imports_no_heavy_dependencies():
    for name in ("torch", "cupy", "dmattn_cupy", "matplotlib", "numpy"):
        assert name not in vars(bench), name
    for info in pkgutil.iter_modules([str(_PKG)]):
        mod = importlib.import_module(f"bench.{info.name}")
        for name in ("torch", "cupy", "dmattn_cupy", "matplotlib", "numpy", "flash_attn"):
            assert name not in vars(mod), (info.name, name)


def test_package_layout_one_file_per_family():
    files = {p.name for p in _PKG.glob("*.py")}
    assert {"__init__.py", "__main__.py", "timing.py", "flops.py", "report.py", "cli.py",
            "targets.py", "case_forward.py", "case_sparse.py", "case_decode.py",
            "case_prefill.py", "case_backward.py", "host.py"} <= files
    assert not (_TOOLS / "bench.py").exists()


def test_run_as_folder_lists_cases():
    p = subprocess.run([sys.executable, str(_PKG), "--list"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    for name in ("dense", "host_fwd", "issue12"):
        assert name in p.stdout


# ----------------------------------------------------------------------------- FLOPs


def test_fwd_flops_convention():
    assert bench.attn_fwd_flops(2, 16, 4096, 4096, 128) == 4 * 2 * 16 * 4096 * 4096 * 128
    assert bench.attn_fwd_flops(2, 16, 4096, 4096, 128, causal=True) == (
        2 * 2 * 16 * 4096 * 4096 * 128)
    assert bench.attn_fwd_flops(64, 32, 1, 4096, 128) == 4 * 64 * 32 * 4096 * 128


def test_fwd_bwd_flops_is_3_5x():
    f = bench.attn_fwd_flops(2, 16, 2048, 2048, 128)
    assert bench.fwd_bwd_flops(f) == pytest.approx(3.5 * f)


def test_varlen_flops_sum_of_sequences():
    lens = [512, 1000, 4096]
    got = bench.varlen_fwd_flops(lens, lens, 16, 128)
    assert got == sum(4 * 16 * L * L * 128 for L in lens)
    assert bench.varlen_fwd_flops(lens, lens, 16, 128, causal=True) == got / 2


def test_elements_and_tile_flops():
    # every element allowed == dense FLOPs
    assert bench.elements_flops(300 * 500, 2, 4, 64) == bench.attn_fwd_flops(2, 4, 300, 500, 64)
    assert bench.visited_tile_flops(3, 128, 64, 2, 4, 64) == 4 * 3 * 128 * 64 * 2 * 4 * 64


def _brute_window(sq, sk, w):
    return [[0 <= i + sk - sq - j < w for j in range(sk)] for i in range(sq)]


@pytest.mark.parametrize("sq,sk,w", [(50, 50, 7), (37, 61, 10), (61, 37, 5), (20, 20, 100),
                                     (1, 300, 64), (130, 300, 129)])
def test_causal_window_allowed_matches_brute_force(sq, sk, w):
    dense = _brute_window(sq, sk, w)
    assert bench.causal_window_allowed(sq, sk, w) == sum(map(sum, dense))


def test_causal_window_large_window_is_causal():
    s = 333
    assert bench.causal_window_allowed(s, s, 10**6) == s * (s + 1) // 2


@pytest.mark.parametrize("sq,sk,w,bm,bn", [(300, 300, 70, 32, 16), (100, 257, 33, 16, 32),
                                           (257, 100, 20, 64, 64), (64, 64, 1, 16, 16)])
def test_causal_window_tiles_matches_brute_force(sq, sk, w, bm, bn):
    dense = _brute_window(sq, sk, w)
    want = 0
    for r0 in range(0, sq, bm):
        for c0 in range(0, sk, bn):
            want += any(dense[i][j] for i in range(r0, min(r0 + bm, sq))
                        for j in range(c0, min(c0 + bn, sk)))
    assert bench.causal_window_tiles(sq, sk, w, bm, bn) == want


def test_block_table_allowed_clips_edges():
    table = [[True, False, True], [False, True, True]]
    # sq=200 (blocks of 128: 128 + 72 rows), sk=300 (128, 128, 44 cols)
    want = 128 * 128 + 128 * 44 + 72 * 128 + 72 * 44
    assert bench.block_table_allowed(table, 200, 300, 128, 128) == want


def test_random_block_table_fixed_seed_and_diagonal():
    a = bench.random_block_table(64, 64, 0.1, seed=3)
    b = bench.random_block_table(64, 64, 0.1, seed=3)
    c = bench.random_block_table(64, 64, 0.1, seed=4)
    assert a == b and a != c
    assert all(a[i][i] for i in range(64))
    density = sum(map(sum, a)) / 64 / 64
    assert 0.08 < density < 0.14
    # every block row keeps at least one block also for non-square tables
    t = bench.random_block_table(5, 11, 0.0, seed=0)
    assert all(any(row) for row in t)


def test_varlen_lengths():
    lens = bench.varlen_lengths(8, 512, 4096, seed=0)
    assert lens == bench.varlen_lengths(8, 512, 4096, seed=0)
    assert len(lens) == 8 and min(lens) == 512 and max(lens) == 4096
    assert all(512 <= x <= 4096 for x in lens)


def test_rotation_sets():
    l2 = 50 * 2**20
    assert bench.rotation_sets(2**30, l2) == 1
    assert bench.rotation_sets(3 * l2, l2) == 1
    assert bench.rotation_sets(l2, l2) == 3
    assert bench.rotation_sets(1024, l2) == 8
    assert bench.rotation_sets(0, l2) == 1


def test_tflops_gbps_percentile():
    assert bench.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert bench.gbps(1e9, 1.0) == pytest.approx(1000.0)
    assert bench.tflops(None, 1.0) is None and bench.gbps(1.0, 0.0) is None
    assert bench.percentile([1, 2, 3, 4, 5], 50) == 3
    assert bench.percentile([0, 10], 10) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- CLI


def test_default_runs_every_case():
    args = bench.parse_args([])
    assert args.cases == list(bench.CASES)
    assert args.peer_set == set(bench.PEERS)
    assert (args.warmup, args.repeat) == (10, 30)
    assert not args.quick


def test_case_names():
    assert set(bench.CASES) == {"dense", "causal", "mask_bias", "kbias", "kbias_hk",
                                "sparse_window", "sparse_random", "decode", "prefill_varlen",
                                "backward", "backward_bias", "backward_sparse",
                                # issue 12-15 additions
                                "dense_d64", "dense_d256", "dense_fp16", "gqa", "softcap",
                                "backward_causal", "backward_kbias", "host_fwd",
                                "host_decode", "host_fwd_bwd", "host_first_call",
                                "decode_paged", "backward_mask_bias", "mask_hf",
                                "backward_bias_b1", "backward_kbias_b1", "bias",
                                "decode_b1", "decode_b16", "mask_bias_mixed",
                                "mask_bias_doc", "mask_bias_doc_mixed", "qbias", "backward_qbias"}
    for suite in bench.SUITES.values():
        assert set(suite) <= set(bench.CASES)
    assert bench.SUITES["issue12"] == ["dense", "causal", "kbias", "mask_bias",
                                       "mask_bias_mixed", "dense_d64", "dense_d256",
                                       "dense_fp16"]
    assert bench.SUITES["host"] == list(bench.HOST_CASES)


def test_case_selection_repeatable_and_comma():
    args = bench.parse_args(["--case", "decode", "--case", "dense,causal", "--case", "decode"])
    assert args.cases == ["decode", "dense", "causal"]


def test_suite_plus_case():
    args = bench.parse_args(["--suite", "backward", "--case", "dense"])
    assert args.cases == ["backward", "backward_bias", "backward_sparse", "dense"]


def test_unknown_case_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--case", "nope"])
    assert "unknown case" in capsys.readouterr().err


def test_quick_shrinks_repetitions_and_explicit_values_win():
    q = bench.parse_args(["--quick"])
    n = bench.parse_args([])
    assert q.quick
    assert q.warmup < n.warmup and q.repeat < n.repeat and q.min_time < n.min_time
    assert q.max_repeat < n.max_repeat
    assert bench.parse_args(["--quick", "--repeat", "77"]).repeat == 77


def test_peers_option(capsys):
    assert bench.parse_args(["--peers", "flash,flex"]).peer_set == {"flash", "flex"}
    assert bench.parse_args(["--peers", "none"]).peer_set == set()
    with pytest.raises(SystemExit):
        bench.parse_args(["--peers", "xformers"])


def test_shape_overrides():
    s = bench.case_shape("decode")
    assert (s["batch"], s["heads"], s["kv_heads"], s["seqlen"], s["seqlen_k"], s["headdim"]) \
        == (64, 32, 8, 1, 4096, 128)
    assert bench.case_shape("backward_bias")["batch"] == 2
    assert bench.case_shape("backward_bias")["seqlen_k"] == 2048
    args = bench.parse_args(["--seqlen", "1024", "--dtype", "fp16", "--kv-heads", "4",
                             "--headdim", "64", "--batch", "3", "--heads", "8"])
    s = bench.case_shape("kbias_hk", args)
    assert (s["batch"], s["heads"], s["kv_heads"], s["seqlen"], s["seqlen_k"], s["headdim"],
            s["dtype"]) == (3, 8, 4, 1024, 1024, 64, "fp16")
    assert bench.case_shape("decode", bench.parse_args(["--heads", "2"]))["kv_heads"] == 2
    assert bench.case_shape("decode", bench.parse_args(["--heads", "16"]))["kv_heads"] == 8
    args = bench.parse_args(["--seqlen-k", "999"])
    assert bench.case_shape("dense", args)["seqlen_k"] == 999
    with pytest.raises(SystemExit):
        bench.parse_args(["--batch", "0"])


def test_help_and_list(capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--case", "--suite", "--quick", "--json", "--plot", "--kv-heads", "--seqlen-k"):
        assert flag in out
    assert bench.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in bench.CASES:
        assert name in out


# ----------------------------------------------------------------------------- tables/JSON


def _fake_results():
    R, C = bench.ImplResult, bench.CaseResult
    dense = C(name="dense", title="no mask", params={"batch": 2, "heads": 16}, impls=[
        R("dmattn", "dmattn", ms=2.0, wall_ms=2.1, flops=1e12, max_abs_diff=1e-3),
        R("sdpa-flash", "peer", ms=1.0, flops=1e12),
        R("sdpa-cudnn", "peer", ms=4.0, flops=1e12),
        R("sdpa-efficient", "peer", status="n/a", note="RuntimeError: No available kernel"),
        R("flex", "peer", ms=float("nan"), status="error", note="boom"),
    ])
    decode = C(name="decode", title="decode", metric="gbps", copy_bw_gbps=3000.0, impls=[
        R("dmattn varlen", "dmattn", ms=0.5, flops=1e9, bytes=1e9),
        R("sdpa-efficient padded", "peer", ms=1.0, flops=1e9, bytes=1e9),
    ])
    sparse = C(name="sparse_window", title="w", impls=[
        R("dmattn", "dmattn", ms=1.0, flops=1e12, visited_flops=2e12),
        R("  variant", "variant", ms=1.0, flops=1e12),
        R("sdpa-efficient", "peer", ms=4.0, flops=1e12, visited_flops=8e12),
    ])
    na = C(name="backward", title="b", impls=[
        R("dmattn fwd+bwd", "dmattn", status="n/a", note="NotImplementedError: backward"),
        R("sdpa-flash fwd+bwd", "peer", ms=1.0, flops=1e12),
    ])
    return dense, decode, sparse, na


def test_metrics_and_ratio():
    dense, decode, sparse, na = _fake_results()
    dm = dense.dmattn()
    assert dm.tflops == pytest.approx(500.0)
    assert dense.best_peer().name == "sdpa-flash"
    assert dense.ratio(dense.impls[1]) == pytest.approx(0.5)
    assert dense.ratio(dense.impls[2]) == pytest.approx(2.0)
    assert dense.ratio(dense.impls[3]) is None
    assert decode.dmattn().gbps == pytest.approx(2000.0)
    assert decode.ratio(decode.impls[1]) == pytest.approx(2.0)
    assert sparse.dmattn().visited_tflops == pytest.approx(2000.0)
    assert na.dmattn().tflops is None and na.best_peer().name == "sdpa-flash fwd+bwd"


def test_format_table_and_summary():
    dense, decode, sparse, na = _fake_results()
    t = bench.format_table(dense)
    lines = t.splitlines()
    assert "ms" in lines[0] and "TFLOP/s" in lines[0] and "dmattn/x" in lines[0]
    row = {ln.split()[0]: ln for ln in lines[2:]}
    assert "500.0" in row["dmattn"] and "1.00x" in row["dmattn"]
    assert "0.50x" in row["sdpa-flash"] and "1000.0" in row["sdpa-flash"]
    assert "2.00x" in row["sdpa-cudnn"]
    assert "n/a: RuntimeError: No available kernel" in row["sdpa-efficient"]
    assert "error: boom" in row["flex"]
    assert "1.0e-03" in row["dmattn"]
    s = bench.summary_line(dense)
    assert s.startswith("summary dense: dmattn 500.0 TFLOP/s")
    assert "best peer sdpa-flash 1000.0 TFLOP/s" in s and "0.50x" in s

    t = bench.format_table(decode)
    assert "GB/s" in t.splitlines()[0] and "%copy" in t.splitlines()[0]
    assert "2000" in t and "67%" in t
    assert "dmattn 2000.0 GB/s" in bench.summary_line(decode)
    assert "2.00x" in bench.summary_line(decode)

    assert "tile TF/s" in bench.format_table(sparse)
    assert "4.00x" in bench.summary_line(sparse)   # the variant is not a peer

    s = bench.summary_line(na)
    assert "dmattn n/a" in s and "NotImplementedError" in s and "sdpa-flash" in s
    full = bench.format_case(na)
    assert full.startswith("== backward") and s in full


def test_write_json(tmp_path):
    results = list(_fake_results())
    path = tmp_path / "out.json"
    meta = {"device": "fake", "nan": float("nan")}
    bench.write_json(str(path), meta, results + [{"name": "raw", "impls": []}])
    data = json.loads(path.read_text())
    assert data["meta"]["device"] == "fake" and data["meta"]["nan"] is None
    assert "4*B*H*Sq*Sk*D" in data["conventions"]["flops"]
    names = [c["name"] for c in data["cases"]]
    assert names == ["dense", "decode", "sparse_window", "backward", "raw"]
    dense = data["cases"][0]
    assert dense["best_peer"] == "sdpa-flash"
    assert dense["dmattn_vs_best_peer"] == pytest.approx(0.5)
    rows = {r["name"]: r for r in dense["impls"]}
    assert rows["dmattn"]["tflops"] == pytest.approx(500.0)
    assert rows["flex"]["ms"] is None and rows["flex"]["status"] == "error"
    assert rows["sdpa-efficient"]["tflops"] is None
    assert data["cases"][1]["impls"][0]["gbps"] == pytest.approx(2000.0)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "out.png"
    bench.plot_results(str(path), list(_fake_results()), "title")
    assert path.stat().st_size > 0


# ----------------------------------------------------------------------------- dry run
# A stand-in for dmattn_cupy written with plain torch math (float32), so the whole harness
# (inputs, peers, smoke check, timing, tables, JSON) runs on the CPU.


def _fake_dm(torch):
    import numpy as np

    def _attend(q, k, v, mask, bias, scale, causal, window, sparse, softcap=0.0):
        B, Sq, H, D = q.shape
        Sk, Hk = k.shape[1], k.shape[2]
        qf = q.float().transpose(1, 2)
        kf = k.float().transpose(1, 2).repeat_interleave(H // Hk, 1)
        vf = v.float().transpose(1, 2).repeat_interleave(H // Hk, 1)
        s = qf @ kf.transpose(-1, -2) * (scale or 1 / math.sqrt(D))
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if bias is not None:
            b = bias.float()
            if b.shape[1] not in (1, H):
                b = b.repeat_interleave(H // b.shape[1], 1)
            s = s + b
        i = torch.arange(Sq)[:, None]
        j = torch.arange(Sk)[None, :]
        d = i + Sk - Sq - j
        ok = torch.ones(Sq, Sk, dtype=torch.bool)
        if causal:
            ok &= d >= 0
        if window[0] >= 0:
            ok &= d <= window[0]
        if window[1] >= 0:
            ok &= d >= -window[1]
        if sparse is not None:
            ok = ok & torch.as_tensor(sparse.to_dense())
        ok = ok.to(q.device)
        if mask is not None:
            m = mask
            if m.shape[1] not in (1, H):
                m = m.repeat_interleave(H // m.shape[1], 1)
            ok = ok & m
        s = s.masked_fill(~ok, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
        return (p @ vf).transpose(1, 2).to(q.dtype)

    def flash_dmattn_func(q, k, v, attn_mask=None, attn_bias=None, softmax_scale=None,
                          is_causal=False, window_size=(-1, -1), softcap=0.0, sparse_mask=None,
                          return_lse=False, deterministic=False, backend="auto"):
        out = _attend(q, k, v, attn_mask, attn_bias, softmax_scale, is_causal, window_size,
                      sparse_mask, softcap)
        if not return_lse:
            return out
        kf = k.float().repeat_interleave(q.shape[2] // k.shape[2], 2)   # no mask: host calls
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), kf) * (
            softmax_scale or 1 / math.sqrt(q.shape[-1]))
        return out, torch.logsumexp(s, -1)

    def flash_dmattn_backward(dout, q, k, v, out, lse, **kw):
        qg, kg, vg = (x.detach().float().requires_grad_() for x in (q, k, v))
        grads = torch.autograd.grad(_attend(qg, kg, vg, None, None, None, False, (-1, -1),
                                            None), (qg, kg, vg), dout.float())
        return (*(g.to(q.dtype) for g in grads), None)

    def flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, attn_mask=None,
                                 attn_bias=None, softmax_scale=None, is_causal=False,
                                 window_size=(-1, -1), **kw):
        outs = []
        cq, ck = cu_q.tolist(), cu_k.tolist()
        for b in range(len(cq) - 1):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])

            def key_based(t, ks=ks):
                return None if t is None else t[ks].t()[None, :, None, :]

            outs.append(_attend(q[qs][None], k[ks][None], v[ks][None], key_based(attn_mask),
                                key_based(attn_bias), softmax_scale, is_causal, window_size,
                                None)[0])
        return torch.cat(outs, 0)

    def flash_dmattn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                                  block_table=None, attn_mask=None, attn_bias=None, **kw):
        outs = []
        for b in range(q.shape[0]):
            n = int(cache_seqlens[b])
            idx = torch.arange(n)
            if block_table is None:
                pg = torch.full((n,), b)
            else:
                pg = block_table[b, idx // k_cache.shape[1]].long().cpu()
            pos = idx if block_table is None else idx % k_cache.shape[1]

            def rows(t, pg=pg, pos=pos):
                return None if t is None else t[pg, pos]

            def keyed(t):
                return None if t is None else rows(t).t()[None, :, None, :]

            outs.append(_attend(q[b:b + 1], rows(k_cache)[None], rows(v_cache)[None],
                                keyed(attn_mask), keyed(attn_bias), None, False, (-1, -1),
                                None))
        return torch.cat(outs, 0)

    class _Mask:
        block_size = (128, 128)

        def __init__(self, dense, block_size=(128, 128)):
            self.dense = np.asarray(dense, dtype=bool)
            self.block_size = tuple(block_size)
            self.seqlen_q, self.seqlen_k = self.dense.shape[-2:]

        def to_dense(self):
            return self.dense

        def block_map(self):
            bm, bn = self.block_size
            nr, nc = -(-self.seqlen_q // bm), -(-self.seqlen_k // bn)
            out = np.zeros((nr, nc), dtype=np.int8)
            for r in range(nr):
                for c in range(nc):
                    blk = self.dense[..., r * bm:(r + 1) * bm, c * bn:(c + 1) * bn]
                    out[r, c] = 2 if blk.all() else 1 if blk.any() else 0
            return out

    def _rule(sq, sk, keep):
        i = np.arange(sq)[:, None]
        j = np.arange(sk)[None, :]
        return keep(i + sk - sq - j)

    class BlockBitsetMask(_Mask):
        @classmethod
        def from_dense_mask(cls, dense, block_size=(128, 128)):
            if hasattr(dense, "cpu"):
                dense = dense.cpu().numpy()
            return cls(dense, block_size)

    dm = types.ModuleType("fake_dmattn")
    dm.__version__ = "fake"
    dm.flash_dmattn_func = flash_dmattn_func
    dm.flash_dmattn_backward = flash_dmattn_backward
    dm.flash_dmattn_varlen_func = flash_dmattn_varlen_func
    dm.flash_dmattn_with_kvcache = flash_dmattn_with_kvcache
    dm.CausalMask = lambda sq, sk: _Mask(_rule(sq, sk, lambda d: d >= 0))
    dm.CausalWindowMask = lambda w, sq, sk: _Mask(_rule(sq, sk, lambda d: (d >= 0) & (d < w)))
    dm.BlockBitsetMask = BlockBitsetMask
    dm.MixedMask = BlockBitsetMask   # exact here: to_dense() is the dense mask itself
    dm.estimate_speedup = lambda m: m.block_map().size / max(1, np.count_nonzero(m.block_map()))
    return dm


def _dry_run(tmp_path, extra):
    torch = pytest.importorskip("torch")
    pytest.importorskip("numpy")
    path = tmp_path / "dry.json"
    argv = ["--device", "cpu", "--quick", "--repeat", "2", "--warmup", "1", "--min-time", "0",
            "--flex-mode", "eager", "--json", str(path), *extra]
    assert bench.main(argv, dm=_fake_dm(torch)) == 0
    return json.loads(path.read_text())


def _check(data, tol, need_flex=True):
    for case in data["cases"]:
        assert not case["error"], case
        rows = {r["name"]: r for r in case["impls"]}
        dm = [r for r in case["impls"] if r["role"] == "dmattn"][0]
        assert dm["status"] == "ok", (case["name"], dm)
        assert dm["max_abs_diff"] is not None and dm["max_abs_diff"] < tol, (case["name"], dm)
        for r in rows.values():
            if r["status"] == "ok" and r["max_abs_diff"] is not None:
                assert r["max_abs_diff"] < tol, (case["name"], r)
        flex = [r for r in case["impls"] if r["name"].startswith("flex")]
        assert not need_flex or flex and flex[0]["status"] == "ok", (case["name"], flex)


def test_dry_run_cpu_dense_family(tmp_path, capsys):
    data = _dry_run(tmp_path, ["--suite", "forward", "--case", "sparse_window,sparse_random",
                               "--batch", "2", "--heads", "4", "--kv-heads", "2",
                               "--seqlen", "300", "--headdim", "32"])
    _check(data, 0.05)
    sp = {c["name"]: c for c in data["cases"]}["sparse_random"]
    dm = sp["impls"][0]
    assert dm["visited_flops"] >= dm["flops"]
    out = capsys.readouterr().out
    assert "== summary" in out and "summary sparse_random" in out


def test_dry_run_cpu_mask_bias_doc(tmp_path):
    """The document-mask cases: a (B,1,Sq,Sk) block-diagonal mask beside a full bias, as
    attn_mask and prepared once as a MixedMask; dmattn and the peers agree with the reference
    on CPU."""
    data = _dry_run(tmp_path, ["--case", "mask_bias_doc,mask_bias_doc_mixed", "--batch", "2",
                               "--heads", "4", "--seqlen", "300", "--headdim", "32"])
    _check(data, 0.05)
    per_call = "dmattn MixedMask per call"   # the attn_mask case's variant
    rows = {c["name"]: {r["name"]: r for r in c["impls"]} for c in data["cases"]}
    assert rows["mask_bias_doc"][per_call]["status"] == "ok", rows["mask_bias_doc"][per_call]
    assert per_call not in rows["mask_bias_doc_mixed"]


def test_dry_run_cpu_decode_paged(tmp_path):
    """The KV-cache rows (paged 64/16/256 and a dense cache) beside the varlen decode call."""
    data = _dry_run(tmp_path, ["--case", "decode_paged", "--batch", "3", "--heads", "4",
                               "--kv-heads", "2", "--seqlen", "1", "--seqlen-k", "256",
                               "--headdim", "16"])
    _check(data, 0.05, need_flex=False)
    rows = {r["name"]: r for r in data["cases"][0]["impls"]}
    for name in ("dmattn kvcache paged64", "dmattn kvcache paged16", "dmattn kvcache paged256",
                 "dmattn kvcache dense", "dmattn varlen"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["max_abs_diff"] < 0.05, rows[name]
    assert rows["dmattn kvcache paged64"]["role"] == "dmattn"


def test_dry_run_cpu_varlen_and_backward(tmp_path):
    data = _dry_run(tmp_path, ["--case", "decode,prefill_varlen", "--batch", "3", "--heads",
                               "4", "--kv-heads", "2", "--seqlen", "200", "--seqlen-k", "200",
                               "--headdim", "16"])
    _check(data, 0.05)
    dec = data["cases"][0]
    assert dec["metric"] == "gbps" and dec["impls"][0]["gbps"] > 0
    data = _dry_run(tmp_path, ["--suite", "backward", "--batch", "2", "--heads", "4",
                               "--seqlen", "160", "--headdim", "16"])
    _check(data, 0.15, need_flex=False)  # FlexAttention has no CPU backward
    data = _dry_run(tmp_path, ["--case", "backward_mask_bias", "--batch", "2", "--heads", "2",
                               "--seqlen", "96", "--headdim", "16"])
    _check(data, 0.15, need_flex=False)
    rows = {r["name"]: r for r in data["cases"][0]["impls"]}
    assert rows["dmattn fwd+bwd, the mask prepared once as a MixedMask"]["status"] == "ok"


def test_dry_run_cpu_missing_dmattn_features_are_na(tmp_path):
    torch = pytest.importorskip("torch")
    dm = types.ModuleType("empty_dmattn")   # nothing implemented yet

    def refuses(*a, **k):
        raise NotImplementedError("attn_bias with grad is not implemented yet")

    dm.flash_dmattn_func = refuses
    path = tmp_path / "na.json"
    argv = ["--device", "cpu", "--quick", "--repeat", "2", "--warmup", "1", "--min-time", "0",
            "--peers", "flash", "--case", "dense,decode,sparse_window,backward",
            "--batch", "2", "--heads", "2", "--seqlen", "64", "--seqlen-k", "64",
            "--headdim", "16", "--json", str(path)]
    assert bench.main(argv, dm=dm) == 0
    data = json.loads(path.read_text())
    for case in data["cases"]:
        dmr = case["impls"][0]
        assert dmr["role"] == "dmattn" and dmr["status"] == "n/a", dmr
        assert "NotImplementedError" in dmr["note"]
        peer = [r for r in case["impls"] if r["role"] == "peer"][0]
        assert peer["status"] == "ok" and peer["max_abs_diff"] < 0.05, peer
    assert "flash_dmattn_varlen_func" in data["cases"][1]["impls"][0]["note"]
    assert torch is not None


def test_dry_run_cpu_new_cases_peers_and_targets(tmp_path, capsys):
    data = _dry_run(tmp_path, ["--case",
                               "dense,softcap,gqa,kbias,qbias,mask_bias,mask_bias_mixed,bias",
                               "--batch", "1", "--heads", "4", "--kv-heads", "2",
                               "--seqlen", "96", "--headdim", "16"])
    _check(data, 0.05)
    out = capsys.readouterr().out
    # FA4 absent: its reason once in the header, the rows n/a
    assert out.count("peer fa4 / flex-flash: n/a") == 1
    cases = {c["name"]: c for c in data["cases"]}
    for name in ("dense", "softcap", "gqa"):
        rows = {r["name"]: r for r in cases[name]["impls"]}
        assert rows["fa4"]["status"] == "n/a" and "flash_attn.cute" in rows["fa4"]["note"]
        assert rows["flex-flash"]["status"] == "n/a"
    # no SDPA rows for softcap (SDPA has no softcap), no FA4 row where FA4 has no bias
    assert not [r for r in cases["softcap"]["impls"] if r["name"].startswith("sdpa")]
    assert "fa4" not in {r["name"] for r in cases["kbias"]["impls"]}
    # ratio to the best peer and the issue targets
    assert cases["dense"]["best_peer"] is not None
    assert cases["dense"]["target"].startswith("target dense (issue 12): dmattn/best peer >=")
    assert "== targets (tools/bench/targets.py):" in out
    assert "target mask_bias (issue 12)" in out


def test_dry_run_cpu_host_suite(tmp_path, capsys):
    data = _dry_run(tmp_path, ["--suite", "host", "--peers", "all", "--heads", "4",
                               "--kv-heads", "2", "--seqlen-k", "128"])
    cases = {c["name"]: c for c in data["cases"]}
    assert list(cases) == list(bench.HOST_CASES)
    for name in ("host_fwd", "host_decode", "host_fwd_bwd"):
        c = cases[name]
        assert c["metric"] == "us" and not c["error"], c
        dm = c["impls"][0]
        assert dm["role"] == "dmattn" and dm["status"] == "ok" and dm["host_us"] > 0, dm
        sdpa = [r for r in c["impls"] if r["name"].startswith("sdpa")][0]
        assert sdpa["status"] == "ok" and sdpa["host_us"] > 0
        assert c["dmattn_vs_best_peer"] == pytest.approx(sdpa["host_us"] / dm["host_us"])
    kv = [r for r in cases["host_decode"]["impls"] if r["name"].startswith("dmattn kvcache")]
    assert len(kv) == 1 and kv[0]["status"] == "ok" and kv[0]["host_us"] > 0, kv
    fn = [r for r in cases["host_fwd_bwd"]["impls"] if "functional" in r["name"]]
    assert [r["status"] for r in fn] == ["ok"] and fn[0]["host_us"] > 0, fn  # CuPy's: CUDA only
    first = cases["host_first_call"]["impls"]
    assert [r["status"] for r in first] == ["n/a", "n/a", "n/a"]   # needs CUDA
    out = capsys.readouterr().out
    assert "host us" in out and "us/call" in out and "target host_fwd (issue 15)" in out


def test_targets():
    text, met = bench.target_status("dense", 0.95)
    assert met is True and "met" in text and "0.95" in text
    assert bench.target_status("dense", 0.5)[1] is False
    assert "NOT MET" in bench.target_status("dense", 0.5)[0]
    assert bench.target_status("dense", None)[1] is None
    assert bench.target_status("host_fwd", None, 10.0)[1] is True
    assert bench.target_status("host_fwd", None, 1e4)[1] is False
    assert bench.target_status("decode_nope", 1.0) is None
    for name in bench.TARGETS:
        assert name in bench.CASES
    issue12 = set(bench.SUITES["issue12"]) & set(bench.TARGETS)
    assert {"dense", "causal", "kbias", "mask_bias"} <= issue12


def test_host_table_and_ratio():
    R, C = bench.ImplResult, bench.CaseResult
    c = C(name="host_fwd", title="h", metric="us", impls=[
        R("dmattn", "dmattn", wall_ms=0.1, ms_min=0.09, ms_p90=0.2),
        R("sdpa", "peer", wall_ms=0.02, ms_min=0.02, ms_p90=0.03),
        R("fa4", "peer", status="n/a", note="absent"),
    ])
    assert c.dmattn().host_us == pytest.approx(100.0)
    assert c.best_peer().name == "sdpa"
    assert c.ratio(c.best_peer()) == pytest.approx(0.2)
    t = bench.format_table(c)
    assert "host us" in t.splitlines()[0] and "100.0" in t and "0.20x" in t
    s = bench.summary_line(c)
    assert "dmattn 100.0 us/call" in s and "sdpa 20.0 us/call" in s
    assert "NOT MET" in c.target()


def test_dry_run_cpu_small_batch_decode(tmp_path):
    """decode_b1 / decode_b16: the decode case at one sequence of 8192 keys and 16 of 2048 (the
    split grids the default 64-sequence shape never takes), in the decode suite."""
    assert bench.SUITES["decode"] == ["decode", "decode_paged", "decode_b1", "decode_b16"]
    data = _dry_run(tmp_path, ["--case", "decode_b1,decode_b16", "--heads", "4",
                               "--kv-heads", "2", "--headdim", "16"])
    _check(data, 0.05, need_flex=False)
    shapes = {c["name"]: (c["params"]["batch"], c["params"]["seqlen_k"], c["title"])
              for c in data["cases"]}
    assert shapes == {"decode_b1": (1, 8192, bench.CASES["decode_b1"]),
                      "decode_b16": (16, 2048, bench.CASES["decode_b16"])}
