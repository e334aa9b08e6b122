"""The Hopper forward's host half for varlen batches and block-sparse lists (issue 13): what
``tile_for`` takes and declines, what ``select`` picks on compute capability 9.0 and 8.0, the
tensor maps of the packed layouts, the Sm90FwdArgs record's key-chunk fields, and NumPy models
of what the kernel reads (a key chunk's column; the gathered element bits of a MixedMask
partial block)."""

from __future__ import annotations

import numpy as np
import pytest

from dmattn_cupy import forward_sm90 as f90
from dmattn_cupy import select
from dmattn_cupy.arrays import ArrayInfo
from dmattn_cupy.device import PRESETS
from dmattn_cupy.sparse_plan import SparseArrays, block_size_of
from dmattn_cupy.validate import Problem

H100, A100 = PRESETS["sm_90"], PRESETS["sm_80"]
TQ, TK, H, HK, D, MAXQ, MAXK = 700, 912, 8, 2, 128, 300, 400


def _info(shape, strides, dtype="bfloat16", ptr=1 << 20):
    return ArrayInfo("torch", dtype, tuple(shape), tuple(strides), 0, ptr)


def _contig(shape, dtype="bfloat16", ptr=1 << 20):
    st = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
    return _info(shape, st, dtype, ptr)


def _packed(d=D):
    return _contig((TQ, H, d)), _contig((TK, HK, d)), _contig((TK, HK, d))


def _take(mask=None, bias=None, d=D, **kw):
    q, k, v = _packed(d)
    return f90.tile_for(d, q, k, v, mask, bias, MAXQ, MAXK, varlen=True, **kw)


def test_varlen_without_mask_or_bias_is_taken():
    assert _take() == (128, 128, 2)
    assert _take(d=64) == (64, 128, 2) and _take(d=256) == (256, 64, 2)
    q, k, v = _packed()
    assert f90.tile_for(D, q, k, v, None, None, 128 * 65536, MAXK, varlen=True) is None  # tiles
    # a 4-D (dense-shaped) layout is no varlen problem for this family
    q4 = _contig((1, TQ, H, D))
    assert f90.tile_for(D, q4, q4, q4, None, None, MAXQ, MAXK, varlen=True) is None


def test_varlen_mask_or_bias_is_taken():
    """Varlen masks and biases run on the Hopper kernel (key-based boxes start 16-byte
    aligned: the cause of the fault that kept this path off is fixed)."""
    mask, bias = _contig((TK, H), "bool"), _contig((TQ, H, 400))
    assert _take(mask) is not None and _take(None, bias) is not None
    assert _take(mask, bias) is not None
    assert select.forward(_problem(True, mask, None), H100).family == "fwd_sm90"


@pytest.mark.parametrize("heads", [1, HK, H])
def test_key_based_layouts(heads):
    mask, bias = _contig((TK, heads), "bool"), _contig((TK, heads))
    for m, b in ((mask, None), (None, bias), (mask, bias)):
        assert f90.operand_mode(m if m is not None else b, True) == f90.OPERAND_KEY_CHUNK
        assert _take(m, b) is not None
    # keys contiguous per head ((h', total_k) transposed): one key row per head
    tr = _info((TK, heads), (1, TK), "bool")
    if heads > 1:
        assert f90.operand_mode(tr, True) == f90.OPERAND_KEY_ROW
        assert _take(tr) is not None
    # neither rows nor keys contiguous: declined
    assert _take(_info((TK, heads), (2 * heads, 1), "bool")) is None
    # more heads than a chunk holds, a float32 bias: declined
    assert _take(_contig((TK, 256), "bool")) is None
    assert _take(None, _contig((TK, heads), "float32")) is None


def test_query_based_layouts():
    assert _take(_contig((TQ, HK, 400), "bool")) == (128, 128, 2)
    assert _take(None, _contig((TQ, H, 400))) == (128, 128, 2)
    assert _take(_contig((TQ, HK, 400), "bool"), _contig((TQ, 1, 400))) == (128, 64, 3)
    assert _take(_contig((TQ, HK, 401), "bool")) is None           # rows not 16-byte multiples
    assert _take(_contig((TQ, HK, 1), "bool")) is None             # one key column
    assert _take(None, _contig((TQ, H, 1))) is None


def test_block_sparse_routing():
    q, k = _contig((2, 1024, H, D)), _contig((2, 1024, HK, D))

    def take(block, mask=None, bias=None, d=D):
        qq, kk = (q, k) if d == D else (_contig((2, 1024, H, d)), _contig((2, 1024, HK, d)))
        return f90.tile_for(d, qq, kk, kk, mask, bias, 1024, 1024, sparse=block)

    assert take((128, 128)) == (128, 128, 2) and take((128, 128), d=64) == (64, 128, 2)
    assert take((256, 384)) == (128, 128, 2)
    assert take((64, 64)) is None and take((64, 128)) is None       # 64-row blocks: fwd_mma
    assert take((128, 64)) is None                                  # half a 128-key tile
    mask, bias = _contig((2, H, 1024, 1024), "bool"), _contig((2, H, 1024, 1024))
    assert take((128, 128), mask, bias) == (128, 64, 3)            # 64-key tiles: 2 per block
    assert take((128, 64), mask, bias) == (128, 64, 3)
    assert take(True) is None                                       # block size unknown
    assert _take(sparse=(128, 128)) is None                         # no lists with varlen


def _problem(varlen, mask=None, bias=None, d=D):
    q, k, v = _packed(d) if varlen else (_contig((2, MAXQ, H, d)), _contig((2, MAXK, HK, d)),
                                         _contig((2, MAXK, HK, d)))
    return Problem(kind="torch", backend="cuda", varlen=varlen, batch=2, seqlen_q=MAXQ,
                   seqlen_k=MAXK, heads=H, kv_heads=HK, head_dim=d, dtype="bfloat16",
                   scale=1.0, softcap=0.0, window=(-1, 0), q=q, k=k, v=v, mask=mask, bias=bias,
                   total_q=TQ if varlen else 0, total_k=TK if varlen else 0)


def test_select_routes_varlen_and_sparse_by_device():
    pb = _problem(True, _contig((TK, H), "bool"), _contig((TK, HK)))
    spec = select.forward(pb, H100)
    # runtime switches: no varlen/sparse template argument, the dense kernel's spec
    assert (spec.family, spec.varlen, spec.sparse, spec.block_m) == ("fwd_sm90", False, False,
                                                                     128)
    spec80 = select.forward(pb, A100)
    assert (spec80.family, spec80.varlen) == ("fwd_mma", True)
    dense = _problem(False)
    for block, fam in (((128, 128), "fwd_sm90"), ((64, 64), "fwd_mma"), (True, "fwd_mma")):
        spec = select.forward(dense, H100, sparse=block)
        assert spec.family == fam
        assert spec.sparse == (fam == "fwd_mma")
    assert select.forward(dense, A100, sparse=(128, 128)).family == "fwd_mma"
    # a query-based mask whose rows TMA cannot read goes to the portable kernel
    odd = _problem(True, _contig((TQ, HK, 401), "bool"))
    assert select.forward(odd, H100).family == "fwd_mma"


def test_block_size_of():
    assert block_size_of(None) is False
    arrs = SparseArrays(*(None,) * 6, block_m=256, block_n=128)
    assert block_size_of(arrs) == (256, 128)

    class M:
        block_size = (np.int64(128), 64)
    assert block_size_of(M()) == (128, 64)


def test_varlen_tensor_maps():
    q, k, v = _packed()
    maps = f90.plan_maps(q, k, v, None, None, 128, varlen=True)
    assert maps["q"].dims == (D, TQ, H, 1) and maps["q"].strides == (H * D * 2, D * 2, 16)
    assert maps["k"].dims == (D, TK, HK, 1) and maps["k"].box == (64, 128, 1, 1)
    # query-based (total_q, h', max_k): keys sequence-relative, rows packed, tiles swizzled
    plans = f90.plan_operands(_contig((TQ, HK, 400), "bool"), _contig((TQ, H, 400)), 64, True)
    m, b = plans["mask"].map, plans["bias"].map
    assert m.dims == (400, TQ, HK, 1) and m.strides == (HK * 400, 400, 16)
    assert m.box == (64, 128, 1, 1) and m.swizzle == 64
    assert b.dims == (400, TQ, H, 1) and b.strides == (H * 800, 800, 16) and b.swizzle == 128
    # key-based: the flattened tensor, 1-D boxes; transposed: one row per head (a bias by
    # TMA: beside a mask; without one the producer loads it, test_key_bias_by_plain_loads)
    key_mask = _contig((TK, 1), "bool")
    for heads, bn in ((1, 128), (HK, 128), (H, 64), (3, 64), (127, 128)):
        pl = f90.plan_operands(key_mask, _contig((TK, heads)), bn, True)["bias"]
        assert pl.mode == f90.OPERAND_KEY_CHUNK and pl.chunk_heads == heads
        assert pl.map.dims == (TK * heads, 1, 1, 1) and pl.map.box == (pl.chunk_box, 1, 1, 1)
        assert (pl.chunk_box, pl.chunk_boxes) == f90.chunk_box(bn, heads, 2)
        pl.map.check()
    with pytest.raises(f90.TensorMapError):  # 128 heads and a lead overflow the stage
        f90.plan_operands(key_mask, _contig((TK, 128)), 64, True)
    # boxes start 128-byte aligned in shared memory (TMA's rule), cover the values and the
    # longest lead, and fit one stage / slot
    for bn in (64, 128):
        for heads in range(1, f90.MAX_CHUNK_HEADS + 1):
            for elem in (1, 2):
                box, n_box = f90.chunk_box(bn, heads, elem)
                assert box <= 256 and (box * elem) % 16 == 0
                assert n_box == 1 or (box * elem) % 128 == 0
                assert n_box * box >= f90.key_span(bn, heads, elem)
                assert n_box * box * elem <= f90.key_stage_bytes(bn, elem) == 128 * bn * elem
    tr = f90.plan_operands(_info((TK, H), (1, TK), "bool"), None, 128, True)["mask"]
    assert tr.mode == f90.OPERAND_KEY_ROW
    assert tr.map.dims == (TK, 1, H, 1) and tr.map.strides == (16, TK, 16)
    assert tr.map.box == (128 + 16, 1, 1, 1) and (tr.chunk_box, tr.chunk_boxes) == (144, 1)


def test_args_record_carries_the_chunk_fields(monkeypatch):
    monkeypatch.setattr(f90, "encode", lambda spec, ptr: bytes([ptr % 251]) * 128)
    q, k, v = _packed()
    mask = _contig((TK, HK), "bool", ptr=7 << 20)
    bias = _contig((TQ, H, 400), ptr=9 << 20)
    rec = f90.build_args(q, k, v, mask, bias, 64, varlen=True)
    raw = rec.tobytes()
    assert len(raw) == 704 and raw[384:512] == bytes([(7 << 20) % 251]) * 128
    ints = np.frombuffer(raw[640:672], dtype=np.int32).tolist()
    box, boxes = f90.chunk_box(64, HK, 1)
    assert ints == [f90.OPERAND_KEY_CHUNK, f90.OPERAND_TILE, HK, 1, box, 0, boxes, 0]
    # a dense key row: one box of block_n from key n0 (keys start at 0: aligned)
    rec = f90.build_args(_contig((2, 64, H, D)), _contig((2, 256, HK, D)),
                         _contig((2, 256, HK, D)), _contig((2, H, 1, 256), "bool"), None, 128)
    ints = np.frombuffer(rec.tobytes()[640:672], dtype=np.int32).tolist()
    assert ints == [f90.OPERAND_KEY_ROW, 0, 1, 1, 128, 0, 1, 0]


def _key_plans():
    """Every varlen key-based operand plan by TMA: chunks (contiguous rows) and rows
    (transposed), mask and bias (beside a key mask: alone it is loaded by the producer),
    both block_n, h' from 1 to MAX_CHUNK_HEADS."""
    key_mask = _contig((TK, 1), "bool")
    for bn in (64, 128):
        for heads in (1, 2, 3, 4, 5, 8, 16, 33, 64, f90.MAX_CHUNK_HEADS):
            for dtype, name in (("bool", "mask"), ("bfloat16", "bias")):
                x = _contig((TK, heads), dtype)
                yield bn, heads, name, f90.plan_operands(
                    x if name == "mask" else key_mask, None if name == "mask" else x, bn,
                    True)[name]
            if heads > 1:
                for dtype, name in (("bool", "mask"), ("bfloat16", "bias")):
                    x = _info((TK, heads), (1, TK), dtype)
                    yield bn, heads, name, f90.plan_operands(
                        x if name == "mask" else key_mask, None if name == "mask" else x, bn,
                        True)[name]


def test_key_based_loads_start_16_byte_aligned():
    """The H200 fault (an illegal instruction, bias-q-mask-k-h1-64): a TMA box whose first
    global element is not 16-byte aligned faults, and a packed sequence's first key sits
    anywhere (k_start 12 there). Every key-based load the kernel issues (key_load_start,
    checked equal to fwd.cu's in test_sm90_layout) starts 16-byte aligned for every k_start,
    its boxes cover the tile's values past key_lead and fit the stage, and the expect_tx
    bytes are those of the boxes."""
    for bn, heads, name, pl in _key_plans():
        elem = 1 if name == "mask" else 2
        hp = pl.chunk_heads
        assert pl.mode in (f90.OPERAND_KEY_CHUNK, f90.OPERAND_KEY_ROW)
        assert pl.chunk_box == pl.map.box[0] and pl.chunk_boxes >= 1
        assert pl.chunk_boxes * pl.chunk_box * elem <= f90.key_stage_bytes(bn, elem)
        for k_start in range(0, 40):
            for n0 in (0, bn, 5 * bn):
                start = f90.key_load_start(k_start, n0, hp, elem)
                lead = f90.key_lead(k_start, hp, elem)
                assert (start * elem) % 16 == 0, (name, heads, bn, k_start, n0)
                assert start + lead == (k_start + n0) * hp
                assert lead + bn * hp <= pl.chunk_boxes * pl.chunk_box
                for y in range(pl.chunk_boxes):  # every box of the stage
                    assert ((start + y * pl.chunk_box) * elem) % 16 == 0


def test_key_chunk_model_reads_the_sequence_keys():
    """The kernel's key chunk: chunk_boxes boxes of chunk_box elements from key_load_start
    over the flattened tensor, zero past its end; a consumer reads key c of head column hc
    at key_lead + c * h' + hc. That is the operand's value of key k_start + n0 + c."""
    rng = np.random.default_rng(0)
    for heads, bn in ((1, 128), (1, 64), (3, 64), (HK, 128), (16, 64)):
        tk = 517
        x = rng.integers(1, 1000, size=(tk, heads))
        flat = x.reshape(-1)
        for elem in (1, 2):
            box, n_box = f90.chunk_box(bn, heads, elem)
            for k_start, n0 in ((0, 0), (12, 0), (37, 128), (450, 64), (316, 192)):
                e0 = f90.key_load_start(k_start, n0, heads, elem)
                assert (e0 * elem) % 16 == 0
                chunk = np.zeros(n_box * box, dtype=x.dtype)
                for y in range(n_box):
                    lo = e0 + y * box
                    part = flat[lo:lo + box]
                    chunk[y * box:y * box + len(part)] = part
                lead = f90.key_lead(k_start, heads, elem)
                for hc in range(heads):
                    for c in range(bn):
                        key = k_start + n0 + c
                        assert chunk[lead + c * heads + hc] == (x[key, hc] if key < tk else 0)


def _gather_keep(words: np.ndarray, t: int) -> int:
    """fwd.cu's gather of a thread's columns 8j + 2t + e from a row's words (LSB first)."""
    keep = 0
    for q, w in enumerate(words.tolist()):
        v = (w >> (2 * t)) & 0x03030303
        v = (v | v >> 6) & 0x000F000F
        v = (v | v >> 12) & 0xFF
        keep |= v << (8 * q)
    return keep


@pytest.mark.parametrize("block_n", [64, 128])
def test_partial_block_bit_gather(block_n):
    rng = np.random.default_rng(block_n)
    bits = rng.random(block_n) < 0.5
    # LSB first per word, as masks.py packs a partial block's rows
    words = np.array([sum(int(bits[32 * w + i]) << i for i in range(32))
                      for w in range(block_n // 32)], dtype=np.uint64)
    for t in range(4):
        keep = _gather_keep(words, t)
        for j in range(block_n // 8):
            for e in range(2):
                assert (keep >> (2 * j + e)) & 1 == bits[8 * j + 2 * t + e]


def test_partial_block_word_offset():
    """info[+3] = slot * (bm / 32) * bn + ((m0 % bm) * bn + n0 % bn) / 32, and a consumer's
    row adds lrow * bn / 32: the word holding element (m0 % bm + lrow, n0 % bn) of the slot."""
    for bm, bn, kbn in ((128, 128, 128), (256, 384, 128), (128, 128, 64)):
        for slot, m0, n0 in ((0, 0, 0), (3, bm - 128, bn - kbn), (5, 0, kbn)):
            base = slot * (bm // 32) * bn + ((m0 % bm) * bn + n0 % bn) // 32
            for lrow in (0, 77, 127):
                bit = slot * bm * bn + (m0 % bm + lrow) * bn + n0 % bn
                assert base + lrow * (bn // 32) == bit // 32 and bit % 32 == 0


def test_key_bias_by_plain_loads(monkeypatch):
    """Without a mask a key-based bias is read by the producer's plain loads (fwd.cu:
    bias_loads): no tensor map, so key counts whose rows are not 16-byte multiples (Sk = 2527),
    a misaligned start and strided keys stay on the Hopper family; beside a mask, or with
    DM_SM90_KBIAS_F32=0, the bias goes by TMA and such layouts go to the sm80 family."""
    q, k, v = (_contig((2, 2527, H, D)) for _ in range(3))
    kbias = _contig((2, H, 1, 2527), ptr=(1 << 20) + 2)  # rows 5054 bytes apart, misaligned
    plans = f90.plan_operands(None, kbias, 128)
    assert plans["bias"].mode == f90.OPERAND_KEY_ROW and plans["bias"].map is None
    assert f90.plan_maps(q, k, v, None, kbias, 128)["bias"] is None
    assert f90.tile_for(D, q, k, v, None, kbias, 2527, 2527) == (128, 128, 2)
    mask = _contig((2, 1, 1, 2528), "bool")
    kb_aligned = _contig((2, H, 1, 2528))
    q8, k8, v8 = (_contig((2, 2528, H, D)) for _ in range(3))
    assert f90.tile_for(D, q8, k8, v8, mask, kb_aligned, 2528, 2528) is not None
    assert f90.tile_for(D, q, k, v, _contig((2, 1, 1, 2527), "bool"), kbias, 2527, 2527) is None
    # varlen: a key chunk and a strided key row (neither rows nor keys contiguous)
    qp, kp, vp = _packed()
    for bias in (_contig((TK, H)), _info((TK, H), (2 * H, 2))):
        pl = f90.plan_operands(None, bias, 128, True)["bias"]
        assert pl.mode in (f90.OPERAND_KEY_CHUNK, f90.OPERAND_KEY_ROW) and pl.map is None
        assert f90.tile_for(D, qp, kp, vp, None, bias, MAXQ, MAXK, varlen=True) is not None
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_KBIAS_F32=0")
    assert not f90.bias_by_loads(None, kbias)
    assert f90.tile_for(D, q, k, v, None, kbias, 2527, 2527) is None
    assert f90.plan_operands(None, kb_aligned, 128)["bias"].map is not None
