"""The ring decode's K/V tensor maps (dmattn_cupy/ring_maps.py) without a GPU: the box rows per
page size, the maps' dims/strides/boxes for dense, packed varlen and paged layouts at every
head dim, the RingArgs record against the kernel's struct (NVRTC), and a NumPy model of TMA
(boxes with out-of-bounds zero fill) that stages tiles with the kernel's own box coordinates
and reads them back with its (row, col) -> shared-memory offset: every key of every tile and
the zero pad columns must come out."""

from __future__ import annotations

import math

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts

from dmattn_cupy import families, ring_maps
from dmattn_cupy.arrays import ArrayInfo
from dmattn_cupy.spec import HEAD_DIMS
from dmattn_cupy.tensor_map import TensorMapError, TensorMapSpec


def _info(shape, strides, ptr=0):
    return ArrayInfo("cupy", "bfloat16", tuple(shape), tuple(strides), 0, ptr)


def _contig(shape):
    st = [1]
    for n in reversed(shape[1:]):
        st.insert(0, st[0] * n)
    return tuple(st)


@pytest.mark.parametrize("ps,rows", [(0, 64), (16, 16), (32, 32), (48, 16), (64, 64), (80, 16),
                                     (96, 32), (128, 64), (256, 64), (272, 16)])
def test_box_rows(ps, rows):
    assert ring_maps.box_rows(ps) == rows
    if ps:
        assert ps % rows == 0 and 64 % rows == 0   # a box never crosses a page or a tile


def test_box_rows_rejects_negative():
    with pytest.raises(ValueError, match="page_size"):
        ring_maps.box_rows(-16)


@pytest.mark.parametrize("hd", HEAD_DIMS)
def test_parts(hd):
    parts, cols = families.ring_parts(hd)
    assert parts * cols == hd and cols + 8 <= 256 and cols % 16 == 0
    assert ((cols + 8) * 2 // 16) % 2 == 1                 # odd 16-byte row stride
    assert parts == (1 if hd <= 192 else 2)
    assert families.ring_tile_bytes(hd) == parts * 64 * (cols + 8) * 2
    assert families.ring_tile_bytes(hd) % 128 == 0          # box destinations 128-byte aligned


@pytest.mark.parametrize("d", [8, 40, 64, 128, 192, 200, 256])
def test_dense_map(d):
    b, s, h = 3, 451, 2
    hd = families.padded_head_dim(d)
    spec = ring_maps.kv_map(_info((b, s, h, d), _contig((b, s, h, d))), hd)
    cols = families.ring_parts(hd)[1]
    assert spec.dims == (d, s, h, b)
    assert spec.strides == (h * d * 2, d * 2, s * h * d * 2)
    assert spec.box == (cols + 8, 64, 1, 1) and spec.swizzle == 0
    spec.check()


def test_varlen_and_paged_maps():
    t, h, d = 1000, 4, 128
    spec = ring_maps.kv_map(_info((t, h, d), _contig((t, h, d))), 128, varlen=True)
    assert spec.dims == (d, t, h, 1) and spec.strides == (h * d * 2, d * 2, 16)
    assert spec.box == (136, 64, 1, 1)
    for ps in (16, 48, 64, 256):
        pool = (7, ps, h, d)
        spec = ring_maps.kv_map(_info(pool, _contig(pool)), 128, page_size=ps)
        assert spec.dims == (d, ps, h, 7)
        assert spec.strides == (h * d * 2, d * 2, ps * h * d * 2)
        assert spec.box == (136, ring_maps.box_rows(ps), 1, 1)
    # one kv head, one page: size-1 dims carry the placeholder stride
    spec = ring_maps.kv_map(_info((1, 16, 1, 64), (1024, 64, 64, 1)), 64, page_size=16)
    assert spec.strides == (128, 16, 16)


@pytest.mark.parametrize("shape,strides,why", [
    ((2, 300, 2, 64), (0, 128, 64, 1), "stride"),            # broadcast batch
    ((2, 300, 2, 64), (38400, -128, 64, 1), "stride"),       # negative rows
    ((2, 300, 2, 60), (36000, 120, 60, 1), "stride"),        # 120-byte rows
    ((2, 300, 2, 64), (38400, 128, 64, 2), "contiguous"),    # head dim strided
    ((300, 2, 64), (128, 64, 1), "4-D"),                     # 3-D without varlen
])
def test_layouts_tma_cannot_read(shape, strides, why):
    with pytest.raises(TensorMapError, match=why):
        ring_maps.kv_map(_info(shape, strides), 64)


def test_paged_pool_must_match_page_size():
    with pytest.raises(TensorMapError, match="page_size"):
        ring_maps.kv_map(_info((4, 32, 2, 64), _contig((4, 32, 2, 64))), 64, page_size=16)


def test_args_record_matches_the_kernel():
    assert ring_maps.ARGS_DTYPE.itemsize == 320
    assert ring_maps.ARGS_DTYPE.fields["box_rows"][1] == ring_maps.BOX_ROWS_OFFSET == 256
    checks = (f"static_assert(sizeof(dm::RingArgs) == {ring_maps.ARGS_DTYPE.itemsize});\n"
              # k, v, box_rows in declaration order: box_rows right after two maps
              f"static_assert(2 * sizeof(dm::sm90::TmaDesc) == {ring_maps.BOX_ROWS_OFFSET});\n"
              "static_assert(alignof(dm::RingArgs) == 64);\n")
    for d in HEAD_DIMS:
        parts, cols = families.ring_parts(d)
        checks += (f"static_assert(dm::RingLayout<{d}, 4>::kParts == {parts});\n"
                   f"static_assert(dm::RingLayout<{d}, 4>::kPartCols == {cols});\n"
                   f"static_assert(dm::RingLayout<{d}, 4>::kTileBytes == "
                   f"{families.ring_tile_bytes(d)});\n")
    compile_static_asserts('#include "sm90/fwd_decode_ring.cu"\n' + checks, "ring_args.cu")


# ---- NumPy model: TMA boxes into the kernel's stage layout ---------------------------------

def _tma_box(mem: np.ndarray, spec: TensorMapSpec, coords: tuple[int, ...]) -> np.ndarray:
    """What a tiled box load writes to shared memory, in order (dim 0 fastest): the elements
    at coords + index, zero where any index is outside its dim."""
    strides = (1,) + tuple(st // spec.elem_bytes for st in spec.strides)
    out = np.zeros(spec.box[::-1], dtype=mem.dtype)
    for idx in np.ndindex(*spec.box[::-1]):
        g = [c + i for c, i in zip(coords, idx[::-1], strict=True)]
        if all(0 <= x < n for x, n in zip(g, spec.dims, strict=True)):
            out[idx] = mem[sum(x * s for x, s in zip(g, strides, strict=True))]
    return out


def _stage_tile(mem, spec, hd, n0, valid, kvh, b, k_start=0, ps=0, table=None, varlen=False):
    """The producer's boxes of one tile (the kernel's nbox / box_row / box_outer) into a
    staged tile (kParts x 64 rows x kPartStride, NaN where no box wrote)."""
    parts, cols = families.ring_parts(hd)
    rows = spec.box[1]
    tile = np.full((parts, 64, cols + 8), np.nan)
    nbox = -(-valid // rows) if ps else 1
    for i in range(nbox):
        if ps:
            key = n0 + i * rows
            row, outer = key % ps, int(table[b][key // ps])
        else:
            row, outer = k_start + n0, 0 if varlen else b
        for part in range(parts):
            box = _tma_box(mem, spec, (part * cols, row, kvh, outer))
            tile[part, i * rows:(i + 1) * rows] = box[0, 0]
    return tile


def _kv(tile, row, col, hd):
    """RingLayout::kv: element (row, col) of a staged tile."""
    cols = families.ring_parts(hd)[1]
    return tile[col // cols, row, col % cols]


def _check_tile(tile, keys, hd, d):
    """Rows r < len(keys) hold keys[r] in columns < d and zeros in d..hd."""
    for r, want in enumerate(keys):
        got = np.array([_kv(tile, r, c, hd) for c in range(hd)])
        np.testing.assert_array_equal(got[:d], want)
        np.testing.assert_array_equal(got[d:], 0.0)


@pytest.mark.parametrize("d", [8, 40, 128, 200, 256])
def test_dense_tiles(d):
    rng = np.random.default_rng(d)
    b, s, h, pad = 2, 150, 2, 8      # rows padded in memory: head dim d of d + 8 stored
    hd = families.padded_head_dim(d)
    mem = rng.standard_normal(b * s * h * (d + pad)) + 1.0
    full = mem.reshape(b, s, h, d + pad)
    info = _info((b, s, h, d), (s * h * (d + pad), h * (d + pad), d + pad, 1))
    spec = ring_maps.kv_map(info, hd)
    for bi in range(b):
        for n0 in range(0, s, 64):
            valid = min(64, s - n0)
            tile = _stage_tile(mem, spec, hd, n0, valid, 1, bi)
            _check_tile(tile, full[bi, n0:n0 + valid, 1, :d], hd, d)
            if valid < 64:   # past the tensor: zero rows (the consumers zero V there anyway)
                assert np.all(tile[:, valid:, :] == 0)


def test_varlen_tiles():
    rng = np.random.default_rng(1)
    lens = [5, 64, 129, 1]
    h, d = 2, 64
    starts = np.concatenate([[0], np.cumsum(lens)])
    t = int(starts[-1])
    mem = rng.standard_normal(t * h * d) + 1.0
    full = mem.reshape(t, h, d)
    spec = ring_maps.kv_map(_info((t, h, d), _contig((t, h, d))), 64, varlen=True)
    for bi, n in enumerate(lens):
        for n0 in range(0, n, 64):
            valid = min(64, n - n0)
            tile = _stage_tile(mem, spec, 64, n0, valid, 0, bi, k_start=int(starts[bi]),
                               varlen=True)
            _check_tile(tile, full[starts[bi] + n0:starts[bi] + n0 + valid, 0], 64, d)


@pytest.mark.parametrize("ps", [16, 48, 64, 256])
@pytest.mark.parametrize("len_k", [1, 63, 64, 150, 320])
def test_paged_tiles(ps, len_k):
    rng = np.random.default_rng(ps + len_k)
    h, d = 2, 40
    n_pages = math.ceil(320 / ps)
    table = [rng.permutation(n_pages + 3)[:n_pages]]
    pool_shape = (n_pages + 3, ps, h, d)
    mem = rng.standard_normal(int(np.prod(pool_shape))) + 1.0
    pool = mem.reshape(pool_shape)
    dense = np.concatenate([pool[p] for p in table[0]])          # (n_pages * ps, h, d)
    spec = ring_maps.kv_map(_info(pool_shape, _contig(pool_shape)), 64, page_size=ps)
    for n0 in range(0, len_k, 64):
        valid = min(64, len_k - n0)
        tile = _stage_tile(mem, spec, 64, n0, valid, 1, 0, ps=ps, table=table)
        _check_tile(tile, dense[n0:n0 + valid, 1], 64, d)
        # boxes wholly past the end are not loaded: their pages are never looked up
        rows = ring_maps.box_rows(ps)
        assert np.isnan(tile[0, -(-valid // rows) * rows:]).all()
