"""The mask packing kernel's host half and its arithmetic, without a GPU: the switch, the
record, the vectorized-load rule, its registration as MixedMask.from_dense_mask's device
packer, and a NumPy emulation of cuda_src/mask_pack.cu (its lanes, nibbles, shuffles and
ballots, index for index) against the words and counts from_dense_mask's array operations
make."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from nvrtc_check import compile_static_asserts
from test_sm90_fwd_items import item_coords as fwd_item_coords

import dmattn_cupy  # noqa: F401  (registers the packer)
from dmattn_cupy import env, mask_pack, masks
from dmattn_cupy.masks import MixedMask
from dmattn_cupy.params import MASK_LISTS_DTYPE, MASK_PACK_DTYPE

# mask_pack.cu: kMaskPackRows16, kMaskPackRows, kMaskPackRowsScalar
WARPS, ROWS_16, ROWS_VEC, ROWS_SCALAR = mask_pack.PACK_WARPS, 4, 8, 4


def _emulate_vec16(tile: np.ndarray, words: np.ndarray, blk: int, warp: int, bm: int,
                   bn: int) -> int:
    """The 16-byte path's warp `warp` over one block (tile: its in-range part): writes its words
    and returns the kept bits its lanes counted."""
    rows, keys = tile.shape
    wpr, total = bn // 32, 0
    for q in range(bn // 128):
        for r0 in range(4 * warp, bm, 4 * WARPS * ROWS_16):
            for i in range(ROWS_16):
                v = []
                for lane in range(32):
                    r, key = r0 + lane // 8 + i * 4 * WARPS, 128 * q + 16 * (lane % 8)
                    n = keys - key  # in-range keys of this lane's group
                    x = [int(tile[r, key + e]) if r < rows and e < n else 0 for e in range(16)]
                    v.append(sum((x[e] != 0) << e for e in range(16)))
                    total += bin(v[-1]).count("1")
                for lane in range(0, 32, 2):  # the even lane stores its pair (shfl_down 1)
                    r = r0 + lane // 8 + i * 4 * WARPS
                    if r < bm:
                        words[blk, r * wpr + 4 * q + (lane % 8) // 2] = v[lane] | v[lane + 1] << 16
    return total


def emulate(dense4: np.ndarray, bm: int, bn: int, vec: int) -> tuple[np.ndarray, np.ndarray]:
    """What mask_pack_kernel writes: (kept (B, H, nrb, ncb), words (blocks, bm*bn/32)), every
    CTA, warp and lane of it run in turn with the kernel's own index arithmetic."""
    b, h, sq, sk = dense4.shape
    nrb, ncb, wpr = -(-sq // bm), -(-sk // bn), bn // 32
    words = np.full((b * h * nrb * ncb, bm * wpr), 0xDEADBEEF, dtype=np.uint32)  # unwritten
    kept = np.zeros((b, h, nrb, ncb), dtype=np.int64)
    for z in range(b * h):
        mb, mh = divmod(z, h)
        for rb in range(nrb):
            for cb in range(ncb):
                blk = (z * nrb + rb) * ncb + cb
                row0, key0 = rb * bm, cb * bn
                rows, keys = min(bm, sq - row0), min(bn, sk - key0)
                tile = dense4[mb, mh, row0:row0 + rows, key0:key0 + keys]  # in-range part

                total = 0
                for warp in range(WARPS):
                    if vec == 2:
                        total += _emulate_vec16(tile, words, blk, warp, bm, bn)
                    elif vec:
                        for q in range(bn // 128):
                            for r0 in range(warp, bm, WARPS * ROWS_VEC):
                                for i in range(ROWS_VEC):
                                    r = r0 + i * WARPS
                                    nib = []
                                    for lane in range(32):
                                        key = 128 * q + 4 * lane
                                        n = keys - key  # in-range keys of this lane's group
                                        x = [int(tile[r, key + e]) if r < rows and e < n else 0
                                             for e in range(4)]
                                        v = sum((x[e] != 0) << e for e in range(4))
                                        total += bin(v).count("1")
                                        nib.append(v << (4 * (lane % 8)))
                                    for lane in range(0, 32, 8):  # the xor-shuffle OR of 8 lanes
                                        w = 0
                                        for k in range(8):
                                            w |= nib[lane + k]
                                        if r < bm:
                                            words[blk, r * wpr + 4 * q + lane // 8] = w
                    else:
                        for j in range(wpr):
                            for r0 in range(warp, bm, WARPS * ROWS_SCALAR):
                                for i in range(ROWS_SCALAR):
                                    r = r0 + i * WARPS
                                    w = 0
                                    for lane in range(32):  # the ballot
                                        key = 32 * j + lane
                                        if r < rows and key < keys and tile[r, key]:
                                            w |= 1 << lane
                                    if r < bm:
                                        words[blk, r * wpr + j] = w
                                        total += bin(w).count("1")
                kept[mb, mh, rb, cb] = total
    return kept, words


def array_ops(dense4: np.ndarray, bm: int, bn: int) -> tuple[np.ndarray, np.ndarray]:
    """from_dense_mask's array-operation path: kept counts and per-block words."""
    b, h, sq, sk = dense4.shape
    nrb, ncb = -(-sq // bm), -(-sk // bn)
    rows = masks._dense_row_words(dense4, bm, bn, np)
    kept = masks._POPCOUNT8[rows].reshape(b, h, nrb, bm, ncb, bn // 8).sum(axis=(3, 5))
    blocks = rows.view(np.uint32).reshape(b, h, nrb, bm, ncb, bn // 32)
    return kept, blocks.transpose(0, 1, 2, 4, 3, 5).reshape(b * h * nrb * ncb, -1)


@pytest.mark.parametrize("shape,block,vec", [
    ((1, 1, 130, 272), (128, 128), 2),       # 16-byte loads; edge blocks: 2 rows, 16 keys
    ((2, 1, 70, 134), (50, 128), 2),         # a partial last group of 6 keys, 50-row blocks
    ((1, 2, 40, 290), (30, 256), 2),         # two 128-key chunks per block row; a warp's
                                             # rows cut by block_m inside its 4-row group
    ((1, 1, 130, 260), (128, 128), 1),       # edge blocks: 2 rows, 4 keys (a whole group)
    ((2, 1, 70, 131), (64, 128), 1),         # a partial last group of 3 keys
    ((1, 2, 40, 290), (32, 256), 1),         # two 128-key chunks per block row
    ((1, 1, 150, 97), (128, 32), 0),         # byte loads, 32-key blocks
    ((2, 2, 33, 70), (16, 64), 0),
])
def test_emulated_kernel_matches_the_array_operations(shape, block, vec):
    rng = np.random.default_rng(sum(shape))
    dense4 = rng.random(shape) < 0.6
    dense4[..., :5, :] = True          # some full blocks
    dense4[..., 5:9, :] = False
    kept, words = emulate(dense4, *block, vec)
    ref_kept, ref_words = array_ops(dense4, *block)
    np.testing.assert_array_equal(kept, ref_kept)
    np.testing.assert_array_equal(words, ref_words)   # every word written (no 0xDEADBEEF left)


def test_kept_nibble_is_the_nonzero_bytes():
    """common.cuh kept_nibble (the kernel's 4 keys -> 4 bits) against the emulation's rule,
    every nibble pattern with small, large and high-bit byte values."""
    checks = []
    for pattern in range(16):
        for value in (1, 0x7F, 0x80, 0xFF, 0x5A):
            word = sum(value << (8 * e) for e in range(4) if pattern >> e & 1)
            checks.append(f"static_assert(dm::kept_nibble({word}u) == {pattern}u);")
    compile_static_asserts('#include "common.cuh"\n' + "\n".join(checks) + "\n",
                           "kept_nibble.cu")


class _Buf:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _Dev:
    """A stand-in for a 4-D CuPy bool array: shape, byte strides, data.ptr."""

    def __init__(self, shape, strides, ptr=4096) -> None:
        self.shape, self.strides, self.data = shape, strides, _Buf(ptr)


def test_record_fields():
    d = _Dev((2, 3, 300, 520), (3 * 300 * 520, 300 * 520, 520, 1))
    rec = mask_pack.record(d.data.ptr, d.shape, d.strides, 8192, 12288, 128, 128)[0]
    assert rec.dtype == MASK_PACK_DTYPE
    assert (int(rec["mask"]), int(rec["words"]), int(rec["kept"])) == (4096, 8192, 12288)
    assert [int(rec[f]) for f in ("batch_stride", "head_stride", "row_stride", "col_stride")] \
        == list(d.strides)
    assert [int(rec[f]) for f in ("seqlen_q", "seqlen_k", "block_m", "block_n", "row_blocks",
                                  "col_blocks", "heads", "vec")] == [300, 520, 128, 128, 3, 5,
                                                                     3, 1]
    lists = mask_pack.lists_record(d.shape, 128, 128)[0]
    assert lists.dtype == MASK_LISTS_DTYPE
    assert [int(lists[f]) for f in ("seqlen_q", "seqlen_k", "block_m", "block_n", "row_blocks",
                                    "col_blocks", "rows")] == [300, 520, 128, 128, 3, 5, 18]
    assert all(int(lists[f]) == 0 for f in ("kept", "full_count", "full_idx", "partial_count",
                                             "partial_idx", "partial_slot"))


@pytest.mark.parametrize("ptr,strides,bn,vec", [
    (4096, (64, 64, 16, 1), 128, 2),
    (4096, (0, 0, 0, 1), 256, 2),        # broadcast dims
    (4096, (64, 64, -16, 1), 128, 2),    # a flipped row order
    (4100, (64, 64, 16, 1), 128, 1),     # a base 4-byte aligned only
    (4096, (64, 64, 20, 1), 128, 1),     # rows 20 bytes apart
    (4096, (68, 64, 16, 1), 128, 1),     # batches 68 bytes apart
    (4098, (64, 64, 16, 1), 128, 0),     # a misaligned base
    (4096, (64, 64, 18, 1), 128, 0),     # rows 18 bytes apart
    (4096, (64, 64, 16, 2), 128, 0),     # a key stride
    (4096, (64, 64, 16, 1), 96, 0),      # no whole 128-key chunks
])
def test_vectorized_rule(ptr, strides, bn, vec):
    assert mask_pack.vectorized(ptr, strides, bn) == vec


def test_takes():
    assert mask_pack.takes(_Dev((2, 4, 256, 256), ()), 128, 128)
    assert not mask_pack.takes(_Dev((2, 4, 256, 256), ()), 128, 48)       # bn % 32
    assert not mask_pack.takes(_Dev((300, 300, 8, 8), ()), 8, 32)         # B*H past grid z


def test_switch(monkeypatch):
    monkeypatch.delenv("DMATTN_MASK_PACK", raising=False)
    assert env.mask_pack_kernel() is True
    monkeypatch.setenv("DMATTN_MASK_PACK", "0")
    assert env.mask_pack_kernel() is False
    monkeypatch.setenv("DMATTN_MASK_PACK", "1")
    assert env.mask_pack_kernel() is True
    monkeypatch.setenv("DMATTN_MASK_PACK", "yes")
    with pytest.raises(ValueError, match="DMATTN_MASK_PACK"):
        env.mask_pack_kernel()


def test_registered_and_off_for_numpy(monkeypatch):
    assert mask_pack.pack_if_enabled in masks.DENSE_PACKERS
    monkeypatch.setenv("DMATTN_MASK_PACK", "1")

    def boom(*a):
        raise AssertionError("a NumPy mask reached a device packer")

    monkeypatch.setattr(masks, "DENSE_PACKERS", [boom])
    dense = np.random.default_rng(0).random((200, 300)) < 0.5
    np.testing.assert_array_equal(MixedMask.from_dense_mask(dense).to_dense(), dense)


def emulate_lists(kept: np.ndarray, sq: int, sk: int, bm: int, bn: int) -> dict[str, np.ndarray]:
    """What mask_lists_kernel writes from ``kept`` (B, H, nrb, ncb): each row's warp, its
    32-block chunks, ballots and lower-lane counts, with the kernel's own arithmetic."""
    b, h, nrb, ncb = kept.shape
    flat = kept.reshape(-1)
    out = {n: np.full((b * h * nrb, ncb), -7, dtype=np.int64) for n in ("full_idx",
                                                                         "partial_idx")}
    out["partial_slot"] = np.full(b * h * nrb * ncb, -7, dtype=np.int64)
    out["full_count"] = np.full(b * h * nrb, -7, dtype=np.int64)
    out["partial_count"] = np.full(b * h * nrb, -7, dtype=np.int64)
    for row in range(b * h * nrb):
        rb = row % nrb
        rows = min(bm, sq - rb * bm)
        nfull = npart = 0
        for cb0 in range(0, ncb, 32):
            full, part = [], []
            for lane in range(32):
                cb = cb0 + lane
                inside = cb < ncb
                k = flat[row * ncb + cb] if inside else 0
                allk = rows * min(bn, sk - cb * bn) if inside else 0
                full.append(inside and k == allk)
                part.append(0 < k < allk)
            for lane in range(32):
                cb, blk = cb0 + lane, row * ncb + cb0 + lane
                if full[lane]:
                    out["full_idx"][row, nfull + sum(full[:lane])] = cb
                if part[lane]:
                    out["partial_idx"][row, npart + sum(part[:lane])] = cb
                if cb < ncb:
                    out["partial_slot"][blk] = blk if part[lane] else -1
            nfull += sum(full)
            npart += sum(part)
        for cb in range(ncb):
            if cb >= nfull:
                out["full_idx"][row, cb] = 0
            if cb >= npart:
                out["partial_idx"][row, cb] = 0
        out["full_count"][row], out["partial_count"][row] = nfull, npart
    return out


@pytest.mark.parametrize("sq,sk,lead", [(300, 520, (2, 3)), (128, 128 * 40, (1, 1)),
                                        (129, 33 * 128 + 5, (1, 2))])
def test_lists_emulation_equals_mixed_mask_lists(sq, sk, lead):
    """The lists kernel's emulation over the packing's counts gives MixedMask's lists (counts,
    ascending indices, zeros past each count; more than 32 column blocks take two chunks) and
    each partial block's slot is its own index, where from_dense_mask's words for it are."""
    bm = bn = 128
    rng = np.random.default_rng(sq + sk)
    dense = rng.random((*lead, sq, sk)) < 0.9
    dense[..., :128, :128] = True
    dense[..., -1:, 128:256] = False
    dense[..., :, -3:] = False           # the last (partial-width) column block: empty or not
    if sk > 1024:
        dense[..., :, 256 * 4:256 * 9] = False  # empty blocks between kept ones
        dense[..., :, 128 * 32:128 * 33] = True  # a full block in the second chunk
    kept, words = emulate(dense, bm, bn, vec=sk % 4 == 0)
    got = emulate_lists(kept, sq, sk, bm, bn)
    want = MixedMask.from_dense_mask(dense, (bm, bn))
    lists = want.block_lists(bm, bn)
    nrows = int(np.prod(lead)) * kept.shape[2]
    for name in ("full", "partial"):
        count = getattr(lists, f"{name}_count").reshape(-1)
        idx = getattr(lists, f"{name}_idx").reshape(nrows, -1)
        np.testing.assert_array_equal(got[f"{name}_count"], count)
        for r in range(nrows):
            np.testing.assert_array_equal(got[f"{name}_idx"][r, :count[r]], idx[r, :count[r]])
            assert (got[f"{name}_idx"][r, count[r]:] == 0).all()
    cls = want.block_class.reshape(-1)
    slot = got["partial_slot"]
    assert ((slot >= 0) == (cls == masks.PARTIAL)).all() and (cls == masks.PARTIAL).any()
    compact = want.partial_slot.reshape(-1)
    for blk in np.nonzero(cls == masks.PARTIAL)[0]:
        assert slot[blk] == blk
        np.testing.assert_array_equal(words[blk], want.partial_bits[compact[blk]])


def _route_problem(mask_shape, d=128, bias=True, varlen=False, sq=1000, sk=1200, b=2, h=8,
                   hk=2):
    from dmattn_cupy.arrays import ArrayInfo
    from dmattn_cupy.forward import collapsed_broadcasts
    from dmattn_cupy.validate import Problem

    def info(shape, dtype="bfloat16"):
        st = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
        return ArrayInfo("torch", dtype, tuple(shape), tuple(st), 0, 1 << 20)

    pb = Problem(kind="torch", backend="cuda", varlen=varlen, batch=b, seqlen_q=sq, seqlen_k=sk,
                 heads=h, kv_heads=hk, head_dim=d, dtype="bfloat16", scale=1.0, softcap=0.0,
                 window=(-1, -1), q=info((b, sq, h, d)), k=info((b, sk, hk, d)),
                 v=info((b, sk, hk, d)), mask=info(mask_shape, "bool"),
                 bias=info((b, h, sq, sk)) if bias else None)
    return collapsed_broadcasts(pb)


def test_route_decision(monkeypatch):
    """routes_mask: a (.., Sq, Sk) mask with batch/head dims 1 or full, on the Hopper family
    with 128 x 128 lists; not a key-only or per-kv-head mask, a varlen call, the portable
    family (A100, or forced) or DMATTN_MASK_ROUTE=0; by default (auto) only a mask that
    several (batch, head) pairs share."""
    from dmattn_cupy.device import PRESETS

    h100, a100 = PRESETS["sm_90"], PRESETS["sm_80"]
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "1")
    for shape in ((2, 8, 1000, 1200), (2, 1, 1000, 1200), (1, 1, 1000, 1200)):
        for bias in (True, False):
            for d in (64, 128):
                assert mask_pack.routes_mask(_route_problem(shape, d, bias), h100), (shape, d)
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200)), a100)
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1, 1200)), h100)     # key-only
    assert not mask_pack.routes_mask(_route_problem((2, 2, 1000, 1200)), h100)  # per kv head
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1)), h100)     # query rows
    monkeypatch.setenv("DMATTN_FWD_FAMILY", "fwd_mma")
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200)), h100)
    monkeypatch.delenv("DMATTN_FWD_FAMILY")
    for val in ("auto", ""):  # the default
        monkeypatch.setenv("DMATTN_MASK_ROUTE", val)
        for shape, b, h in (((2, 1, 1000, 1200), 2, 8), ((1, 1, 1000, 1200), 2, 8),
                            ((1, 8, 1000, 1200), 2, 8), ((1, 1, 1000, 1200), 2, 1)):
            assert mask_pack.routes_mask(_route_problem(shape, b=b, h=h, hk=1), h100), shape
        for shape, b, h in (((2, 8, 1000, 1200), 2, 8), ((1, 1, 1000, 1200), 1, 1),
                            ((2, 1, 1000, 1200), 2, 1)):   # one mask per (batch, head)
            assert not mask_pack.routes_mask(_route_problem(shape, b=b, h=h, hk=1), h100), shape
    monkeypatch.delenv("DMATTN_MASK_ROUTE")
    assert mask_pack.routes_mask(_route_problem((2, 1, 1000, 1200)), h100)
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200)), h100)
    # a mask of its own per pair beside a bias: routed where its bytes would take the portable
    # family (d192/d256) on any Hopper card, and on fast HBM where they would take 64-key
    # tiles (d <= 128); never without a bias (the bytes then take the lists' 128-key tiles)
    fast = dataclasses.replace(h100, dram_bytes_per_s=mask_pack.ROUTE_OWN_MASK_DRAM)
    slow = dataclasses.replace(h100, dram_bytes_per_s=mask_pack.ROUTE_OWN_MASK_DRAM * 0.99)
    for d in (64, 96, 128, 192, 256):
        own = _route_problem((2, 8, 1000, 1200), d)
        assert mask_pack.routes_mask(own, fast), d
        assert mask_pack.routes_mask(own, slow) == (d > 128), d
        assert mask_pack.routes_mask(own, h100) == (d > 128), d
        assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200), d, False), fast), d
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200)), dataclasses.replace(
        a100, dram_bytes_per_s=8e12))                                # no Hopper forward
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "0")
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200)), h100)
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "2")
    with pytest.raises(ValueError, match="DMATTN_MASK_ROUTE"):
        mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200)), h100)


def test_pack_warps_route_decision(monkeypatch):
    """packs_in_forward: only under DMATTN_MASK_ROUTE=warps, beside a tile bias, for a
    (.., Sq, Sk) mask with batch/head dims 1 or full whose layout the warps read (Sk a multiple
    of 32), on the Hopper family; where it declines, routes_mask decides as under auto."""
    from dmattn_cupy.device import PRESETS

    h100, a100 = PRESETS["sm_90"], PRESETS["sm_80"]
    own = (2, 8, 1000, 1216)
    assert not mask_pack.packs_in_forward(_route_problem(own, sk=1216), h100)   # auto
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "warps")
    for shape in (own, (2, 1, 1000, 1216), (1, 1, 1000, 1216)):
        for d in (64, 128, 256):
            assert mask_pack.packs_in_forward(_route_problem(shape, d, sk=1216), h100), (shape, d)
    assert not mask_pack.packs_in_forward(_route_problem(own, bias=False, sk=1216), h100)
    assert not mask_pack.packs_in_forward(_route_problem((2, 8, 1000, 1200)), h100)  # Sk % 32
    assert not mask_pack.packs_in_forward(_route_problem((2, 8, 1, 1216), sk=1216), h100)
    assert not mask_pack.packs_in_forward(_route_problem((2, 2, 1000, 1216), sk=1216), h100)
    assert not mask_pack.packs_in_forward(_route_problem(own, sk=1216, varlen=True), h100)
    assert not mask_pack.packs_in_forward(_route_problem(own, sk=1216), a100)
    # declined: the lists as under auto (a shared mask routed, one of its own per pair not)
    assert mask_pack.routes_mask(_route_problem((2, 1, 1000, 1200)), h100)
    assert not mask_pack.routes_mask(_route_problem((2, 8, 1000, 1200)), h100)


def item_coords(i: int, num_m: int, bh: int) -> tuple[int, int]:
    """item_order.cuh's sm90_item_coords as the forward numbers block-list items (never head
    major) at the default DM_SM90_LPT_HEADS (4)."""
    return fwd_item_coords(i, num_m, bh, False, 4)


def emulate_rows(dense4: np.ndarray, ctas: int) -> tuple[dict, np.ndarray, list[list[int]]]:
    """What mask_rows_kernel writes for a (B, H, Sq, Sk) mask at 128 x 128 blocks: (the lists
    as emulate_lists gives them, words (blocks, 512), per CTA the (ready word, block row) it
    wrote, in order), thread t = 8 r + s taking row r and keys 16 s .. + 15 of each block, a
    block's count summed over the CTA's threads, with the kernel's own index arithmetic."""
    b, h, sq, sk = dense4.shape
    nrb, ncb, bh = -(-sq // 128), -(-sk // 128), b * h
    words = np.full((bh * nrb * ncb, 512), 0xDEADBEEF, dtype=np.uint32)
    kept = np.full((b, h, nrb, ncb), -7, dtype=np.int64)
    ready: list[list[tuple[int, int]]] = [[] for _ in range(ctas)]
    tid = np.arange(32 * mask_pack.ROWS_WARPS)
    r, s = tid // 8, tid % 8
    for cta in range(ctas):
        for u in range(cta, bh * nrb, ctas):
            rb, z = item_coords(u, nrb, bh)
            row = z * nrb + rb
            mb, mh = divmod(z, h)
            row_in = r < sq - rb * 128
            kept_s = np.zeros(ncb, dtype=np.int64)
            for cb in range(ncb):
                v = np.zeros(tid.size, dtype=np.uint32)
                for e in range(16):  # the 16-byte load, or byte by byte at the row's tail
                    key = cb * 128 + 16 * s + e
                    ok = row_in & (key < sk)
                    bit = dense4[mb, mh, np.where(ok, rb * 128 + r, 0),
                                 np.where(ok, key, 0)] & ok
                    v |= bit.astype(np.uint32) << np.uint32(e)
                kept_s[cb] += sum(bin(int(x)).count("1") for x in v)
                for t in tid[s % 2 == 0]:  # the even lane: its bits and its neighbour's
                    words[row * ncb + cb, r[t] * 4 + s[t] // 2] = v[t] | v[t + 1] << np.uint32(16)
            kept.reshape(-1, ncb)[row] = kept_s
            ready[cta].append((u, row))
    return emulate_lists(kept, sq, sk, 128, 128), words, ready


@pytest.mark.parametrize("sq,sk,lead,ctas", [(300, 520, (2, 3), 5), (129, 33 * 128 + 16, (1, 1), 1),
                                             (256, 256, (2, 4), 3)])
def test_rows_emulation_equals_the_two_kernels(sq, sk, lead, ctas):
    """mask_rows_kernel's emulation writes the words and lists of mask_pack_kernel +
    mask_lists_kernel (their emulations, checked against MixedMask above) for every block row,
    sets each row ready exactly once, and each CTA takes its rows in the forward's item order
    (item u of the forward reads block row item_coords(u), and waits on word u)."""
    rng = np.random.default_rng(sq + sk + ctas)
    dense = rng.random((*lead, sq, sk)) < 0.9
    dense[..., :128, :128] = True
    dense[..., -1:, 128:256] = False
    dense[..., :, -3:] = False
    got, words, ready = emulate_rows(dense, ctas)
    kept, want_words = emulate(dense, 128, 128, vec=2)
    want = emulate_lists(kept, sq, sk, 128, 128)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(words, want_words)
    bh, nrb = int(np.prod(lead)), -(-sq // 128)
    # the forward's item u: sparse_row_entry of its (batch, head, query tile)
    row_of = [rb + nrb * z for rb, z in (item_coords(u, nrb, bh) for u in range(bh * nrb))]
    assert sorted(row_of) == list(range(bh * nrb))
    for cta, pairs in enumerate(ready):
        assert [u for u, _ in pairs] == list(range(cta, bh * nrb, ctas))
        assert all(row == row_of[u] for u, row in pairs)


def test_overlap_route_decision(monkeypatch):
    """overlaps: only under DMATTN_MASK_ROUTE=overlap (which routes every mask as ``1`` does),
    on compute capability 9.0+, for a mask of its own per (batch, head) with 16-byte aligned
    rows at a unit key stride; a shared or per-batch mask, a pitched one and other modes take
    the two packing launches. The grid: DMATTN_MASK_OVERLAP_CTAS, else a sixth of the SMs, at
    most a CTA per block row."""
    from dmattn_cupy.arrays import ArrayInfo
    from dmattn_cupy.device import PRESETS

    h100, a100 = PRESETS["sm_90"], PRESETS["sm_80"]
    own = _route_problem((2, 8, 1000, 1200))
    for mode in ("auto", "0", "1", "warps"):
        monkeypatch.setenv("DMATTN_MASK_ROUTE", mode)
        assert not mask_pack.overlaps(own, h100), mode
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "overlap")
    assert mask_pack.routes_mask(own, h100) and mask_pack.overlaps(own, h100)
    assert mask_pack.routes_mask(_route_problem((2, 1, 1000, 1200)), h100)
    assert not mask_pack.overlaps(_route_problem((2, 1, 1000, 1200)), h100)   # shared by heads
    assert not mask_pack.overlaps(_route_problem((1, 1, 1000, 1200)), h100)
    assert not mask_pack.overlaps(own, a100)
    one = _route_problem((1, 1, 1000, 1200), b=1, h=1, hk=1)   # its size-1 dims' strides
    odd = dataclasses.replace(one.mask, strides=(7, 3, 1200, 1))   # do not count
    assert mask_pack.overlaps(dataclasses.replace(one, mask=odd), h100)
    pitched = dataclasses.replace(own.mask, strides=(8 * 1000 * 1208, 1000 * 1208, 1208, 1))
    assert not mask_pack.overlaps(dataclasses.replace(own, mask=pitched), h100)
    shifted = dataclasses.replace(own.mask, ptr=own.mask.ptr + 4)
    assert not mask_pack.overlaps(dataclasses.replace(own, mask=shifted), h100)
    wide = _route_problem((1, 1, 128, 128 * (mask_pack.MAX_ROWS_COL_BLOCKS + 1)), b=1, h=1,
                          hk=1, sq=128, sk=128 * (mask_pack.MAX_ROWS_COL_BLOCKS + 1))
    assert not mask_pack.overlaps(wide, h100)
    assert isinstance(own.mask, ArrayInfo)
    assert mask_pack.overlap_ctas(h100, 10_000) == h100.sm_count // 6
    assert mask_pack.overlap_ctas(h100, 3) == 3
    monkeypatch.setenv("DMATTN_MASK_OVERLAP_CTAS", "40")
    assert mask_pack.overlap_ctas(h100, 10_000) == 40
    monkeypatch.setenv("DMATTN_MASK_OVERLAP_CTAS", "many")
    with pytest.raises(ValueError, match="DMATTN_MASK_OVERLAP_CTAS"):
        mask_pack.overlap_ctas(h100, 10_000)
