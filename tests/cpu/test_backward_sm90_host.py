"""The Hopper backward's host half without a GPU: DMATTN_BWD_FAMILY, which problems
select.backward_family sends to bwd_sm90 (and which stay on the portable kernels), the
Sm90BwdArgs record, the precompile enumeration, and run_backward's launches with the runtime
stubbed."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dmattn_cupy import arrays, backward, backward_sm90, env, precompile, runtime, select
from dmattn_cupy.arrays import describe
from dmattn_cupy.device import PRESETS
from dmattn_cupy.validate import check_dense

# no kernel runs here: dQ is cast out of an unfilled workspace (the pre kernel zeroes it on a
# GPU), so NumPy may see garbage overflow in that cast
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

H100, A100 = PRESETS["sm_90"], PRESETS["sm_80"]


def _arrays(b=2, sq=200, sk=264, h=4, hk=2, d=128, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, h, d)).astype(dtype)
    k = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    v = rng.standard_normal((b, sk, hk, d)).astype(dtype)
    return q, k, v


def _pb(q, k, v, mask=None, bias=None, causal=False, window=(-1, -1)):
    pb = check_dense(q, k, v, mask, bias, None, causal, window, 0.0, "reference")
    return dataclasses.replace(pb, backend="cuda")


def _family(pb, dout=None, deterministic=False, sparse=False, dev=H100):
    d = describe(dout) if dout is not None else pb.q
    return select.backward_family(pb, d, deterministic, sparse, dev)


def test_env_values(monkeypatch):
    monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    assert env.backward_family_override() is None
    for val in ("bwd_sm90", "bwd_dkdv"):
        monkeypatch.setenv("DMATTN_BWD_FAMILY", val)
        assert env.backward_family_override() == val
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "fast")
    with pytest.raises(ValueError, match="DMATTN_BWD_FAMILY"):
        env.backward_family_override()


def test_hopper_backward_is_the_default_on_cc90_only(monkeypatch):
    q, k, v = _arrays()
    pb = _pb(q, k, v, causal=True)
    for val in (None, "auto", "bwd_sm90"):
        if val is None:
            monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
        else:
            monkeypatch.setenv("DMATTN_BWD_FAMILY", val)
        assert _family(pb) == "bwd_sm90", val
        assert _family(pb, dev=A100) == "bwd_dkdv", val
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_dkdv")  # the portable kernels stay selectable
    assert _family(pb) == "bwd_dkdv"
    assert _family(pb, dev=A100) == "bwd_dkdv"


@pytest.mark.parametrize("val", [None, "bwd_sm90"], ids=["default", "forced"])
def test_what_phase_1_takes_and_declines(monkeypatch, val):
    if val is None:
        monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    else:
        monkeypatch.setenv("DMATTN_BWD_FAMILY", val)
    q, k, v = _arrays()
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    f16 = np.float16
    taken = [None, np.zeros((b, h, sq, sk), f16), np.zeros((b, h, 1, sk), f16)]
    for bias in taken:
        assert _family(_pb(q, k, v, bias=bias)) == "bwd_sm90"
    # broadcast over batch and/or heads: dbias in a widened buffer, summed afterwards
    for shape in ((1, h, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (1, h, 1, sk),
                  (1, 1, 1, sk), (b, 2, sq, sk), (1, 2, 1, sk)):
        assert _family(_pb(q, k, v, bias=np.zeros(shape, f16))) == "bwd_sm90", shape
    declined = [np.zeros((b, h, sq, 1), f16), np.zeros((b, h, sq, sk), np.float32)]
    for bias in declined:
        assert _family(_pb(q, k, v, bias=bias)) == "bwd_dkdv", bias.shape
    pb = _pb(q, k, v)
    assert _family(pb, deterministic=True) == "bwd_sm90"
    assert _family(pb, sparse=True) == "bwd_dkdv"
    # a mask: every dense mask broadcast, alone, with either bias layout, deterministic too
    for shape in ((b, h, sq, sk), (b, h, 1, sk), (1, h, sq, sk), (b, 1, sq, sk),
                  (b, 2, sq, sk), (b, h, sq, 1), (1, 1, 1, 1)):
        mask = np.ones(shape, bool)
        for bias in taken:
            for det in (False, True):
                assert _family(_pb(q, k, v, mask=mask, bias=bias), deterministic=det) == \
                    "bwd_sm90", (shape, det)
    # a mask whose rows are not 16-byte multiples is read byte by byte: still taken
    q2, k2, v2 = _arrays(sk=250)
    assert _family(_pb(q2, k2, v2, mask=np.ones((b, h, sq, 250), bool))) == "bwd_sm90"
    assert _family(dataclasses.replace(pb, varlen=True)) == "bwd_dkdv"
    for d in (32, 64, 96):  # padded to 64 / 128
        assert _family(_pb(*_arrays(d=d))) == "bwd_sm90"
    assert _family(_pb(*_arrays(d=256))) == "bwd_dkdv"
    # a dout TMA cannot read (rows of 8 halves = 16 bytes are fine; a stride of 3 is not)
    bad = np.zeros((b, sq, h, 3 * 128), f16)[..., ::3]
    assert _family(pb, dout=bad) == "bwd_dkdv"
    # odd bias rows (Sk = 250: 500-byte rows are not 16-byte multiples)
    q2, k2, v2 = _arrays(sk=250)
    assert _family(_pb(q2, k2, v2, bias=np.zeros((b, h, sq, 250), f16))) == "bwd_dkdv"
    assert _family(_pb(q2, k2, v2)) == "bwd_sm90"


def test_bias_modes():
    f = backward_sm90.bias_mode
    info = describe(np.zeros((2, 4, 200, 264), np.float16))
    assert f(info, 2, 4, 200, 264) == backward_sm90.BIAS_TILE
    assert f(describe(np.zeros((2, 4, 1, 264), np.float16)), 2, 4, 200, 264) == \
        backward_sm90.BIAS_KEY_ROW
    assert f(None, 2, 4, 200, 264) == backward_sm90.BIAS_NONE
    assert f(describe(np.zeros((2, 4, 200, 1), np.float16)), 2, 4, 200, 264) is None
    assert f(describe(np.zeros((2, 2, 200, 264), np.float16)), 2, 4, 200, 264) == \
        backward_sm90.BIAS_TILE
    assert f(describe(np.zeros((2, 3, 200, 264), np.float16)), 2, 4, 200, 264) is None
    assert f(describe(np.zeros((1, 1, 200, 264), np.float16)), 2, 4, 200, 264) == \
        backward_sm90.BIAS_TILE
    assert f(describe(np.zeros((1, 4, 1, 264), np.float16)), 2, 4, 200, 264) == \
        backward_sm90.BIAS_KEY_ROW


def test_widened_dbias():
    """The dbias buffer of a broadcast bias: one slice per (batch, head) the kernel runs, viewed
    with each bias head's group of heads on axis 2, summed over the shared axes afterwards; the
    sum of that view is the gradient of the broadcast (numpy model)."""
    f = backward_sm90.widened_dbias
    assert f((2, 4, 200, 264), 2, 4) == ((2, 4, 200, 264), (2, 4, 1, 200, 264), ())
    assert f((1, 4, 1, 264), 2, 4) == ((2, 4, 1, 264), (2, 4, 1, 1, 264), (0,))
    assert f((2, 1, 200, 264), 2, 4) == ((2, 4, 200, 264), (2, 1, 4, 200, 264), (2,))
    assert f((1, 2, 1, 264), 3, 8) == ((3, 8, 1, 264), (3, 2, 4, 1, 264), (0, 2))
    rng = np.random.default_rng(0)
    for shape in ((1, 2, 3, 5), (2, 1, 3, 5), (1, 4, 1, 5), (2, 4, 3, 5)):
        wide, view, axes = f(shape, 2, 4)
        per_head = rng.standard_normal(wide)  # d loss / d (bias as head h of batch b reads it)
        got = per_head.reshape(view).sum(axes, keepdims=True).reshape(shape)
        want = np.zeros(shape)
        for b in range(2):
            for h in range(4):
                want[b % shape[0], h // (4 // shape[1])] += per_head[b, h]
        np.testing.assert_allclose(got, want)


def test_widened_dbias_sums_in_float32_in_every_library():
    """finish_backward's sum of a widened dbias (arrays.summer): a float32 accumulator for
    16-bit partials, rounded once into the result's dtype, NumPy and torch alike."""
    import torch

    # 3 (1 + 2^-10) = 3 + 1.5 * 2^-9: exact in float32, not in float16 (steps of 2^-9 there)
    x = np.full((3, 4, 1, 300), 1.0 + 2.0 ** -10, np.float16)
    # 2048 + 1 + 1: 2050 in float32 and in float16; a float16 accumulator stays at 2048
    y = np.broadcast_to(np.array([2048, 1, 1], np.float16)[:, None, None, None],
                        (3, 4, 1, 300)).copy()
    for lib in (np.asarray, torch.from_numpy):
        got = arrays.summer(lib(x), (0,), "float32")(lib(x))
        assert tuple(got.shape) == (1, 4, 1, 300) and "float32" in str(got.dtype)
        np.testing.assert_array_equal(np.asarray(got), np.float32(3 * (1.0 + 2.0 ** -10)))
        for src in (y, y.astype(np.float32)):  # the Hopper kernel's / the portable partials
            got = arrays.summer(lib(src), (0,), "float16")(lib(src))
            assert tuple(got.shape) == (1, 4, 1, 300) and "float16" in str(got.dtype)
            np.testing.assert_array_equal(np.asarray(got), np.float16(2050))


@pytest.mark.parametrize("shape,axes", [((2, 3, 5, 7), (0,)), ((2, 2, 5, 7), (0, 1)),
                                        ((1, 2, 4, 5, 7), (2,)), ((2, 2, 2, 1, 7), (0, 2)),
                                        ((2, 6, 5, 7), (1,)), ((1, 3, 5, 7), (0,))],
                         ids=["batch2", "batch2_heads2", "group4", "batch_group", "heads6",
                              "one"])
@pytest.mark.parametrize("out,src", [("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                     ("float32", "float32")])
def test_widened_dbias_sum_is_a_fixed_order_float32_sum(shape, axes, out, src):
    """arrays.summer on torch: up to 4 terms added slice by slice in float32 in C order (one
    rounding into ``out``: bitwise what a NumPy float32 model gives); more terms by torch's
    float32 reduction (allclose)."""
    import torch

    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g).to(torch.bfloat16).to(getattr(torch, src))
    before = x.clone()
    got = arrays.summer(x, axes, out)(x)
    assert torch.equal(x, before) and got.data_ptr() != x.data_ptr()  # a new tensor
    xs = x.float().numpy()
    n = math.prod(shape[a] for a in axes)
    keep = tuple(1 if d in axes else shape[d] for d in range(len(shape)))
    terms = [xs[tuple(slice(i, i + 1) if d in axes else slice(None) for d, i in
                      zip(range(len(shape)), idx, strict=True))]
             for idx in np.ndindex(*(shape[d] if d in axes else 1 for d in range(len(shape))))]
    want = terms[0].astype(np.float32)
    for t in terms[1:]:
        want = want + t
    assert tuple(got.shape) == keep and str(got.dtype) == f"torch.{out}"
    want_t = torch.from_numpy(np.ascontiguousarray(want)).to(getattr(torch, out))
    if n <= 4:
        assert torch.equal(got, want_t)
    else:
        torch.testing.assert_close(got.float(), want_t.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dq_tensor", [False, True])
def test_args_record_layout(monkeypatch, dq_tensor):
    """Sm90BwdArgs as the kernel reads it: map i (q, k, v, dout, bias, dqa) at bytes 128 i,
    then the bias mode at 768 and the deterministic counters' pointer at 776 (0: default
    mode); a key-row bias has no map (the consumers read it directly), nor has a mask (the
    producer reads it through its strides); the dqa map over dq_accum only with
    DM_SM90_BWD_DQ_WRITER=2."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", f"DM_SM90_BWD_DQ_WRITER={2 if dq_tensor else 0}")
    monkeypatch.setattr(backward_sm90, "encode", lambda spec, ptr: bytes([ptr % 251]) * 128)
    q, k, v = _arrays()
    infos = [dataclasses.replace(describe(x), ptr=(i + 1) << 20) for i, x in
             enumerate((q, k, v, q))]
    dqa = 6 << 20
    for bias, mode in ((np.zeros((2, 4, 200, 264), np.float16), backward_sm90.BIAS_TILE),
                       (np.zeros((2, 4, 1, 264), np.float16), backward_sm90.BIAS_KEY_ROW)):
        binfo = dataclasses.replace(describe(bias), ptr=5 << 20)
        raw = backward_sm90.build_args(*infos, binfo, mode, 0, dqa).tobytes()
        assert len(raw) == 832
        assert np.frombuffer(raw[776:784], np.uint64)[0] == 0
        raw_det = backward_sm90.build_args(*infos, binfo, mode, 0x7F0012345600, dqa).tobytes()
        assert np.frombuffer(raw_det[776:784], np.uint64)[0] == 0x7F0012345600
        assert raw_det[:776] == raw[:776] and raw_det[784:] == raw[784:]
        for i in range(4):
            assert raw[128 * i:128 * (i + 1)] == bytes([((i + 1) << 20) % 251]) * 128
        want = bytes([(5 << 20) % 251]) * 128 if mode == backward_sm90.BIAS_TILE else bytes(128)
        assert raw[512:640] == want
        assert raw[640:768] == (bytes([dqa % 251]) * 128 if dq_tensor else bytes(128))
        assert np.frombuffer(raw[768:772], np.int32)[0] == mode
    maps = backward_sm90.plan_maps(*infos, describe(np.zeros((2, 4, 200, 264), np.float16)),
                                   backward_sm90.BIAS_TILE)
    assert maps["q"].box == (64, 64, 1, 1) and maps["k"].box == (64, 128, 1, 1)
    assert maps["bias"].dims == (264, 200, 4, 2) and maps["bias"].box == (64, 64, 1, 1)
    assert maps["bias"].swizzle == 128


@pytest.mark.parametrize("d,hd", [(128, 128), (72, 128), (64, 64), (40, 64)])
def test_dq_accum_map_spans_a_writer_slot(d, hd):
    """The tensor writer's map: fp32 over dq_accum (q's shape, contiguous: (d, S, H, B) with
    byte strides H d 4, d 4, S H d 4), box = one ring slot as it lies in shared memory
    (kDQTileRow / 4 columns, of which those past d are out of bounds, x 64 rows), no swizzle."""
    q = describe(np.zeros((2, 200, 4, d), np.float16))
    spec = backward_sm90.plan_maps(q, q, q, q, None, backward_sm90.BIAS_NONE, True)["dqa"]
    assert spec.float32 and spec.elem_bytes == 4 and spec.swizzle == 0
    assert spec.dims == (d, 200, 4, 2)
    assert spec.strides == (4 * 4 * d, 4 * d, 200 * 4 * d * 4)
    assert spec.box == (backward_sm90.dq_tile_row_bytes(hd) // 4, backward_sm90.BLOCK_M, 1, 1)
    assert spec.box[0] > d  # the bank padding is never written
    spec.check()
    assert backward_sm90.plan_maps(q, q, q, q, None, backward_sm90.BIAS_NONE, False)[
        "dqa"] is None


@pytest.mark.parametrize("mode", [0, 2])
def test_run_backward_patches_the_dq_accum_map_from_the_workspace(monkeypatch, mode):
    """With DM_SM90_BWD_DQ_WRITER=2 the dqa map is encoded over the call's workspace (dq_accum
    at its element 0) and its address is a "ws" slot of the cached plan, and the spec asks for
    the shared memory of the writer's ring; with =0 (the consumers add) there is neither."""
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", f"DM_SM90_BWD_DQ_WRITER={mode}")
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    encoded: list = []
    monkeypatch.setattr(backward_sm90, "encode", lambda spec, ptr: (
        encoded.append((spec, ptr)), bytes(128))[1])
    monkeypatch.setattr(backward_sm90, "address_slots", lambda *a: (
        ("q", 8), ("k", 136)) + ((("dqa", 640 + 16),) if mode == 2 else ()))
    q, k, v = _arrays()
    pb = _pb(q, k, v)
    _, plan = backward.backward_call(pb, np.zeros_like(q), q, k, v, np.zeros_like(q),
                                     np.zeros((2, 4, 200), np.float32))
    spec, _, (rec, _) = launched[1]
    assert spec.dynamic_smem == backward_sm90.smem_bytes(128, False, False, mode == 2)
    dqa = [(s, p) for s, p in encoded if s.float32]
    if mode == 0:
        assert not dqa
        return
    assert [p for _, p in dqa] == [int(rec["dq_accum"])]
    args_rec = plan.launches[1].args[1]  # pre, the sm_90a kernel (its Sm90BwdArgs), post
    patched = [(idx, add) for view, idx, add in plan.slots["ws"]
               if view.ctypes.data == args_rec.ctypes.data]
    assert patched == [((640 + 16) // 8, 0)]


def test_precompile_enumerates_dtype_headdim_mask_bias():
    specs = [s for s in precompile.all_specs("sm_90") if s.family == "bwd_sm90"]
    assert len(specs) == 36 and all(s.arch == "sm_90a" and s.threads == 384 for s in specs)
    # mask: none, a mask, a MixedMask's listed bits (sparse: a mask spec reading the bits)
    assert {(s.dtype, s.head_dim, s.has_mask, s.sparse, s.has_bias, s.bias_key_row)
            for s in specs} == {
        (dt, hd, m, sp, b, r) for dt in ("fp16", "bf16") for hd in (64, 128)
        for m, sp in ((False, False), (True, False), (True, True))
        for b, r in ((False, False), (True, False), (True, True))}
    assert not any(s.deterministic for s in specs)  # a runtime field (Sm90BwdArgs::dq_sem)
    assert not [s for s in precompile.all_specs("sm_80") if s.family == "bwd_sm90"]


def _stub_runtime(monkeypatch, launched):
    monkeypatch.delenv("DMATTN_BWD_FAMILY", raising=False)
    monkeypatch.setattr(backward_sm90, "encode", lambda spec, ptr: bytes(128))
    monkeypatch.setattr(runtime, "device_props", lambda device: H100)
    monkeypatch.setattr(runtime, "current_stream", lambda kind, device: "stream")
    monkeypatch.setattr(runtime, "get_kernel", lambda spec, device: spec)
    monkeypatch.setattr(runtime, "launch", lambda kern, grid, args, stream: launched.append(
        (kern, grid, args)))


@pytest.mark.parametrize("switch", ["1", "0"], ids=["unshift", "portable"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("bias_shape", [(2, 4, 200, 1), (1, 1, 200, 1), (2, 2, 1, 1),
                                        (1, 1, 1, 1)])
def test_a_bias_constant_over_keys_gets_its_exact_gradient(monkeypatch, bias_shape,
                                                           deterministic, switch):
    """A bias with key dim 1 shifts whole softmax rows: without an incoming dlse its gradient
    is exactly 0 (a zero-filled array of the bias's shape and dtype, never a kernel's rounding
    noise), with one it is dlse where the row has an allowed key. No kernel writes dbias
    (dbias_mode 0). Under DMATTN_FWD_ROW_BIAS=1 (default) the Hopper kernel runs without the
    bias, on lse minus it (the pre kernel's, BwdParams.lse_shifted); under 0 the portable
    kernels read it (P needs it)."""
    monkeypatch.setenv("DMATTN_FWD_ROW_BIAS", switch)
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    q, k, v = _arrays()
    bias = np.full(bias_shape, 0.5, np.float16)
    pb = _pb(q, k, v, bias=bias)
    out, lse = np.zeros_like(q), np.zeros((2, 4, 200), np.float32)
    dq, dk, dv, dbias = backward.run_backward(pb, np.ones_like(q), q, k, v, out, lse,
                                              deterministic=deterministic)
    assert launched and all(x[2][0]["dbias_mode"] == 0 for x in launched)
    if switch == "1":
        assert [x[0].family for x in launched] == ["bwd_pre", "bwd_sm90", "bwd_post"]
        assert not any(x[0].has_bias for x in launched)
        rec = launched[0][2][0]   # the workspace's lse: past dq_accum and dsum
        dsum_at = -(-q.size // 64) * 64
        assert rec["lse_shifted"] == describe(lse).ptr
        assert rec["lse"] - rec["dq_accum"] == 4 * (-(-(dsum_at + lse.size) // 64) * 64)
    else:
        assert any(x[0].has_bias for x in launched)   # P is recomputed with the bias
        rec = launched[0][2][0]
        assert rec["lse_shifted"] == 0 and rec["lse"] == describe(lse).ptr
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype and not dbias.any()
    # with an incoming dlse the shift moves lse one for one in rows with an allowed key (lse
    # finite): dbias is dlse there, summed over what the bias broadcasts; still no kernel dbias
    launched.clear()
    lse[:, :, :10] = -np.inf   # rows with no allowed key
    dlse = np.random.default_rng(1).standard_normal(lse.shape).astype(np.float32)
    _, _, _, dbias = backward.run_backward(pb, np.ones_like(q), q, k, v, out, lse, dlse=dlse,
                                           deterministic=deterministic)
    assert launched and all(x[2][0]["dbias_mode"] == 0 for x in launched)
    want = np.where(np.isfinite(lse), dlse, 0).reshape(2, bias_shape[1], -1, 200)
    want = want.sum(tuple(a for a, n in ((0, bias_shape[0]), (3, bias_shape[2])) if n == 1)
                    + (2,), keepdims=True).reshape(bias_shape)
    assert dbias.shape == bias.shape and dbias.dtype == bias.dtype
    np.testing.assert_allclose(dbias, want.astype(np.float16), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("bias_shape", [None, (2, 4, 200, 264), (2, 4, 1, 264),
                                        (1, 4, 200, 264), (1, 1, 1, 264), (2, 2, 1, 264)])
def test_run_backward_launches_the_hopper_kernel(monkeypatch, bias_shape):
    """run_backward with the runtime stubbed and the default DMATTN_BWD_FAMILY: the
    preprocess, then bwd_sm90 over (key tiles of 128, kv heads, batch) with the BwdParams
    record and the Sm90BwdArgs record; dq comes from the fp32 accumulator and dbias has the
    bias's shape and dtype (a shared key row's partials float32)."""
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    q, k, v = _arrays()
    bias = None if bias_shape is None else np.zeros(bias_shape, np.float16)
    pb = _pb(q, k, v, bias=bias)
    out = np.zeros_like(q)
    lse = np.zeros((2, 4, 200), np.float32)
    before = backward.launches["bwd_sm90"]
    dq, dk, dv, dbias = backward.run_backward(pb, np.zeros_like(q), q, k, v, out, lse)
    assert backward.launches["bwd_sm90"] == before + 1
    assert [x[0].family for x in launched] == ["bwd_pre", "bwd_sm90", "bwd_post"]
    # the post kernel casts dq_accum into dq over the pre kernel's rows: same grid, same record
    assert launched[2][1] == launched[0][1]
    assert launched[2][2][0].tobytes() == launched[0][2][0].tobytes()
    spec, grid, args = launched[1]
    assert grid == (3, 2, 2) and len(args) == 2
    assert args[1].dtype == backward_sm90.ARGS_DTYPE
    assert args[0]["dbias_mode"] == (0 if bias is None else 1)
    assert args[0]["dqa_row_stride"] == 4 * 128  # the fp32 dQ accumulator (non-deterministic)
    assert (spec.has_bias, spec.head_dim, spec.dtype) == (bias is not None, 128, "fp16")
    # a key-row bias runs its own spec (no tile in the ring); the record says the same mode
    key_row = bias is not None and bias.shape[2] == 1
    assert spec.bias_key_row is key_row
    assert args[1]["bias_mode"] == (0 if bias is None else 2 if key_row else 1)
    # a key row shared by the batch or by head groups: float32 partials, one rounding at the
    # sum (a tile's partials, large, stay in the bias's dtype)
    assert args[0]["dbias_is_fp32"] == int(key_row and bias.shape[:2] != (2, 4))
    assert dq.shape == q.shape and dq.dtype == q.dtype and dk.shape == k.shape
    if bias is None:
        assert dbias is None
    else:
        assert dbias.shape == bias.shape and dbias.dtype == bias.dtype


def test_run_backward_keeps_the_portable_kernels_when_asked(monkeypatch):
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_dkdv")
    launched = []
    monkeypatch.setattr(runtime, "device_props", lambda device: H100)
    monkeypatch.setattr(runtime, "current_stream", lambda kind, device: "stream")
    monkeypatch.setattr(runtime, "get_kernel", lambda spec, device: spec)
    monkeypatch.setattr(runtime, "launch", lambda kern, grid, args, stream: launched.append(kern))
    q, k, v = _arrays()
    backward.run_backward(_pb(q, k, v), np.zeros_like(q), q, k, v, np.zeros_like(q),
                          np.zeros((2, 4, 200), np.float32))
    assert [s.family for s in launched] == ["bwd_pre", "bwd_dkdv", "bwd_post"]


@pytest.mark.parametrize("mask_shape", [None, (2, 4, 200, 264), (2, 4, 1, 264)])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_run_backward_mask_and_deterministic_workspace(monkeypatch, mask_shape, deterministic):
    """A mask runs the has_mask spec (the mask reaches the kernel through BwdParams); the
    deterministic mode launches no bwd_dq kernel, and its int32 counters (a ticket, then one
    per (batch, head, query tile of 64)) sit in the one workspace after dq_accum and dsum, at
    a 256-byte boundary, their address in Sm90BwdArgs::dq_sem (patched per call); that
    workspace is zero-filled (the default mode's is a scratch buffer with no fill)."""
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    q, k, v = _arrays()
    mask = None if mask_shape is None else np.ones(mask_shape, bool)
    pb = _pb(q, k, v, mask=mask)
    out = np.zeros_like(q)
    lse = np.zeros((2, 4, 200), np.float32)
    grads, plan = backward.backward_call(pb, np.zeros_like(q), q, k, v, out, lse,
                                         deterministic=deterministic)
    assert [x[0].family for x in launched] == ["bwd_pre", "bwd_sm90", "bwd_post"]
    spec, grid, args = launched[1]
    assert spec.has_mask == (mask is not None) and not spec.deterministic
    rec, sm90_args = args
    if mask is not None:
        assert rec["mask"] == describe(mask).ptr
    ws_alloc = [a for a in plan.allocs if a.name == "ws"]
    assert len(ws_alloc) == 1 and ws_alloc[0].dtype == "float32"
    assert ws_alloc[0].zero == deterministic and ws_alloc[0].scratch != deterministic
    assert not [a for a in plan.allocs if a.name == "dsum"]
    assert [(a.shape, a.dtype, a.zero) for a in plan.allocs if a.name == "dq"] == \
        [(q.shape, "float16", False)]   # written whole by the post kernel
    ws_ptr = int(rec["dq_accum"])
    n_dqa = 2 * 200 * 4 * 128
    dsum_at = -(-n_dqa // 64) * 64
    assert int(rec["dsum"]) == ws_ptr + 4 * dsum_at
    if not deterministic:
        assert int(sm90_args["dq_sem"]) == 0
        assert ws_alloc[0].shape == (dsum_at + 2 * 4 * 200,)
        return
    words = backward_sm90.semaphore_words(2, 4, 200)
    assert words == 1 + 2 * 4 * 4
    sem_at = -(-(dsum_at + 2 * 4 * 200) // 64) * 64
    assert ws_alloc[0].shape == (sem_at + words,)
    assert int(sm90_args["dq_sem"]) == ws_ptr + 4 * sem_at
    # the cached plan patches the counters' address from the call's workspace pointer
    args_rec = plan.launches[1].args[1]
    patched = [(idx, add) for view, idx, add in plan.slots["ws"]
               if view.ctypes.data == args_rec.ctypes.data]
    assert patched == [(backward_sm90.DQ_SEM_OFFSET // 8, 4 * sem_at)]
    dq, dk, dv, _ = grads
    assert dq.shape == q.shape and dq.dtype == q.dtype


def test_deterministic_portable_family_keeps_its_dq_kernel(monkeypatch):
    """Where the Hopper kernel does not run (DMATTN_BWD_FAMILY=bwd_dkdv), deterministic mode
    is the portable one: its dQ kernel, no workspace counters."""
    launched: list = []
    _stub_runtime(monkeypatch, launched)
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_dkdv")
    q, k, v = _arrays()
    backward.run_backward(_pb(q, k, v), np.zeros_like(q), q, k, v, np.zeros_like(q),
                          np.zeros((2, 4, 200), np.float32), deterministic=True)
    assert [x[0].family for x in launched] == ["bwd_pre", "bwd_dkdv", "bwd_dq"]
