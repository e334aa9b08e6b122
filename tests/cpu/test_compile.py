"""Compilation layer without a GPU: ABI checks, specs, NVRTC builds, the disk cache."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")

from dmattn_cupy import compile as dmc  # noqa: E402
from dmattn_cupy.params import FWD_DTYPE, FWD_FIELDS, abi_check_source  # noqa: E402
from dmattn_cupy.precompile import all_specs  # noqa: E402
from dmattn_cupy.spec import KernelSpec  # noqa: E402

SMALL = KernelSpec(dtype="fp16", head_dim=32, block_m=64, block_n=32, num_warps=4)


def _compile_abi(dtype: np.dtype) -> tuple[bool, str]:
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram('#include "params_check.cuh"\n', "abi.cu",
                               (abi_check_source(dtype=dtype).encode(),), (b"params_check.cuh",))
    try:
        nvrtc.compileProgram(prog, ["-std=c++20", "--gpu-architecture=sm_80",
                                    f"-I{dmc.cuda_src_dir()}"])
        return True, nvrtc.getProgramLog(prog)
    except Exception:
        return False, nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def test_abi_mirror_compiles() -> None:
    ok, log = _compile_abi(FWD_DTYPE)
    assert ok, log


def test_abi_detects_swapped_fields() -> None:
    fields = list(FWD_FIELDS)
    fields[0], fields[1] = fields[1], fields[0]
    ok, log = _compile_abi(np.dtype(fields, align=True))
    assert not ok and "out-of-order" in log


def test_abi_detects_wrong_field_type() -> None:
    fields = [(n, np.int32 if n == "seqlen_q" else t) for n, t in FWD_FIELDS]
    fields = [(n, np.int64 if n == "heads" else t) for n, t in fields]
    ok, log = _compile_abi(np.dtype(fields, align=True))
    assert not ok and "heads" in log


def test_abi_detects_missing_field() -> None:
    fields = [f for f in FWD_FIELDS if f[0] != "q_row_stride"]
    ok, log = _compile_abi(np.dtype(fields, align=True))
    assert not ok and "size drifted" in log


def test_spec_id_is_readable_and_unique() -> None:
    specs = all_specs()
    ids = [s.id for s in specs]
    n_decode = sum(s.family in ("fwd_decode", "fwd_combine") for s in specs)
    # decode: dtype x head dim x mask/bias/varlen, + a 3-stage set at d128; combine
    assert n_decode == 2 * 6 * 8 + 2 * 8 + 2 * 6
    n_fwd = sum(s.family == "fwd_mma" for s in specs)
    # dtype x head dim x mask/bias/varlen, plus block-sparse variants of the non-varlen ones
    # (minus attn_mask at head dim 256, refused: it spills), plus the smaller tiles of
    # 99 KB-shared-memory devices where they differ
    assert n_fwd > 2 * 6 * 8 + (2 * 6 * 4 - 4)
    n_bwd = sum(s.family.startswith("bwd") for s in specs)
    assert n_bwd > 0
    n_kv = sum(s.family == "kv_append" for s in specs)
    assert n_kv == 1  # the KV-cache append kernel (16-bit words: one spec)
    n_pad = sum(s.family == "row_pad" for s in specs)
    assert n_pad == 1  # the row padding copy (bytes: one spec)
    n_pack = sum(s.family in ("mask_pack", "mask_lists", "mask_rows") for s in specs)
    # the mask packing, block-list and overlapped packing kernels (one spec each)
    assert n_pack == 3
    n_shift = sum(s.family == "fwd_row_bias" for s in specs)
    assert n_shift == 2  # the lse shift of a key-broadcast bias: one spec per dtype
    assert len(ids) == len(set(ids)) == (n_fwd + n_decode + n_bwd + n_kv + n_pad + n_pack
                                         + n_shift)
    assert any(i.startswith("fwd_mma_bf16_d128_m") and i.endswith("_mask1_bias0_varlen1")
               for i in ids)
    assert "fwd_decode_bf16_d128_m16n64w4_mask1_bias1_varlen1" in ids


@pytest.mark.parametrize("bad", [{"dtype": "fp32"}, {"head_dim": 40}], ids=["dtype", "headdim"])
def test_spec_rejects_unknown_values(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        KernelSpec(**bad)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_compile_without_gpu_reports_resources(arch: str) -> None:
    ck = dmc.compile_spec(dataclasses.replace(SMALL, arch=arch), use_disk_cache=False)
    assert ck.cubin[:4] == b"\x7fELF"
    assert ck.registers > 0 and not ck.spills
    assert "flash_fwd_mma_kernel" in ck.lowered_name


def test_parse_ptxas_log() -> None:
    text = ("ptxas .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 96 registers, used 1 barriers, 4096 bytes smem")
    assert dmc.parse_ptxas_log(text) == {"registers": 96, "spill_stores": 4, "spill_loads": 12,
                                         "stack_frame": 8, "static_smem": 4096}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DMATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dmc, "_mem_cache", {})
    return tmp_path


def test_disk_cache_hit_skips_nvrtc(cache, monkeypatch) -> None:
    first = dmc.compile_spec(SMALL)
    assert len(list(cache.glob("*.cubin"))) == 1
    monkeypatch.setattr(dmc, "_mem_cache", {})
    monkeypatch.setattr(dmc, "_nvrtc_compile", lambda *a: pytest.fail("recompiled on a hit"))
    second = dmc.compile_spec(SMALL)
    assert second.cubin == first.cubin and second.lowered_name == first.lowered_name


def test_corrupt_cache_entry_is_recompiled(cache, monkeypatch) -> None:
    dmc.compile_spec(SMALL)
    (path,) = cache.glob("*.cubin")
    path.write_bytes(b"garbage")
    monkeypatch.setattr(dmc, "_mem_cache", {})
    ck = dmc.compile_spec(SMALL)
    assert ck.cubin[:4] == b"\x7fELF" and path.read_bytes() == ck.cubin


def test_cache_key_covers_sources_arch_and_spec(monkeypatch) -> None:
    base = dmc.cache_key(SMALL)
    assert dmc.cache_key(dataclasses.replace(SMALL, arch="sm_90")) != base
    assert dmc.cache_key(KernelSpec(dtype="bf16", head_dim=32, block_m=64, block_n=32,
                                    num_warps=4)) != base
    monkeypatch.setattr(dmc, "sources_digest", lambda: "another-header-changed")
    assert dmc.cache_key(SMALL) != base


def test_sources_digest_sees_every_header() -> None:
    names = {p.relative_to(dmc.cuda_src_dir()).as_posix() for p in dmc.cuda_src_dir().rglob("*")}
    assert {"common.cuh", "params.cuh", "sm80/fwd_mma.cu"} <= names
    assert len(dmc.sources_digest()) == 64


def test_concurrent_processes_share_cache(tmp_path) -> None:
    code = ("from dmattn_cupy.compile import compile_spec\n"
            "from dmattn_cupy.spec import KernelSpec\n"
            "ck = compile_spec(KernelSpec(dtype='fp16', head_dim=64, block_m=64, block_n=32, "
            "num_warps=4))\nprint(len(ck.cubin))\n")
    env = {"DMATTN_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    sizes = {o[0].strip() for o in outs}
    assert len(sizes) == 1
    (meta,) = tmp_path.glob("*.json")
    assert json.loads(meta.read_text())["lowered_name"]
    assert not list(tmp_path.glob("*.tmp"))


def test_verbose_logs_compilation(cache, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DMATTN_VERBOSE", "1")
    dmc.compile_spec(SMALL)
    assert "compiled fwd_mma_fp16_d32" in capsys.readouterr().out


@pytest.mark.parametrize("limit", [163 * 1024, 99 * 1024], ids=["163KB", "99KB"])
def test_forward_tiles_fit_the_device_shared_memory(limit: int) -> None:
    from dmattn_cupy import select
    from dmattn_cupy.device import PRESETS
    from dmattn_cupy.families import sparse_supported
    from dmattn_cupy.precompile import stub_problem

    known = set(all_specs())
    for dtype, hd, mask, bias, varlen in itertools.product(
            ("float16", "bfloat16"), (32, 64, 96, 128, 192, 256), (False, True), (False, True),
            (False, True)):
        pb = stub_problem("fp16" if dtype == "float16" else "bf16", hd, mask, bias, varlen)
        dev = dataclasses.replace(PRESETS["sm_80"], smem_per_block=limit)
        for sparse in (False, True) if not varlen and sparse_supported(hd, mask, bias) else (
                False,):
            spec = select.forward(pb, dev, sparse=sparse)
            assert spec.dynamic_smem <= limit, spec.id
            assert spec in known  # so precompile --check-spills covers it


def test_kernel_needing_more_shared_memory_than_the_gpu_has_is_refused(monkeypatch) -> None:
    from dmattn_cupy import runtime
    from dmattn_cupy.device import PRESETS

    big = KernelSpec(dtype="bf16", head_dim=128, block_m=128, block_n=64, num_warps=8,
                     has_mask=True, has_bias=True)
    monkeypatch.setattr(runtime, "device_props", lambda device: PRESETS["sm_86"])  # 99 KB
    with pytest.raises(NotImplementedError, match=r"shared memory per block.*allows 101376"):
        runtime.get_kernel(big, 0)


def test_nvrtc_defines_reach_the_options_and_the_cache_key(monkeypatch) -> None:
    plain = dmc.cache_key(SMALL)
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_X=4 DM_Y")
    assert dmc.compile_options(SMALL)[-2:] == ("-DDM_X=4", "-DDM_Y")
    assert dmc.cache_key(SMALL) != plain
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_X=$(rm)")
    with pytest.raises(ValueError, match="DMATTN_NVRTC_DEFINES"):
        dmc.compile_options(SMALL)
