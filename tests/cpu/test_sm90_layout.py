"""The sm_90a forward's layout arithmetic, checked on the CPU before any GPU time:

- a NumPy model of what TMA writes (a box of 64 16-bit columns, rows of 128 bytes, 128B
  swizzle) and of what wgmma reads through a shared-memory descriptor (canonical K-major and
  MN-major layouts, then the same swizzle on the address) agree element for element, for the
  descriptors the kernel forms (Q/K for S = Q K^T, V for O += P V);
- the kernel's constexpr helpers (cuda_src/sm90/primitives.cuh: swizzle, tile_offset,
  make_desc, desc_k_major, desc_mn_major) equal that model: NVRTC compiles static_asserts
  generated here from it;
- the generated wgmma wrappers are up to date, and forward_sm90's shared-memory formula equals
  the kernel's (a static_assert on Sm90FwdSmem<...>::kAlloc), as does Sm90FwdArgs' size.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import families, select
from dmattn_cupy import forward_sm90 as f90
from dmattn_cupy.device import PRESETS
from dmattn_cupy.tensor_map import TensorMapError, TensorMapSpec

ROOT = Path(__file__).resolve().parents[2]


def swizzle128(addr: np.ndarray) -> np.ndarray:
    """The 128B swizzle on shared-memory byte addresses: address bits 4-6 ^= bits 7-9."""
    return addr ^ (((addr >> 7) & 7) << 4)


def tma_box_address(base: int, rows: int, r: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Where TMA puts element (r, col) of a tile stored as 64-column boxes of ``rows`` rows."""
    return base + (col // 64) * rows * 128 + swizzle128(r * 128 + (col % 64) * 2)


def decode_desc(desc: int) -> tuple[int, int, int, int]:
    return ((desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4,
            desc >> 62)


def wgmma_k_major(desc: int, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Byte address wgmma reads for element (n, k), k < 16, of a K-major 128B-swizzled operand:
    8-row core groups SBO apart, rows 128 bytes apart, k contiguous (PTX ISA, canonical
    layouts), then the swizzle of the absolute address."""
    start, _, sbo, mode = decode_desc(desc)
    assert mode == 1
    return swizzle128(start + (n // 8) * sbo + (n % 8) * 128 + k * 2)


def wgmma_mn_major(desc: int, k: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Byte address of element (k, n), k < 16, of an MN-major 128B-swizzled operand: 64 n per
    128-byte line, 64-column blocks LBO apart, 8-row (k) groups SBO apart."""
    start, lbo, sbo, mode = decode_desc(desc)
    assert mode == 1
    return swizzle128(start + (n // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + (n % 64) * 2)


def swizzle32(addr: np.ndarray) -> np.ndarray:
    """The 32B swizzle: address bit 4 ^= bit 7 (rows of 32 bytes, 8-row atoms of 256)."""
    return addr ^ (((addr >> 7) & 1) << 4)


def wgmma_k_major_32b(desc_: int, n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Byte address wgmma reads for element (n, k), k < 16, of a K-major 32B-swizzled operand:
    rows 32 bytes apart (one k16 step per row), 8-row groups SBO apart, then the swizzle."""
    start, _, sbo, mode = decode_desc(desc_)
    assert mode == 3
    return swizzle32(start + (n // 8) * sbo + (n % 8) * 32 + k * 2)


def kbias_aux_offset(key: int, chunk: int) -> int:
    """fwd.cu kbias_aux_offset: where the producer writes columns 8 chunk .. of a key's aux row."""
    return int(swizzle32(np.int64(key * 32 + 16 * chunk)))


def desc(addr: int, lbo: int, sbo: int) -> int:
    """The model's descriptor: fields >> 4 in bits 0-13, 16-29, 32-45; 128B swizzle = 1 << 62."""
    return (addr >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def desc_k_major(base: int, rows: int, ks: int) -> int:
    return desc(base + (ks // 4) * rows * 128 + (ks % 4) * 32, 16, 1024)


def desc_mn_major(base: int, rows: int, ks: int) -> int:
    return desc(base + ks * 2048, rows * 128, 1024)


@pytest.mark.parametrize("rows,head_dim", [(128, 64), (128, 128), (64, 256), (128, 256)])
def test_k_major_descriptors_read_what_tma_wrote(rows, head_dim):
    """S = Q K^T: for every k16 step the descriptor's view is the TMA tile's columns 16ks.."""
    base = 3 * 16384
    n, k = np.meshgrid(np.arange(rows), np.arange(16), indexing="ij")
    for ks in range(head_dim // 16):
        got = wgmma_k_major(desc_k_major(base, rows, ks), n, k)
        np.testing.assert_array_equal(got, tma_box_address(base, rows, n, ks * 16 + k))
    # the consumer warpgroup c reads rows 64c.. of Q: its base is 64c rows (8192c bytes) in
    for c in (0, 1):
        got = wgmma_k_major(desc_k_major(base + c * 8192, 128, 5), n[:64], k[:64])
        np.testing.assert_array_equal(got, tma_box_address(base, 128, n[:64] + 64 * c,
                                                           80 + k[:64]))


@pytest.mark.parametrize("block_n,head_dim", [(128, 64), (128, 128), (64, 128), (64, 256)])
def test_mn_major_descriptors_read_v_as_tma_wrote_it(block_n, head_dim):
    """O += P V: V is (keys x head_dim) in 64-column boxes; step kk reads keys 16kk.."""
    base = 5 * 16384
    k, n = np.meshgrid(np.arange(16), np.arange(head_dim), indexing="ij")
    for kk in range(block_n // 16):
        got = wgmma_mn_major(desc_mn_major(base, block_n, kk), k, n)
        np.testing.assert_array_equal(got, tma_box_address(base, block_n, 16 * kk + k, n))


def test_swizzle_spreads_a_fragment_column_over_all_banks():
    """A warp's bias reads (rows g = 0..7, columns 8j + 2t) hit 32 distinct banks."""
    g, t = np.meshgrid(np.arange(8), np.arange(4), indexing="ij")
    for j in range(16):
        addr = tma_box_address(0, 128, g, 8 * j + 2 * t)
        assert len(set(((addr // 4) % 32).ravel().tolist())) == 32


def _static_asserts() -> str:
    lines = ['#include "sm90/fwd.cu"', "using namespace dm::sm90;"]
    rng = np.random.default_rng(0)
    for r, c in rng.integers(0, 128, size=(24, 2)):
        want = int(tma_box_address(0, 128, np.int64(r), np.int64(c)))
        lines.append(f"static_assert(tile_offset<2, 64, 128>({r}, {c}) == {want}u);")
        want1 = int(swizzle128(np.int64(r * 128 + c)))  # 1-byte elements, 128-byte rows
        lines.append(f"static_assert(tile_offset<1, 128, 128>({r}, {c}) == {want1}u);")
        off = r * 64 + c % 64  # 1-byte elements, 64-byte rows: the 64B swizzle (bits 4-5 ^= 7-8)
        want64 = (c // 64) * 128 * 64 + (off ^ (((off >> 7) & 3) << 4))
        lines.append(f"static_assert(tile_offset<1, 64, 128>({r}, {c}) == {want64}u);")
    for base in (0, 1024, 40960):
        for ks in range(16):
            lines.append(f"static_assert(desc_k_major<128>({base}u, {ks}) == "
                         f"{desc_k_major(base, 128, ks)}ull);")
            lines.append(f"static_assert(desc_mn_major<64>({base}u, {ks}) == "
                         f"{desc_mn_major(base, 64, ks)}ull);")
    for (hd, mask, bias), (bn, st) in f90.TILES.items():
        smem = f90.smem_bytes(hd, bn, st, mask, bias)
        lines.append(f"static_assert(dm::Sm90FwdSmem<{hd}, {bn}, {st}, {str(mask).lower()}, "
                     f"{str(bias).lower()}>::kAlloc == {smem});")
    lines.append(f"static_assert(sizeof(dm::Sm90FwdArgs) == {f90.ARGS_DTYPE.itemsize});")
    for key in range(0, 128, 3):
        for chunk in (0, 1):
            lines.append(f"static_assert(dm::kbias_aux_offset({key}, {chunk}) == "
                         f"{kbias_aux_offset(key, chunk)}u);")
            # the producer's form: key lane + 32 y at (lane's chunk-0 offset ^ 16 chunk) + 1024 y
            lane, y = key % 32, key // 32
            producer = (kbias_aux_offset(lane, 0) ^ 16 * chunk) + 1024 * y
            assert kbias_aux_offset(key, chunk) == producer
    for base in (0, 4096, 1024 * 150):
        want = (base >> 4) | (1 << 16) | ((256 >> 4) << 32) | (3 << 62)
        lines.append(f"static_assert(dm::kbias_aux_desc({base}u) == {want}ull);")
        for bn, kv in ((128, 32768), (128, 16384), (64, 32768)):  # K stage's desc + constant
            lines.append(f"static_assert(dm::kbias_aux_desc_from_k<{bn}, {kv}>(desc_k_major<{bn}>"
                         f"({base}u, 0)) == dm::kbias_aux_desc({base + kv}u));")
    for c, w, lane, i in zip(*(rng.integers(0, n, 48) for n in (2, 4, 32, 8)), strict=True):
        lines.append(f"static_assert(dm::sm90_fwd_bias_ldsm_offset<128>({c}, {w}, {lane}, {i}) "
                     f"== {fwd_bias_ldsm_offset(int(c), int(w), int(lane), int(i))}u);")
    # key-based loads: the kernel's start/lead equal the host model (16-byte aligned starts)
    for k_start in (0, 1, 7, 12, 37, 316, 1023):
        for heads in (1, 2, 3, 8, 127):
            for elem in (1, 2):
                lines.append(f"static_assert(dm::key_load_start({k_start}, 64, {heads}, {elem}) "
                             f"== {f90.key_load_start(k_start, 64, heads, elem)});")
                lines.append(f"static_assert(dm::key_lead({k_start}, {heads}, {elem}) == "
                             f"{f90.key_lead(k_start, heads, elem)});")
    return "\n".join(lines) + "\n"


def test_constexpr_helpers_equal_the_model():
    compile_static_asserts(_static_asserts(), "sm90_layout_check.cu")


@pytest.mark.parametrize("defines, stages, slots",
                         [((), 3, 6), (("DM_SM90_MB_STAGES=2", "DM_SM90_MB_MASK_SLOTS=8"), 2, 8)],
                         ids=["default", "ab"])
def test_mask_bias_tile_defines_agree_with_the_kernel(monkeypatch, defines, stages, slots):
    """The mask + bias tiles (3 stages and 6 mask slots by default; A/B defines): the host's
    tile and shared memory (read from DMATTN_NVRTC_DEFINES) equal the kernel's built with
    the same -D flags, and fit."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", " ".join(defines))
    lines = ['#include "sm90/fwd.cu"']
    for hd in (64, 128):
        bn, st = f90.tile(hd, True, True)
        assert (bn, st) == (64, stages) and f90.mask_slots(hd, bn, True) == slots
        smem = f90.smem_bytes(hd, bn, st, True, True)
        assert smem <= f90.SMEM_LIMIT
        lines.append(f"static_assert(dm::Sm90FwdSmem<{hd}, {bn}, {st}, true, true>::kAlloc == "
                     f"{smem});")
        lines.append(f"static_assert(dm::Sm90FwdSmem<{hd}, {bn}, {st}, true, true>::kMaskSlots "
                     f"== {slots});")
    assert f90.tile(128, True, False) == f90.TILES[(128, True, False)]  # others unchanged
    assert f90.mask_slots(128, 128, True) == 4
    compile_static_asserts("\n".join(lines) + "\n", "sm90_mb_defines.cu", defines)


@pytest.mark.parametrize("defines, two", [((), True), (("DM_SM90_Q_BUFS=1",), False)],
                         ids=["default", "one_q_buffer"])
def test_q_buffers_agree_with_the_kernel(monkeypatch, defines, two):
    """Q's buffers (two where they fit, by default; DM_SM90_Q_BUFS=1: one) and the shared memory
    they take: the host's equal the kernel's built with the same -D flags for every tile; the
    dense d64/d128 tiles get two by default."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", " ".join(defines))
    lines = ['#include "sm90/fwd.cu"']
    for (hd, mask, bias), (bn, st) in f90.TILES.items():
        n = f90.q_buffers(hd, bn, st, mask, bias)
        smem = f90.smem_bytes(hd, bn, st, mask, bias)
        assert smem <= f90.SMEM_LIMIT and n in (1, 2)
        if not two:
            assert n == 1
        spec = f"dm::Sm90FwdSmem<{hd}, {bn}, {st}, {str(mask).lower()}, {str(bias).lower()}>"
        lines.append(f"static_assert({spec}::kQBufs == {n} && {spec}::kAlloc == {smem});")
    if two:
        assert f90.q_buffers(128, 128, 2, False, False) == 2
        assert f90.q_buffers(64, 128, 2, False, False) == 2
    compile_static_asserts("\n".join(lines) + "\n", "sm90_q_bufs.cu", defines)


def test_generated_wgmma_header_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_wgmma.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_tensor_map_rules():
    ok = TensorMapSpec(2, (128, 300, 4, 2), (1024, 256, 307200), (64, 128, 1, 1), 128)
    ok.check()
    # an fp32 box wider than the tensor without swizzle (bwd.cu's dqa map): only 16-byte rows
    TensorMapSpec(4, (72, 300), (1152,), (136, 64), 0, float32=True).check()
    bad = [TensorMapSpec(2, (128, 300), (1000,), (64, 128), 128),     # stride not 16-multiple
           TensorMapSpec(2, (128, 300), (1024,), (128, 128), 128),    # inner box > swizzle span
           TensorMapSpec(2, (128, 300), (1024,), (64, 512), 128),     # box > 256
           TensorMapSpec(2, (128, 300), (0,), (64, 128), 128),        # a zero stride
           TensorMapSpec(2, (128, 300), (1024,), (64, 128), 128, float32=True)]  # fp32 of 2 B
    for spec in bad:
        with pytest.raises(TensorMapError):
            spec.check()


def _info(shape, strides, dtype="bfloat16", ptr=1 << 20):
    from dmattn_cupy.arrays import ArrayInfo

    return ArrayInfo("torch", dtype, shape, strides, 0, ptr)


def _contig(shape, dtype="bfloat16", ptr=1 << 20):
    st = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    return _info(tuple(shape), tuple(st), dtype, ptr)


def test_tile_for_takes_tma_layouts_and_declines_the_rest():
    q, k = _contig((2, 300, 4, 128)), _contig((2, 256, 4, 128))
    assert f90.tile_for(128, q, k, k, None, None, 300, 256) == (128, 128, 2)
    assert f90.tile_for(96, _contig((2, 300, 4, 96)), _contig((2, 256, 4, 96)),
                        _contig((2, 256, 4, 96)), None, None, 300, 256)[0] == 128
    bias = _contig((2, 4, 300, 256))
    assert f90.tile_for(128, q, k, k, None, bias, 300, 256) == (128, 128, 2)
    mask = _contig((2, 4, 300, 256), "bool")
    assert f90.tile_for(128, q, k, k, mask, bias, 300, 256) == (128, 64, 3)
    k250 = _contig((2, 250, 4, 128))
    assert f90.tile_for(128, q, k250, k250, None, _contig((2, 4, 300, 250)), 300, 250) is None
    assert f90.tile_for(128, q, k, k, None, _contig((2, 4, 300, 256), "float32"), 300,
                        256) is None                              # fp32 over keys: portable
    for dt in ("float32", "bfloat16"):  # a bias per query row: the portable kernel (non-finite
        assert f90.tile_for(128, q, k, k, None, _contig((2, 4, 300, 1), dt), 300,  # values)
                            256) is None
    assert f90.tile_for(128, q, k, k, _contig((2, 4, 300, 1), "bool"), None, 300,
                        256) is not None                          # a mask per query row: served
    long_q = _contig((1, 128 * 65536, 1, 128))
    assert f90.tile_for(128, long_q, k, k, None, None, 128 * 65536, 256) is None  # query tiles
    assert f90.tile_for(128, _contig((2, 300, 4, 128), ptr=(1 << 20) + 2), k, k, None, None,
                        300, 256) is None                         # misaligned base
    assert f90.tile_for(256, _contig((2, 300, 4, 256)), _contig((2, 256, 4, 256)),
                        _contig((2, 256, 4, 256)), mask, bias, 300, 256) is None  # no tile
    assert f90.tile_for(128, q, k, k, None, None, 300, 256, smem_limit=99 * 1024) is None
    assert f90.operand_mode(_contig((2, 4, 1, 256))) == f90.OPERAND_KEY_ROW
    assert f90.operand_mode(_contig((2, 4, 300, 1))) == f90.OPERAND_QUERY_ROW
    assert f90.operand_mode(_contig((1, 1, 1, 1))) == f90.OPERAND_QUERY_ROW


def test_operand_maps_for_every_broadcast_pattern(monkeypatch):
    """The (cols, rows, heads, batch) maps of a 4-D mask/bias: broadcast dims get size 1 (their
    stride is never stepped); tiles are 128-row boxes of 128 bytes, key rows one row of keys.
    (A key-row bias alone goes by TMA only with DM_SM90_KBIAS_F32=0, else by plain loads.)"""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_KBIAS_F32=0")
    b, h, sq, sk = 2, 4, 300, 256
    for shape, mode in [((b, h, sq, sk), f90.OPERAND_TILE), ((1, h, sq, sk), f90.OPERAND_TILE),
                        ((b, 1, sq, sk), f90.OPERAND_TILE), ((b, h, 1, sk), f90.OPERAND_KEY_ROW),
                        ((1, 1, 1, sk), f90.OPERAND_KEY_ROW)]:
        for dtype, elem in (("bool", 1), ("bfloat16", 2)):
            info = _contig(shape, dtype)
            assert f90.operand_mode(info) == mode
            maps = f90.plan_maps(_contig((b, sq, h, 128)), _contig((b, sk, h, 128)),
                                 _contig((b, sk, h, 128)), info if elem == 1 else None,
                                 info if elem == 2 else None, 128)
            spec = maps["mask" if elem == 1 else "bias"]
            nb, nh, nq, nk = shape
            assert spec.dims == (nk, nq, nh, nb) and spec.elem_bytes == elem
            assert spec.strides[0] == (sk * elem if nq > 1 else 16)
            if mode == f90.OPERAND_TILE:
                assert spec.box == (128 // elem, 128, 1, 1) and spec.swizzle == 128
            else:
                assert spec.box == (128, 1, 1, 1) and spec.swizzle == 0


def test_args_record_layout(monkeypatch):
    """Sm90FwdArgs as the kernel reads it: map i at bytes 128 i, then the two modes."""
    from dmattn_cupy import forward_sm90

    monkeypatch.setattr(forward_sm90, "encode",
                        lambda spec, ptr: bytes([ptr % 251]) * 128)  # stands in for the driver
    q, k = _contig((2, 300, 4, 128), ptr=1 << 20), _contig((2, 256, 4, 128), ptr=2 << 20)
    v = _contig((2, 256, 4, 128), ptr=3 << 20)
    bias = _contig((2, 4, 1, 256), ptr=5 << 20)
    for defines, bias_ptr in (("DM_SM90_KBIAS_F32=0", 5 << 20), ("", None)):  # TMA / loads
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", defines)
        rec = forward_sm90.build_args(q, k, v, None, bias, 128)
        raw = rec.tobytes()
        assert len(raw) == 704
        for i, ptr in enumerate((1 << 20, 2 << 20, 3 << 20, None, bias_ptr)):
            want = bytes(128) if ptr is None else bytes([ptr % 251]) * 128
            assert raw[128 * i:128 * (i + 1)] == want
        assert np.frombuffer(raw[640:648], dtype=np.int32).tolist() == [f90.OPERAND_NONE,
                                                                        f90.OPERAND_KEY_ROW]


def _kernel_items(items: int, grid: int) -> list[list[int]]:
    """fwd.cu's schedule: CTA x takes item r * G + x in even rounds r and r * G + G - 1 - x in
    odd ones, stopping at the first item past the end."""
    out = []
    for x in range(grid):
        mine, r = [], 0
        while True:
            item = r * grid + (grid - 1 - x if r & 1 else x)
            if item >= items:
                break
            mine.append(item)
            r += 1
        out.append(mine)
    return out


@pytest.mark.parametrize("items", [1, 131, 132, 133, 264, 1000, 1024, 4097])
def test_work_items_cover_every_item_once(monkeypatch, items):
    """One CTA per item (DM_SM90_PERSISTENT=0) or a static persistent grid (=1): every work
    item is taken exactly once, whatever the last round's fill."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=0")
    assert f90.launch_ctas(items, 132) == items
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=1")
    grid = f90.launch_ctas(items, 132)
    assert grid == min(items, 132)
    for g in (items, grid):
        taken = sorted(i for mine in _kernel_items(items, g) for i in mine)
        assert taken == list(range(items))


def test_more_work_items_than_int32_go_to_the_portable_kernel():
    q = _contig((60000, 128 * 600, 64, 128))  # 600 query tiles x 64 heads x 60000 batches
    pb = families.Problem(kind="cupy", backend="cuda", varlen=False, batch=60000,
                          seqlen_q=128 * 600, seqlen_k=128, heads=64, kv_heads=64,
                          head_dim=128, dtype="bfloat16", scale=1.0, softcap=0.0,
                          window=(-1, -1), q=q, k=q, v=q, mask=None, bias=None)
    assert 600 * 64 * 60000 > f90.MAX_ITEMS
    assert not families._sm90_accepts(pb, PRESETS["sm_90"], None)
    assert select.forward(pb, PRESETS["sm_90"]).family == "fwd_mma"


@pytest.mark.parametrize("head_dim, where", [(64, "q"), (128, "q"), (128, "kv"), (256, "kv")])
def test_forward_o_staging_round_trips_without_bank_conflicts(head_dim, where):
    """fwd.cu's epilogue (stage_o): consumer c's warp w stores its O fragments (lane (g, t):
    row 64c + 16w + g + 8r, columns 8j + 2t, 4 bytes) at tile_offset<2, 64, 128> of the Q
    buffer (two Q buffers: d64, d128 without mask or bias) or at tile_offset<2, 64, 64> of
    row - 64c in the end-of-item stage's K (c = 0) or V (c = 1) buffer (one Q buffer: d128
    with mask or bias, d256), each store hitting 32 distinct banks and only the warp's own 16
    rows of each box; its copy loop (i < 4 * boxes: row 64c + 16w + 4 (i % 4) + lane / 8,
    columns 64 (i / 4) + 8 (lane % 8) ..+7) reads every element of those rows once, back as
    stored, each 8-lane phase of a 16-byte load one 128-byte box row (8 distinct bank
    groups)."""
    tile = np.random.default_rng(4).integers(0, 1 << 16, (128, head_dim))
    box_rows = 128 if where == "q" else 64
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    for c in range(2):
        first = 0 if where == "q" else 64 * c  # the buffer's row 0, CTA-local

        def at_of(row, col, first=first):
            return tma_box_address(0, box_rows, row - first, col)

        for w in range(4):
            smem: dict = {}
            rows = set(range(64 * c + 16 * w, 64 * c + 16 * w + 16))
            for r in range(2):
                for j in range(head_dim // 8):
                    row, col = 64 * c + 16 * w + g + 8 * r, 8 * j + 2 * t
                    at = at_of(row, col)
                    assert len(set((at // 4 % 32).tolist())) == 32, (c, w, r, j)
                    for x in range(2):
                        for a_, v in zip(at + 2 * x, tile[row, col + x], strict=True):
                            smem[int(a_)] = v
            # box rows of this warp only, inside the buffer (a K/V stage: >= 64 rows x head_dim)
            assert {int(a_) // 128 % box_rows + first for a_ in smem} == rows
            assert max(smem) < box_rows * 2 * head_dim
            seen = set()
            for i in range(4 * (head_dim // 64)):
                row = 64 * c + 16 * w + 4 * (i % 4) + lane // 8
                col = 64 * (i // 4) + 8 * (lane % 8)
                at = at_of(row, col)
                for phase in range(4):
                    sel = slice(8 * phase, 8 * phase + 8)
                    assert len(set((at[sel] // 16 % 8).tolist())) == 8, (c, w, i, phase)
                    assert len(set((row[sel]).tolist())) == 1
                for ln in range(32):
                    got = [smem[int(at[ln]) + 2 * e] for e in range(8)]
                    np.testing.assert_array_equal(got, tile[row[ln], col[ln]:col[ln] + 8])
                    seen.add((int(row[ln]), int(col[ln])))
            assert seen == {(rw, cl) for rw in rows for cl in range(0, head_dim, 8)}


def fwd_bias_ldsm_offset(c: int, w: int, lane: int, i: int) -> int:
    """fwd.cu's sm90_fwd_bias_ldsm_offset<128>: the 16-byte row lane ``lane`` of consumer c's
    warp w addresses in the ldmatrix.x4 of key block i: matrix m = lane // 8 holds rows
    64c + 16w + 8 (m % 2) .. + 7 of keys 16i + 8 (m // 2) .. + 7."""
    m = lane // 8
    return int(tma_box_address(0, 128, np.int64(64 * c + 16 * w + 8 * (m % 2) + lane % 8),
                               np.int64(16 * i + 8 * (m // 2))))


def _ldsm_x4(smem: dict, rows: list[int]) -> list[list[tuple]]:
    """ldmatrix.x4 (no .trans) on 2-byte elements: lanes 8m .. 8m + 7 name the 8 rows of
    matrix m (8 consecutive elements each); lane L gets, in register m, row L // 4's pair
    (columns 2 (L % 4), + 1) of matrix m."""
    return [[(smem[rows[8 * m + lane // 4] + 4 * (lane % 4)],
              smem[rows[8 * m + lane // 4] + 4 * (lane % 4) + 2]) for m in range(4)]
            for lane in range(32)]


@pytest.mark.parametrize("block_n", [64, 128])
def test_forward_bias_ldsm_blocks_are_the_fragments(block_n):
    """A full bias stage (128 query rows, block_n keys, as TMA wrote it) read by the consumers'
    ldmatrix.x4 of key block i at (stage + offset(c, w, lane, 0)) ^ 32 (i % 4) + 16384 (i / 4)
    (the kernel's derivation from block 0, on a 1024-byte aligned stage) hands lane (g, t) of
    warp w, in register 2 (j % 2) + r (j = 2i + j % 2), the pair (keys 8j + 2t, + 1) of row
    64c + 16w + g + 8r: the words the per-element reads at tile_offset<2, 64, 128> gave."""
    bias = np.arange(128 * block_n).reshape(128, block_n) + 1
    for stage in (0, 1024 * 37):
        smem = {}
        q, k = np.meshgrid(np.arange(128), np.arange(block_n), indexing="ij")
        for a_, v in zip(tma_box_address(stage, 128, q, k).ravel(), bias.ravel(), strict=True):
            smem[int(a_)] = int(v)
        for c in range(2):
            for w in range(4):
                for i in range(block_n // 16):
                    rows = [((stage + fwd_bias_ldsm_offset(c, w, lane, 0)) ^ (32 * (i % 4))) +
                            16384 * (i // 4) for lane in range(32)]
                    assert rows == [stage + fwd_bias_ldsm_offset(c, w, lane, i)
                                    for lane in range(32)]
                    # one 16-byte row per lane, each 8-lane phase on 8 distinct bank groups
                    for m in range(4):
                        assert len({r // 16 % 8 for r in rows[8 * m:8 * m + 8]}) == 8
                    regs = _ldsm_x4(smem, rows)
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for jm in range(2):
                            for r in range(2):
                                j, row = 2 * i + jm, 64 * c + 16 * w + g + 8 * r
                                assert regs[lane][2 * jm + r] == (bias[row, 8 * j + 2 * t],
                                                                  bias[row, 8 * j + 2 * t + 1])


def bf16_rz(x: float) -> float:
    """x truncated toward zero to bfloat16 (fwd.cu bits_rz: the top 16 bits of the float)."""
    b = np.array([x], dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return float(b.view(np.float32)[0])


@pytest.mark.parametrize("block_n", [64, 128])
@pytest.mark.parametrize("scale", [128 ** -0.5, 64 ** -0.5, 0.05, 0.3])
def test_kbias_aux_step_adds_the_bias_over_scale(block_n, scale):
    """DM_SM90_KBIAS_F32=4: the aux tile as the producer writes it (key rows of 32 bytes, 32B
    swizzle; b in columns 0, 1 and 8 where the part c_i of 1 / scale is nonzero, by the keep
    masks; zeros elsewhere), read through kbias_aux_desc as wgmma reads a K-major operand, times
    the A fragment every lane holds (a0 = a1 = (c0, c1), a2 = a3 = (c2, 0): registers a0/a1 are
    columns 2t, 2t + 1 and a2/a3 columns 2t + 8, 2t + 9 of rows g, g + 8, so every row of A is
    (c0, c1) x 4, (c2, 0) x 4), is b * (c0 + c1 + c2) = b / scale to fp32's precision, and
    -inf stays -inf (every c_i >= 0, and no 0 * inf: an inf column meets a nonzero part)."""
    x = np.float32(1.0) / np.float32(scale)
    c, r = [], float(x)
    for _ in range(3):
        c.append(bf16_rz(r))
        r = float(np.float32(r) - np.float32(c[-1]))
    assert all(v >= 0 for v in c) and abs(sum(c) - float(x)) <= 2.0 ** -23 * float(x)
    keep01 = (0xFFFF if c[0] else 0) | (0xFFFF0000 if c[1] else 0)   # the kernel's masks
    keep2 = 0xFFFF if c[2] else 0
    rng = np.random.default_rng(block_n)
    b = rng.standard_normal(block_n).astype(np.float32)
    b[5::37] = -np.inf
    base = 1024 * 7
    smem = np.zeros(base + block_n * 32, dtype=np.float64)   # value per byte address (2-byte T)
    for key in range(block_n):   # word (b * 0x10001) & keep01 at chunk 0, b & keep2 at chunk 1
        for chunk, word in ((0, ((keep01 & 0xFFFF) != 0, (keep01 >> 16) != 0)),
                            (1, (keep2 != 0, False))):
            for half, on in enumerate(word):
                smem[base + kbias_aux_offset(key, chunk) + 2 * half] = b[key] if on else 0.0
    n, k = np.meshgrid(np.arange(block_n), np.arange(16), indexing="ij")
    addr = wgmma_k_major_32b(base >> 4 | 1 << 16 | (256 >> 4) << 32 | 3 << 62, n, k)
    assert len(set(addr.ravel().tolist())) == block_n * 16   # a bijection onto the tile
    assert addr.min() >= base and addr.max() < base + block_n * 32
    bmat = smem[addr]                                        # (key, k)
    a = np.zeros(16)
    for t in range(4):            # every lane: (c0, c1) at columns 2t, 2t + 1; (c2, 0) at + 8
        a[2 * t:2 * t + 2] = (c[0], c[1])
        a[2 * t + 8:2 * t + 10] = (c[2], 0.0)
    with np.errstate(invalid="raise"):   # a 0 * inf (NaN) would raise
        got = (a[None, :] * bmat).sum(axis=1)
    want = b.astype(np.float64) / scale
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2 ** -22)
    assert np.all(got[~fin] == -np.inf)
