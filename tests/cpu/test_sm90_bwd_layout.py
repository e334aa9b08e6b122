"""The sm_90a backward's layout arithmetic (cuda_src/sm90/bwd.cu), checked on the CPU:

- each of its five products, run through the NumPy model of TMA's 128B-swizzled boxes and of
  wgmma's K-/MN-major descriptor reads (test_sm90_layout.py), equals the plain matrix product:
  S^T = K Q^T and dP^T = V dO^T (both operands K-major), dV += P^T dO and dK += dS^T Q (dO/Q as
  MN-major B), dQ += dS K with dS^T written by the consumer threads' fragments as [key][query]
  and read back as an M-major A (tnspA; the model reads an MN-major A as it reads an MN-major
  B, as the PTX ISA's canonical layouts define both) and K rows 64c.. as an MN-major B;
- the constexpr helpers and Sm90BwdSmem / Sm90BwdArgs equal the model and the host mirror
  (NVRTC static_asserts), and every spec compiles for sm_90a without spills or slow-kernel
  advisories, with HGMMA in its SASS when nvdisasm is present.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_sm90_layout import (
    desc_k_major,
    desc_mn_major,
    tma_box_address,
    wgmma_k_major,
    wgmma_mn_major,
)

from dmattn_cupy import backward_sm90 as b90

BASE = 4 * 16384  # any 1024-aligned shared-memory address


def _tma_store(smem: dict, base: int, rows: int, mat: np.ndarray) -> None:
    """What TMA writes for a (rows x cols) tile of 64-column boxes (element per byte address)."""
    r, c = np.meshgrid(np.arange(mat.shape[0]), np.arange(mat.shape[1]), indexing="ij")
    for a, v in zip(tma_box_address(base, rows, r, c).ravel(), mat.ravel(), strict=True):
        smem[int(a)] = v


def _read(smem: dict, addr: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda a: smem[int(a)])(addr)


def _ss_k_major(smem, desc_a, desc_b, n: int) -> np.ndarray:
    """One k16 step D[m, n] = sum_k A[m, k] B[n, k], both K-major."""
    m, k = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    nn, kn = np.meshgrid(np.arange(n), np.arange(16), indexing="ij")
    return _read(smem, wgmma_k_major(desc_a, m, k)) @ _read(smem, wgmma_k_major(desc_b, nn, kn)).T


def _b_mn_major(smem, desc_b, n: int) -> np.ndarray:
    """B[k, n] (16 x n) of an MN-major operand."""
    k, nn = np.meshgrid(np.arange(16), np.arange(n), indexing="ij")
    return _read(smem, wgmma_mn_major(desc_b, k, nn))


def _a_m_major(smem, desc_a) -> np.ndarray:
    """A[m, k] (64 x 16) of an M-major (tnspA) operand."""
    k, m = np.meshgrid(np.arange(16), np.arange(64), indexing="ij")
    return _read(smem, wgmma_mn_major(desc_a, k, m)).T


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("c", [0, 1])
def test_scores_transposed_k_q(head_dim, c):
    """S^T (64 keys of consumer c x 64 queries) = K Q^T; the same code reads V and dO."""
    rng = np.random.default_rng(head_dim + c)
    kt, q = rng.integers(-4, 5, (128, head_dim)), rng.integers(-4, 5, (64, head_dim))
    smem: dict = {}
    k_base, q_base = BASE, BASE + 2 * 16384
    _tma_store(smem, k_base, 128, kt)
    _tma_store(smem, q_base, 64, q)
    got = sum(_ss_k_major(smem, desc_k_major(k_base + c * 64 * 128, 128, ks),
                          desc_k_major(q_base, 64, ks), 64) for ks in range(head_dim // 16))
    np.testing.assert_array_equal(got, kt[64 * c:64 * c + 64] @ q.T)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_dv_dk_read_do_and_q_as_mn_major_b(head_dim):
    """dV (64 keys x head_dim) += P^T dO: K = the tile's 64 queries, dO rows as TMA wrote them."""
    rng = np.random.default_rng(head_dim)
    pt, do = rng.integers(-4, 5, (64, 64)), rng.integers(-4, 5, (64, head_dim))
    smem: dict = {}
    _tma_store(smem, BASE, 64, do)
    got = sum(pt[:, 16 * kk:16 * kk + 16] @ _b_mn_major(smem, desc_mn_major(BASE, 64, kk),
                                                           head_dim) for kk in range(4))
    np.testing.assert_array_equal(got, pt @ do)


def _store_ds_fragments(smem: dict, base: int, dst: np.ndarray) -> None:
    """The consumer's dS^T (64 keys x 64 queries) from its wgmma accumulator fragments (warp w,
    lane g, t: dpt[j][e] at key 16w + g + 8(e >> 1), query 8j + 2t + (e & 1)), packed as the
    register A words da[kk][w] and stored as in bwd.cu: word w of step kk is fragment
    j = 2kk + (w >> 1), row half r = w & 1, at tile_offset<2, 64, 64>(16 warp + g + 8r, 8j + 2t)."""
    for warp in range(4):
        for g in range(8):
            for t in range(4):
                dpt = {(j, e): dst[16 * warp + g + 8 * (e >> 1), 8 * j + 2 * t + (e & 1)]
                       for j in range(8) for e in range(4)}
                for kk in range(4):
                    da = [(dpt[2 * kk, 0], dpt[2 * kk, 1]), (dpt[2 * kk, 2], dpt[2 * kk, 3]),
                          (dpt[2 * kk + 1, 0], dpt[2 * kk + 1, 1]),
                          (dpt[2 * kk + 1, 2], dpt[2 * kk + 1, 3])]
                    for w in range(4):
                        j, r = 2 * kk + (w >> 1), w & 1
                        addr = int(tma_box_address(base, 64, np.int64(16 * warp + g + 8 * r),
                                                   np.int64(8 * j + 2 * t)))
                        smem[addr], smem[addr + 2] = da[w]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("c", [0, 1])
def test_dq_reads_ds_transposed_and_k_rows_of_its_consumer(head_dim, c):
    """dQ (64 queries x 64 columns, pass nh) += dS (M-major A) K (rows 64c.., MN-major B)."""
    rng = np.random.default_rng(7 * head_dim + c)
    dst, kt = rng.integers(-4, 5, (64, 64)), rng.integers(-4, 5, (128, head_dim))
    smem: dict = {}
    ds_base, k_base = BASE + 8 * 16384, BASE
    _tma_store(smem, k_base, 128, kt)
    _store_ds_fragments(smem, ds_base, dst)
    for nh in range(head_dim // 64):
        kb = k_base + nh * 128 * 128 + c * 64 * 128
        got = sum(_a_m_major(smem, desc_mn_major(ds_base, 64, kk)) @
                  _b_mn_major(smem, desc_mn_major(kb, 128, kk), 64) for kk in range(4))
        np.testing.assert_array_equal(got, dst.T @ kt[64 * c:64 * c + 64, 64 * nh:64 * nh + 64])


def test_bias_tile_reads_what_tma_wrote():
    """The (64 query rows x 128 keys) bias stage: two boxes of 64 keys; a consumer reads
    element (query, key) at tile_offset<2, 64, 64>(query, key) (static_asserts below)."""
    bias = np.arange(64 * 128).reshape(64, 128)
    smem: dict = {}
    _tma_store(smem, BASE, 64, bias)
    q, k = np.meshgrid(np.arange(64), np.arange(128), indexing="ij")
    np.testing.assert_array_equal(_read(smem, tma_box_address(BASE, 64, q, k)), bias)


def _static_asserts() -> str:
    lines = ['#include "sm90/bwd.cu"', "using namespace dm::sm90;"]
    rng = np.random.default_rng(1)
    for r, c in zip(rng.integers(0, 64, 32), rng.integers(0, 128, 32), strict=True):
        want = int(tma_box_address(0, 64, np.int64(r), np.int64(c)))
        lines.append(f"static_assert(tile_offset<2, 64, 64>({r}, {c}) == {want}u);")
    for base in (0, 8192, 73728):
        for ks in range(8):
            lines.append(f"static_assert(desc_k_major<64>({base}u, {ks}) == "
                         f"{desc_k_major(base, 64, ks)}ull);")
            lines.append(f"static_assert(desc_mn_major<128>({base}u, {ks % 8}) == "
                         f"{desc_mn_major(base, 128, ks % 8)}ull);")
    for hd in b90.HEAD_DIMS:
        for bias in (False, True):
            lines.append(f"static_assert(dm::Sm90BwdSmem<{hd}, {str(bias).lower()}>::kAlloc == "
                         f"{b90.smem_bytes(hd, bias)});")
    lines.append(f"static_assert(sizeof(dm::Sm90BwdArgs) == {b90.ARGS_DTYPE.itemsize});")
    return "\n".join(lines) + "\n"


def test_constexpr_helpers_and_smem_plan_equal_the_model():
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc",
                                reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy.compile import cuda_src_dir

    prog = nvrtc.createProgram(_static_asserts(), "sm90_bwd_layout_check.cu", (), ())
    try:
        nvrtc.compileProgram(prog, ["-std=c++20", "-default-device",
                                    "--gpu-architecture=sm_90a", f"-I{cuda_src_dir()}"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def test_every_spec_fits_shared_memory():
    for hd in b90.HEAD_DIMS:
        for bias in (False, True):
            assert b90.smem_bytes(hd, bias) <= b90.SMEM_LIMIT


def _nvdisasm() -> str | None:
    import sys

    cand = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "site-packages" / "nvidia" / "cu13" / "bin" / "nvdisasm"
    return str(cand) if cand.is_file() else shutil.which("nvdisasm")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_spec_compiles_without_spills_or_slow_advisories(dtype, head_dim, bias, tmp_path):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy.compile import compile_spec
    from dmattn_cupy.select import backward_sm90_spec

    ck = compile_spec(backward_sm90_spec(dtype, head_dim, bias), use_disk_cache=False)
    assert ck.arch == "sm_90a"
    assert not ck.spills, ck.log
    assert not ck.slow, ck.advisories
    tool = _nvdisasm()
    if tool is None:
        return
    cubin = tmp_path / "k.cubin"
    cubin.write_bytes(ck.cubin + b"\0")  # CuPy's getCUBIN is one byte short
    sass = subprocess.run([tool, str(cubin)], capture_output=True, text=True).stdout
    assert "HGMMA.64x64x16.F32" in sass                        # S^T, dP^T, dQ
    assert f"HGMMA.64x{head_dim}x16.F32" in sass               # dV, dK
    assert "UTMALDG.4D" in sass and "USETMAXREG" in sass and "RED" in sass
