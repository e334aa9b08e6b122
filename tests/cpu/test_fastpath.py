"""The thin launch path on the CPU, GPU stubbed (tools/host_profile.stub_gpu): CPU torch tensors
pose as CUDA device 0, launches are captured with the bytes of every kernel argument.

The property checked throughout: a call served by a cached plan launches the same kernels,
grids and argument bytes as the validated path would build for the same arrays, pointers
included; output and workspace pointers are those of the buffers the call returns or made."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import host_profile  # noqa: E402

import dmattn_cupy as dm  # noqa: E402
from dmattn_cupy import (  # noqa: E402
    api,
    backward_sm90,
    fastpath,
    forward_sm90,
    row_pad,
    runtime,
    scratch,
    sparse_plan,
    tensor_map,
)
from dmattn_cupy import compile as dcompile  # noqa: E402
from dmattn_cupy.families import FAMILIES  # noqa: E402
from dmattn_cupy.launch_plan import PlanCache  # noqa: E402
from dmattn_cupy.params import (  # noqa: E402
    FWD_DTYPE,
    KV_APPEND_DTYPE,
    MASK_LISTS_DTYPE,
    MASK_PACK_DTYPE,
    ROW_PAD_DTYPE,
    bwd_dtype_flat,
)

BWD_DTYPE = bwd_dtype_flat()
_PARAMS = {"FwdParams": FWD_DTYPE, "BwdParams": BWD_DTYPE, "KvAppendParams": KV_APPEND_DTYPE,
           "MaskPackParams": MASK_PACK_DTYPE, "MaskListsParams": MASK_LISTS_DTYPE,
           "RowPadParams": ROW_PAD_DTYPE}


def params_dtype(family: str) -> np.dtype:
    """The record dtype of a family's launches (its params struct in the family table)."""
    return _PARAMS[FAMILIES[family].params]
# the attn_mask route's launches (mask_pack.plan_lists): every pointer but the mask's is a
# buffer the call allocates, and so are the forward's list pointers after them
_MASK_ROUTE = ("mask_pack", "mask_lists")
_ROUTE_FRESH = ("words", "kept", "full_count", "full_idx", "partial_count", "partial_idx",
                "partial_slot")
_SPARSE_FIELDS = ("sp_full_count", "sp_full_idx", "sp_partial_count", "sp_partial_idx",
                  "sp_partial_slot", "sp_partial_bits")
# pointer fields that hold buffers a call allocates (fresh every call)
_FRESH = ("o", "lse", "o_accum", "lse_accum", "dsum", "dq_accum", "dq", "dk", "dv", "dbias")


class _Fn:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class Capture:
    """Installs capturing launch stubs inside ``stub_gpu``; ``launches`` collects
    (path, family, grid, [arg bytes]) for every launch. ``take`` moves the block lists' item
    order launches (fwd_order) into ``orders`` after checking that each one ranks what the
    fwd_sm90 launch right after it runs: same path, same params and args records."""

    def __init__(self) -> None:
        self.launches: list[tuple[str, str, tuple, list[bytes]]] = []
        self.specs: dict[int, object] = {}
        self.streams: list[int] = []     # the raw stream of every thin launch
        self.orders: list[tuple[str, str, tuple, list[bytes]]] = []
        # indices into ``launches`` of the programmatic ones; ``take`` moves them to
        # ``taken_programmatic`` (indices into what it returns where no fwd_order was dropped)
        self.programmatic: list[int] = []
        self.taken_programmatic: list[int] = []

    def _overlapped(self, family: str) -> bool:
        """A forward launched right behind the overlapped mask packing (mask_rows)."""
        return family == "fwd_sm90" and bool(self.launches) and \
            self.launches[-1][1] == "mask_rows"

    def get_kernel(self, spec, dev):
        ptr = 0x1000 + 16 * len(self.specs)
        for p, s in self.specs.items():
            if s == spec:
                ptr = p
        self.specs[ptr] = spec
        ck = dcompile.CompiledKernel(spec=spec, arch=spec.arch, cubin=b"", lowered_name="k",
                                     registers=64, spill_stores=0, spill_loads=0,
                                     stack_frame=0, static_smem=0, log="")
        return runtime.Kernel(spec, dev, _Fn(ptr), ck)

    def launch(self, kernel, grid, args, stream, shared_mem=None):
        # only the combine overlaps the kernel before it (sm_90 preset: launch_ex, programmatic)
        assert kernel.spec.family != "fwd_combine"
        smem = kernel.spec.dynamic_smem if shared_mem is None else shared_mem
        self.launches.append(("slow", kernel.spec.family, tuple(grid),
                              [a.tobytes() for a in args], smem))

    def launch_ex(self, kernel, grid, args, stream, shared_mem=None, cluster=None,
                  programmatic=False):
        assert cluster is None and programmatic
        assert kernel.spec.family == "fwd_combine" or self._overlapped(kernel.spec.family)
        self.programmatic.append(len(self.launches))
        smem = kernel.spec.dynamic_smem if shared_mem is None else shared_mem
        self.launches.append(("slow", kernel.spec.family, tuple(grid),
                              [a.tobytes() for a in args], smem))

    def launch_raw(self, device, fn, grid, block, smem, stream, params, config=None):
        spec = self.specs[fn]
        # only the combine and the forward behind the overlapped mask packing overlap the
        # kernel before them (sm_90 preset: programmatic launches)
        assert (config is not None) == (spec.family == "fwd_combine"
                                        or self._overlapped(spec.family)), spec.family
        if config is not None:
            self.programmatic.append(len(self.launches))
        sizes = [_PARAMS[spec.row.params].itemsize]
        if spec.family in ("fwd_sm90", "fwd_order"):   # the order kernel reads the same args
            sizes.append(forward_sm90.ARGS_DTYPE.itemsize)
        if spec.family == "bwd_sm90":
            sizes.append(backward_sm90.ARGS_DTYPE.itemsize)
        if spec.family == "mask_rows":
            sizes.append(_PARAMS["MaskListsParams"].itemsize)
        raw = [ctypes.string_at(ctypes.c_uint64.from_address(params + 8 * i).value, n)
               for i, n in enumerate(sizes)]
        assert block == (spec.threads, 1, 1)
        self.launches.append(("thin", spec.family, tuple(grid), raw, smem))
        self.streams.append(stream)

    def take(self):
        out, self.launches = self.launches, []
        self.taken_programmatic, self.programmatic = self.programmatic, []
        kept = []
        for i, x in enumerate(out):
            if x[1] != "fwd_order":
                kept.append(x)
                continue
            nxt = out[i + 1]
            assert nxt[1] == "fwd_sm90" and nxt[0] == x[0] and nxt[3][:2] == x[3][:2], (x, nxt)
            args = np.frombuffer(x[3][1], dtype=forward_sm90.ARGS_DTYPE)
            assert int(args["item_order"][0]) != 0
            self.orders.append(x)
        return kept


@pytest.fixture(autouse=True)
def _split_merge_by_rule():
    """Split decodes merged as decode.fused_combine's rule says (DMATTN_SPLIT_COMBINE=auto),
    whatever the default: at these tests' decode shapes, by the decode grid itself. (Not
    through ``monkeypatch``: an autouse fixture asking for it would set it up before ``cap``,
    so its undo would run after ``cap``'s teardown and put ``stub_gpu``'s stubs back.)"""
    saved = os.environ.get("DMATTN_SPLIT_COMBINE")
    os.environ["DMATTN_SPLIT_COMBINE"] = "auto"
    yield
    if saved is None:
        os.environ.pop("DMATTN_SPLIT_COMBINE", None)
    else:
        os.environ["DMATTN_SPLIT_COMBINE"] = saved


@pytest.fixture
def cap():
    c = Capture()
    with host_profile.stub_gpu():
        saved = {n: getattr(runtime, n) for n in ("get_kernel", "launch", "launch_ex",
                                                  "launch_raw")}
        for n in saved:
            setattr(runtime, n, getattr(c, n))
        fastpath.clear()
        try:
            yield c
        finally:
            for n, f in saved.items():
                setattr(runtime, n, f)
            fastpath.clear()


def _record(raw: bytes, family_params: str) -> np.ndarray:
    return np.frombuffer(raw, dtype=_PARAMS[family_params]).copy()


def _masked(launches, cap):
    """Launches with fresh-buffer pointer fields zeroed (comparable across calls)."""
    res = []
    routed = any(fam in _MASK_ROUTE for _, fam, *_ in launches)
    for _path, fam, grid, raws, smem in launches:
        rec = _record(raws[0], FAMILIES[fam].params)
        fresh = _FRESH + ((_ROUTE_FRESH + _SPARSE_FIELDS) if routed else ())
        for f in fresh:
            if f in rec.dtype.names:
                rec[f] = 0
        if fam in ("fwd_sm90", "fwd_order"):   # block lists' item order: a fresh buffer
            args = np.frombuffer(raws[1], dtype=forward_sm90.ARGS_DTYPE).copy()
            args["item_order"] = 0
            raws = [raws[0], args.tobytes(), *raws[2:]]
        fields = b"".join(rec[n][0].tobytes() for n in rec.dtype.names)  # no padding bytes
        res.append((fam, grid, smem, fields, tuple(raws[1:])))
    return res


def _fwd(launches):
    """The forward's launch: the first that is not the attn_mask route's."""
    return next(x for x in launches if x[1] not in _MASK_ROUTE)


def _rand(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _dense_case(name: str, seed: int):
    B, S, Sk, H, Hk, D = 2, 40, 48, 4, 2, 64
    q = _rand(B, S, H, D, seed=seed)
    k, v = _rand(B, Sk, Hk, D, seed=seed + 1), _rand(B, Sk, Hk, D, seed=seed + 2)
    kw = {}
    if name == "mask_bias":
        kw["attn_mask"] = torch.rand(B, 1, S, Sk) > 0.2
        kw["attn_bias"] = _rand(1, Hk, S, Sk, seed=seed + 3)
    elif name == "causal_window_softcap":
        kw.update(is_causal=True, window_size=(16, -1), softcap=30.0, softmax_scale=0.1)
    elif name.startswith("decode_split"):
        q = _rand(B, 1, H, D, seed=seed)
        k, v = _rand(B, 4096, Hk, D, seed=seed + 1), _rand(B, 4096, Hk, D, seed=seed + 2)
        kw["attn_bias"] = _rand(B, Hk, 1, 4096, seed=seed + 3)
    elif name == "fwd_mma_forced":
        kw["attn_bias"] = _rand(B, H, S, 1, seed=seed + 3)   # the Hopper family declines it
    return (q, k, v), kw


DENSE = ("dense", "mask_bias", "causal_window_softcap", "decode_split", "fwd_mma_forced")


@pytest.mark.parametrize("name", DENSE + ("decode_split_kernel",))
@pytest.mark.parametrize("lse", [False, True])
def test_thin_forward_launches_what_the_validated_path_builds(cap, name, lse, monkeypatch):
    if name == "decode_split_kernel":   # the partials merged by fwd_combine.cu's launch
        monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "kernel")
    args, kw = _dense_case(name, 0)
    dm.flash_dmattn_func(*args, return_lse=lse, **kw)
    first = cap.take()
    assert first and all(p == "slow" for p, *_ in first)
    res = dm.flash_dmattn_func(*args, return_lse=lse, **kw)
    again = cap.take()
    assert all(p == "thin" for p, *_ in again)
    assert _masked(again, cap) == _masked(first, cap)
    out = res[0] if lse else res
    rec = _record(_fwd(again)[3][0], "FwdParams")
    assert int(rec["q"][0]) == args[0].data_ptr() and int(rec["o"][0]) == out.data_ptr()
    if lse:
        assert int(rec["lse"][0]) == res[1].data_ptr()
    if name.startswith("decode_split"):   # fused (auto at this size): one launch, counters
        fused = name == "decode_split"
        assert rec["num_splits"][0] > 1 and rec["o_accum"][0] != 0
        assert [f for _, f, *_ in again] == ["fwd_decode"] + ([] if fused else ["fwd_combine"])
        assert (rec["split_counters"][0] != 0) == fused
    # same shapes, new data: the cached plan with the new pointers == a fresh validated build
    args2, kw2 = _dense_case(name, 10)
    dm.flash_dmattn_func(*args2, return_lse=lse, **kw2)
    thin2 = cap.take()
    assert all(p == "thin" for p, *_ in thin2)
    rec2 = _record(_fwd(thin2)[3][0], "FwdParams")
    assert int(rec2["q"][0]) == args2[0].data_ptr() and int(rec2["v"][0]) == args2[2].data_ptr()
    fastpath.clear()
    dm.flash_dmattn_func(*args2, return_lse=lse, **kw2)
    slow2 = cap.take()
    assert all(p == "slow" for p, *_ in slow2)
    a, b = _record(_fwd(thin2)[3][0], "FwdParams"), _record(_fwd(slow2)[3][0], "FwdParams")
    fresh = _FRESH + (_SPARSE_FIELDS if thin2[0][1] in _MASK_ROUTE else ())
    assert [n for n in a.dtype.names if a[n][0] != b[n][0] and n not in fresh] == []
    assert _masked(thin2, cap) == _masked(slow2, cap)


def test_hopper_family_maps_are_patched_not_reencoded(cap, monkeypatch):
    (q, k, v), _ = _dense_case("dense", 0)
    dm.flash_dmattn_func(q, k, v)
    first = cap.take()
    assert first[0][1] == "fwd_sm90" and len(first[0][3]) == 2
    calls = []
    real = tensor_map.encode
    monkeypatch.setattr(tensor_map, "encode", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(forward_sm90, "encode", lambda *a: calls.append(a) or real(*a))
    (q2, k2, v2), _ = _dense_case("dense", 5)
    dm.flash_dmattn_func(q2, k2, v2)
    thin = cap.take()
    assert calls == [] and thin[0][0] == "thin"
    maps = np.frombuffer(thin[0][3][1], dtype=np.uint8)
    for i, t in enumerate((q2, k2, v2)):    # the stub's encoder keeps the address at byte 8
        assert int.from_bytes(maps[128 * i + 8:128 * i + 16].tobytes(), "little") == \
            t.data_ptr()


def _scramble_maps(monkeypatch) -> None:
    """Tensor maps that store the address shifted: no plain uint64 to patch (re-encoded)."""
    def scrambled(spec, address):
        raw = bytearray(tensor_map.MAP_BYTES)
        raw[0:8] = (address >> 4).to_bytes(8, "little")
        raw[40:48] = hash(spec).to_bytes(8, "little", signed=True)
        return bytes(raw)

    monkeypatch.setattr(tensor_map, "encode", scrambled)
    monkeypatch.setattr(forward_sm90, "encode", scrambled)
    tensor_map.address_offset.cache_clear()


def test_unpatchable_maps_are_reencoded_per_pointer(cap, monkeypatch):
    _scramble_maps(monkeypatch)
    assert tensor_map.address_offset(tensor_map.TensorMapSpec(2, (64, 8), (128,), (64, 8),
                                                              128)) is None
    (q, k, v), _ = _dense_case("dense", 0)
    dm.flash_dmattn_func(q, k, v)
    cap.take()
    (q2, k2, v2), _ = _dense_case("dense", 7)
    dm.flash_dmattn_func(q2, k2, v2)
    thin = cap.take()
    fastpath.clear()
    dm.flash_dmattn_func(q2, k2, v2)
    slow = cap.take()
    assert thin[0][0] == "thin" and slow[0][0] == "slow"
    assert _masked(thin, cap) == _masked(slow, cap)
    tensor_map.address_offset.cache_clear()


def test_address_offset_probe_finds_a_plain_address():
    spec = tensor_map.TensorMapSpec(2, (64, 8), (128,), (64, 8), 128)

    def enc(s, address):
        raw = bytearray(128)
        raw[16:24] = address.to_bytes(8, "little")
        raw[100] = 7
        return bytes(raw)

    saved = tensor_map.encode
    tensor_map.encode = enc
    tensor_map.address_offset.cache_clear()
    try:
        assert tensor_map.address_offset(spec) == 16
    finally:
        tensor_map.encode = saved
        tensor_map.address_offset.cache_clear()


@pytest.mark.parametrize("case", ["plain", "bias_grad", "deterministic_bias", "gqa_causal"])
def test_thin_backward_launches_what_the_validated_path_builds(cap, case):
    B, S, H, Hk, D = 1, 40, 4, 4 if case != "gqa_causal" else 2, 64
    q = _rand(B, S, H, D, seed=1).requires_grad_()
    k, v = (_rand(B, S, Hk, D, seed=s).requires_grad_() for s in (2, 3))
    kw = {}
    if case in ("bias_grad", "deterministic_bias"):
        kw["attn_bias"] = _rand(1, H, S, S, seed=4).requires_grad_()
        kw["deterministic"] = case == "deterministic_bias"
    if case == "gqa_causal":
        kw["is_causal"] = True
    inputs = (q, k, v) + ((kw["attn_bias"],) if "attn_bias" in kw else ())
    dout = _rand(B, S, H, D, seed=5)

    def step():
        out = dm.flash_dmattn_func(q, k, v, **kw)
        assert out.grad_fn is not None and "Attention" in type(out.grad_fn).__name__
        grads = torch.autograd.grad(out, inputs, dout)
        return out, grads

    step()
    first = cap.take()
    assert all(p == "slow" for p, *_ in first)
    out, grads = step()
    again = cap.take()
    assert all(p == "thin" for p, *_ in again)
    fwd_first = [x for x in first if not x[1].startswith("bwd")]
    bwd_first = [x for x in first if x[1].startswith("bwd")]
    fwd_again = [x for x in again if not x[1].startswith("bwd")]
    bwd_again = [x for x in again if x[1].startswith("bwd")]
    assert _masked(fwd_again, cap) == _masked(fwd_first, cap)

    sem = slice(backward_sm90.DQ_SEM_OFFSET, backward_sm90.DQ_SEM_OFFSET + 8)
    dqa_at = 128 * backward_sm90.MAP_NAMES.index("dqa")
    dqa = slice(dqa_at, dqa_at + 128)

    def no_out_lse(launches):
        res = []
        for fam, grid, smem, raw, rest in _masked(launches, cap):
            rec = np.frombuffer(raw, dtype=BWD_DTYPE).copy()
            rec["o"] = 0
            rec["lse"] = 0
            if fam == "bwd_sm90":  # the deterministic counters and the dqa map (over
                args = bytearray(rest[0])  # dq_accum) follow the fresh workspace
                args[sem] = bytes(8)
                args[dqa] = bytes(dqa.stop - dqa.start)
                rest = (bytes(args),) + rest[1:]
            res.append((fam, grid, smem, rec.tobytes(), rest))
        return res

    assert bwd_again and no_out_lse(bwd_again) == no_out_lse(bwd_first)
    rec = _record(bwd_again[-1][3][0], "BwdParams")
    assert int(rec["o"][0]) == out.data_ptr() and int(rec["dout"][0]) == dout.data_ptr()
    assert int(rec["dk"][0]) == grads[1].data_ptr()
    hopper = any(x[1] == "bwd_sm90" for x in bwd_first)
    main = [[x for x in b if x[1] in ("bwd_sm90", "bwd_dkdv")][-1] for b in (bwd_first,
                                                                            bwd_again)]
    if not (kw.get("deterministic") and not hopper):   # dQ through the fp32 workspace:
        assert bwd_again[-1][1] == "bwd_post"            # cast into dq last, by the post kernel
        assert int(_record(bwd_again[-1][3][0], "BwdParams")["dq"][0]) == grads[0].data_ptr()
    for launch in main:
        r = _record(launch[3][0], "BwdParams")
        if kw.get("deterministic") and not hopper:  # the portable dQ kernel: no workspace
            assert int(r["dq_accum"][0]) == 0
            assert [x[1] for x in bwd_again] == ["bwd_pre", "bwd_dkdv", "bwd_dq"]
            continue
        # one workspace: dq_accum at its start, dsum at the next 256-byte boundary, and for
        # the Hopper kernel's deterministic mode its counters at the next one after dsum
        dsum_at = -(-q.numel() // 64) * 64
        assert int(r["dsum"][0]) - int(r["dq_accum"][0]) == 4 * dsum_at
        assert int(r["dq_accum"][0]) % 16 == 0
        if hopper:
            dq_sem = int(np.frombuffer(launch[3][1][sem], np.uint64)[0])
            sem_at = -(-(dsum_at + H * S) // 64) * 64
            want = int(r["dq_accum"][0]) + 4 * sem_at if kw.get("deterministic") else 0
            assert dq_sem == want
    assert grads[0].shape == q.shape and grads[0].dtype == q.dtype
    if "attn_bias" in kw:
        assert grads[3].shape == kw["attn_bias"].shape
        assert grads[3].dtype == kw["attn_bias"].dtype


def test_varlen_decode_key_bias_thin(cap):
    Sk, H, Hk, D = 4096, 32, 8, 64
    q = _rand(1, H, D, seed=1)
    k, v = _rand(Sk, Hk, D, seed=2), _rand(Sk, Hk, D, seed=3)
    bias = _rand(Sk, Hk, seed=4)
    cu_q = torch.tensor([0, 1], dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], dtype=torch.int32)
    dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk, attn_bias=bias)
    first = cap.take()
    out = dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk, attn_bias=bias)
    again = cap.take()
    assert [p for p, *_ in again] == ["thin"] * len(first) and first[0][1] == "fwd_decode"
    assert _masked(again, cap) == _masked(first, cap)
    rec = _record(again[0][3][0], "FwdParams")
    assert int(rec["cu_seqlens_k"][0]) == cu_k.data_ptr() and int(rec["o"][0]) == \
        out.data_ptr()
    # another max_seqlen_k is another plan
    dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk - 1, attn_bias=bias)
    assert cap.take()[0][0] == "slow"


def test_keys_tell_apart_strides_devices_env_and_options(cap, monkeypatch):
    (q, k, v), _ = _dense_case("dense", 0)
    dm.flash_dmattn_func(q, k, v)
    n = len(fastpath.forward_plans)
    dm.flash_dmattn_func(q.clone(), k.clone(), v.clone())      # new data: same plan
    assert len(fastpath.forward_plans) == n
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)        # same shape, other strides
    dm.flash_dmattn_func(qt, k, v)
    assert len(fastpath.forward_plans) == n + 1 and cap.take()[-1][0] == "slow"
    assert fastpath._tsig(q) != fastpath._tsig(q.to("meta"))   # device is in the key
    monkeypatch.setenv("DMATTN_FWD_FAMILY", "fwd_mma")         # env is in the key
    dm.flash_dmattn_func(q, k, v)
    last = cap.take()[-1]
    assert (last[0], last[1]) == ("slow", "fwd_mma")
    dm.flash_dmattn_func(q, k, v)
    assert cap.take()[-1][:2] == ("thin", "fwd_mma")
    monkeypatch.delenv("DMATTN_FWD_FAMILY")
    dm.flash_dmattn_func(q, k, v)
    assert cap.take()[-1][:2] == ("thin", "fwd_sm90")
    dm.flash_dmattn_func(q, k, v, is_causal=True)
    assert cap.take()[-1][0] == "slow"
    with pytest.raises(TypeError, match="is_causal"):          # 1 == True, but not a bool
        dm.flash_dmattn_func(q, k, v, is_causal=1)
    with pytest.raises(ValueError, match="head dim"):
        dm.flash_dmattn_func(q[..., :60], k[..., :60], v[..., :60])


def test_keys_tell_apart_shapes_and_dtypes(cap):
    (q, k, v), _ = _dense_case("dense", 0)
    dm.flash_dmattn_func(q, k, v)
    dm.flash_dmattn_func(q, k, v)
    assert [p for p, *_ in cap.take()] == ["slow", "thin"]
    for args in ((q[:, :-1], k, v),                                        # shape
                 (q.half(), k.half(), v.half()),                            # dtype
                 (q, k.half(), v)):                                         # one input's dtype
        try:
            dm.flash_dmattn_func(*args)
        except (TypeError, ValueError):   # mixed dtypes: refused, never served by a plan
            assert args[1].dtype != args[0].dtype
        assert all(p == "slow" for p, *_ in cap.take())
    out = dm.flash_dmattn_func(q[:, :-1], k, v)   # the new shape's own plan, new pointers
    again = cap.take()
    assert [p for p, *_ in again] == ["thin"] and out.shape == q[:, :-1].shape
    assert int(_record(again[0][3][0], "FwdParams")["o"][0]) == out.data_ptr()


def test_hits_launch_on_each_call_s_current_stream(cap, monkeypatch):
    """The stream is read per call, never bound into a cached plan (forward, decode with its
    scratch partials, backward)."""
    streams = iter(range(0x500, 0x600))
    current = [0]

    def stream_ptr(kind, dev):
        return current[0]

    monkeypatch.setattr(runtime, "stream_ptr", stream_ptr)
    (q, k, v), _ = _dense_case("dense", 0)
    decode = _decode_call()
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    for _ in range(2):   # first calls build the plans (validated path), then hits
        dm.flash_dmattn_func(q, k, v)
        decode()
        torch.autograd.grad(dm.flash_dmattn_func(qg, kg, vg), (qg, kg, vg), torch.ones_like(q))
    cap.take()
    cap.streams.clear()
    for _ in range(3):
        current[0] = next(streams)
        dm.flash_dmattn_func(q, k, v)
        decode()
        torch.autograd.grad(dm.flash_dmattn_func(qg, kg, vg), (qg, kg, vg), torch.ones_like(q))
        launched = cap.take()
        # forward 1, decode 1 (its splits merged by its own grid), backward 4
        assert {p for p, *_ in launched} == {"thin"} and len(launched) == 1 + 1 + 4
        assert cap.streams == [current[0]] * len(launched)
        cap.streams.clear()


def test_autograd_outputs_follow_return_lse(cap):
    """Without return_lse the autograd node has one output (lse only saved for the backward);
    with it, lse is an output whose gradient reaches the backward kernels as dlse."""
    q, k, v = (_rand(1, 40, 4, 64, seed=s).requires_grad_() for s in (1, 2, 3))
    dout, dlse = _rand(1, 40, 4, 64, seed=5), _rand(1, 4, 40, seed=6).float()
    for _ in range(2):
        out = dm.flash_dmattn_func(q, k, v)
        assert type(out.grad_fn).__name__ == "_AttentionBackward"
        torch.autograd.grad(out, (q, k, v), dout)
    cap.take()
    out = dm.flash_dmattn_func(q, k, v)
    torch.autograd.grad(out, (q, k, v), dout)
    fwd, *bwd = cap.take()
    assert fwd[0] == "thin" and [b[0] for b in bwd] == ["thin"] * 3
    rec = _record(bwd[-1][3][0], "BwdParams")
    assert int(rec["dlse"][0]) == 0
    assert int(rec["lse"][0]) == int(_record(fwd[3][0], "FwdParams")["lse"][0]) != 0
    for _ in range(3):
        out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
        assert type(out.grad_fn).__name__ == "_AttentionLseBackward" and lse.grad_fn is not None
        grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    launched = cap.take()
    assert [p for p, *_ in launched[-3:]] == ["thin"] * 3
    rec = _record(launched[-1][3][0], "BwdParams")
    assert int(rec["dlse"][0]) == dlse.data_ptr() and int(rec["dout"][0]) == dout.data_ptr()
    assert int(rec["lse"][0]) == lse.data_ptr() and grads[0].shape == q.shape
    # only lse takes a gradient: dout is zeros, the plan keyed by its signature
    out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
    torch.autograd.grad(lse, (q, k, v), dlse)
    rec = _record(cap.take()[-1][3][0], "BwdParams")
    assert int(rec["dlse"][0]) == dlse.data_ptr()


def test_misaligned_inputs_are_never_cached(cap, monkeypatch):
    from dmattn_cupy import arrays
    from dmattn_cupy.arrays import describe

    def copy(info, stream, like=None):   # the CuPy strided copy, on CPU tensors
        buf = torch.empty(info.shape, dtype=like.dtype)
        return buf, describe(buf)

    monkeypatch.setattr(arrays, "strided_copy", copy)
    (q, k, v), _ = _dense_case("dense", 0)
    buf = torch.empty(q.numel() + 1, dtype=q.dtype)
    qm = buf[1:].view(q.shape)   # 2-byte offset: rows not 16-byte aligned
    qm.copy_(q)
    key_count = len(fastpath.forward_plans)
    dm.flash_dmattn_func(qm, k, v)
    assert len(fastpath.forward_plans) == key_count + 1
    assert list(fastpath.forward_plans.values())[-1] is None
    dm.flash_dmattn_func(qm, k, v)
    assert [p for p, *_ in cap.take()] == ["slow", "slow"]


def test_plan_cache_is_a_bounded_lru():
    c = PlanCache(3)
    for i in range(5):
        c.put(i, i)
    assert len(c) == 3 and 0 not in c and 1 not in c
    assert c.get(2) == 2       # 2 becomes the most recent
    c.put(5, 5)
    assert 3 not in c and 2 in c and c.get(9, "x") == "x"
    assert c.values() == [4, 2, 5]   # least recently used first
    c.put(4, "again")          # a put refreshes the key's use
    assert c.values() == [2, 5, "again"]


def test_twin_outputs_only_where_empty_like_makes_the_plans_buffer():
    """A hit allocates an output with ``torch.empty_like(query)`` only where that is the plan's
    buffer: the query's shape and dtype, uninitialized, the query C-contiguous (the key fixes
    its strides for every hit)."""
    from dmattn_cupy.launch_plan import Alloc

    q = torch.empty(2, 8, 4, 16, dtype=torch.bfloat16)
    out = Alloc("out", (2, 8, 4, 16), None)
    assert fastpath._twin("torch", q, out)
    made = torch.empty_like(q)
    assert (made.shape, made.stride(), made.dtype) == (q.shape, q.stride(), q.dtype)
    assert fastpath._twin("torch", q, Alloc("out", (2, 8, 4, 16), "bfloat16"))
    other = torch.empty(2, 4, 8, 16, dtype=torch.bfloat16).transpose(1, 2)  # same shape
    assert not fastpath._twin("torch", other, out)
    assert not fastpath._twin("torch", q, Alloc("lse", (2, 4, 8), "float32"))
    assert not fastpath._twin("torch", q, Alloc("o", (2, 8, 4, 16), "float32"))
    assert not fastpath._twin("torch", q, Alloc("out", (2, 8, 4, 16), None, zero=True))
    assert not fastpath._twin("cupy", q, out)


@pytest.mark.parametrize("layout", ["c", "odd_unit_stride", "transposed"])
def test_thin_outputs_are_laid_out_as_the_validated_path_s(cap, layout):
    """A hit's out/lse (forward) and dq/dk/dv (backward) have the validated path's shape,
    strides, dtype and device, whichever allocation the runner took (``empty_like`` of a
    C-strided query, the generic allocator otherwise: a size-1 dim's odd stride, which
    ``is_contiguous`` accepts and ``empty_like`` keeps, must not pass). After helper-36's test
    on branch host7."""
    B, S, H, Hk, D = 1, 40, 4, 2, 64

    def make(seed):
        q = _rand(B, S, H, D, seed=seed)
        k, v = _rand(B, S, Hk, D, seed=seed + 1), _rand(B, S, Hk, D, seed=seed + 2)
        if layout == "odd_unit_stride":      # batch 1: its stride is free
            q = q.as_strided(q.shape, (8000,) + q.stride()[1:])   # rows stay 16-byte
            k = k.as_strided(k.shape, (6000,) + k.stride()[1:])   # aligned: cacheable
        elif layout == "transposed":
            q = q.transpose(1, 2).contiguous().transpose(1, 2)
        return q, k, v

    def lay(t):
        return (t.shape, t.stride(), t.dtype, t.device)

    q, k, v = make(0)
    out0, lse0 = dm.flash_dmattn_func(q, k, v, return_lse=True)
    qg, kg, vg = (x.detach().requires_grad_() for x in make(0))
    dout = _rand(B, S, H, D, seed=9)
    grads0 = torch.autograd.grad(dm.flash_dmattn_func(qg, kg, vg), (qg, kg, vg), dout)
    assert all(p == "slow" for p, *_ in cap.take())
    for seed in (10, 20):
        q, k, v = make(seed)
        out, lse = dm.flash_dmattn_func(q, k, v, return_lse=True)
        qg, kg, vg = (x.detach().requires_grad_() for x in make(seed))
        grads = torch.autograd.grad(dm.flash_dmattn_func(qg, kg, vg), (qg, kg, vg), dout)
        launches = cap.take()
        assert launches and all(p == "thin" for p, *_ in launches)
        assert lay(out) == lay(out0) and lay(lse) == lay(lse0)
        assert out.stride() == torch.empty(out.shape).stride()   # C strides, as validated
        assert [lay(g) for g in grads] == [lay(g) for g in grads0]
        assert out.data_ptr() not in (q.data_ptr(), out0.data_ptr())
    entry = next(e for e in fastpath.forward_plans.values() if e is not None and e.lse)
    kinds = [n for _, n, _ in entry.allocs]
    assert (kinds[0] == fastpath._TWIN) == (layout == "c")


def test_numpy_and_sparse_calls_take_the_validated_path(cap):
    q = np.zeros((1, 8, 2, 32), np.float32)
    assert fastpath.dense(q, q, q, None, None, None, False, (-1, -1), 0.0, False, False,
                          "auto") is fastpath.MISS
    (tq, tk, tv), _ = _dense_case("dense", 0)
    assert fastpath.dense(tq, tk, tv, None, None, None, False, [-1, -1], 0.0, False, False,
                          "auto") is fastpath.MISS




@pytest.mark.parametrize("mask,window,is_causal", [
    ("causal", (-1, -1), False), ("causal_window", (-1, -1), False), ("window", (5, -1), False),
    ("window_and_causal", (-1, -1), False), ("window", (-1, -1), True)])
def test_parametric_sparse_masks_take_the_thin_path(cap, mask, window, is_causal):
    """A causal/window/causal-window mask (or an ``&`` of them) folds into the window as the
    kernels see it anyway: the second call is a thin hit whose launch equals the window-only
    call's, the first call launches what the unfolded validated path builds."""
    (q, k, v), _ = _dense_case("dense", 0)
    sq, sk = q.shape[1], k.shape[1]
    m = {"causal": dm.CausalMask(sq, sk), "causal_window": dm.CausalWindowMask(9, sq, sk),
         "window": dm.WindowMask((7, 3), sq, sk),
         "window_and_causal": dm.WindowMask(6, sq, sk) & dm.CausalMask(sq, sk)}[mask]
    win = {"causal": (-1, 0), "causal_window": (8, 0), "window": (7, 3),
           "window_and_causal": (5, 0)}[mask]
    want = (sparse_plan.bound_min(window[0], win[0]), sparse_plan.bound_min(window[1], win[1]))
    kw = {"window_size": window, "is_causal": is_causal}
    unfolded = sparse_plan.split_sparse(m)
    assert unfolded == (win, None)
    dm.flash_dmattn_func(q, k, v, sparse_mask=m, **kw)
    first = cap.take()
    assert [x[0] for x in first] == ["slow"]
    dm.flash_dmattn_func(q, k, v, sparse_mask=m, **kw)
    again = cap.take()
    assert [x[0] for x in again] == ["thin"]
    rec = _record(again[0][3][0], "FwdParams")
    right = want[1] if not is_causal else (0 if want[1] < 0 else min(want[1], 0))
    assert (int(rec["window_left"][0]), int(rec["window_right"][0])) == (want[0], right)
    fastpath.clear()   # the same call without the mask, validated: the same launch
    dm.flash_dmattn_func(q, k, v, window_size=want, is_causal=is_causal)
    assert _masked(cap.take(), cap) == _masked(first, cap) == _masked(again, cap)


def test_block_masks_and_mismatched_parametric_masks_are_not_folded(cap):
    """Only parametric masks fold; one for other sequence lengths still meets the validated
    path's error, as does an invalid window_size next to a parametric mask."""
    (q, k, v), _ = _dense_case("dense", 0)
    sq, sk = q.shape[1], k.shape[1]
    with pytest.raises(ValueError, match=r"sparse_mask is for \(seqlen_q, seqlen_k\)"):
        dm.flash_dmattn_func(q, k, v, sparse_mask=dm.CausalMask(sq + 1, sk))
    with pytest.raises(ValueError, match="window_size entries must be >= -1"):
        dm.flash_dmattn_func(q, k, v, sparse_mask=dm.CausalMask(sq, sk), window_size=(-2, 0))
    bits = np.ones((1, 1, 1, 1), bool)
    block = dm.BlockBitsetMask(bits, sq, sk, block_size=(128, 128))
    assert api._fold_parametric(block, q, k, (-1, -1)) == ((-1, -1), block)
    causal = dm.CausalMask(sq, sk)
    assert api._fold_parametric(causal, q, k, [-1, -1]) == ([-1, -1], causal)
    assert api._fold_parametric(causal, q, k, (-1, -1)) == ((-1, 0), None)


@pytest.mark.parametrize("varlen", [False, True])
def test_functional_backward_is_cached(cap, monkeypatch, varlen):
    """flash_dmattn_backward / _varlen_backward: the second call with a signature launches
    the validated path's bytes from the cached plan; a cast dout is never cached. On the
    portable kernels, whose records hold every pointer a plan patches (the (2, H, 25, 25)
    bias would otherwise take bwd_sm90 from a per-call padded copy, its maps over fresh
    buffers: test_bwd_bias_row_padding.py)."""
    monkeypatch.setenv("DMATTN_BWD_FAMILY", "bwd_dkdv")
    H, D = 4, 64
    if varlen:
        q, k, v = (_rand(50, H, D, seed=s) for s in (1, 2, 3))
        cu = torch.tensor([0, 20, 50], dtype=torch.int32)
        lse = torch.zeros(H, 50)
        extra = (cu, cu, 30, 30)
        fn = dm.flash_dmattn_varlen_backward
    else:
        q, k, v = (_rand(2, 25, H, D, seed=s) for s in (1, 2, 3))
        lse = torch.zeros(2, H, 25)
        extra = ()
        fn = dm.flash_dmattn_backward
    out, dout = _rand(*q.shape, seed=4), _rand(*q.shape, seed=5)
    bias = _rand(*((50, H) if varlen else (2, H, 25, 25)), seed=6)
    fn(dout, q, k, v, out, lse, *extra, attn_bias=bias, is_causal=True)
    first = cap.take()
    dq, dk, dv, db = fn(dout, q, k, v, out, lse, *extra, attn_bias=bias, is_causal=True)
    again = cap.take()
    assert [p for p, *_ in first] == ["slow"] * len(first)
    assert [p for p, *_ in again] == ["thin"] * len(first)
    assert _masked(again, cap) == _masked(first, cap)
    rec = _record(again[-1][3][0], "BwdParams")
    assert int(rec["dk"][0]) == dk.data_ptr() and int(rec["dout"][0]) == dout.data_ptr()
    assert db.shape == bias.shape and dq.dtype == q.dtype
    fn(dout.float(), q, k, v, out, lse, *extra, attn_bias=bias, is_causal=True)
    fn(dout.float(), q, k, v, out, lse, *extra, attn_bias=bias, is_causal=True)
    assert {p for p, *_ in cap.take()} == {"slow"}


# --- reused workspaces (dmattn_cupy.scratch) ---------------------------------------------

def _decode_call(seed=0):
    Sk, H, Hk, D = 4096, 32, 8, 64
    q = _rand(1, H, D, seed=seed)
    k, v = _rand(Sk, Hk, D, seed=seed + 1), _rand(Sk, Hk, D, seed=seed + 2)
    bias = _rand(Sk, Hk, seed=seed + 3)
    cu_q = torch.tensor([0, 1], dtype=torch.int32)
    cu_k = torch.tensor([0, Sk], dtype=torch.int32)
    return lambda: dm.flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, 1, Sk, attn_bias=bias)


def _call_capturing(call):
    """``call()`` with every stream reading as capturing a CUDA graph."""
    runtime.stream_capturing, saved = (lambda stream: True), runtime.stream_capturing
    try:
        call()
    finally:
        runtime.stream_capturing = saved


def _kept_pointers():
    return {buf.data_ptr() for _, buf in scratch._bufs.values()}


def test_decode_partials_reuse_one_scratch_buffer(cap):
    call = _decode_call()
    call()
    first = cap.take()
    assert first[0][0] == "slow" and not scratch._bufs   # the validated call allocates its own
    call()
    call()
    thin = [_record(x[3][0], "FwdParams") for x in cap.take() if x[1] == "fwd_decode"]
    assert len(thin) == 2
    assert len(scratch._bufs) == 1
    (nbytes, buf), = scratch._bufs.values()
    for rec in thin:   # the partials (o_accum) and their lse after them, in the kept buffer
        assert int(rec["o_accum"][0]) == buf.data_ptr()
        assert int(rec["lse_accum"][0]) - int(rec["o_accum"][0]) == \
            int(rec["num_splits"][0]) * 32 * 64 * 4
    assert nbytes >= 4 * int(thin[0]["num_splits"][0]) * 32 * 65
    # a capturing stream never gets the kept buffer: a fresh one, nothing kept changes
    kept = dict(scratch._bufs)
    _call_capturing(call)
    rec = _record(cap.take()[0][3][0], "FwdParams")
    assert int(rec["o_accum"][0]) not in _kept_pointers() and scratch._bufs == kept


def test_decode_merges_its_splits_with_kept_counters(cap, monkeypatch):
    """A split decode whose partials are few merges them in its own grid: one launch, its
    counters (one zero int32 per (sequence, kv head, row slab)) one kept zero-filled buffer
    per stream that the validated and the cached calls share; a capturing stream gets a fresh
    zero-filled one, kept nowhere. With DMATTN_SPLIT_COMBINE=kernel: the combine launch, no
    counters."""
    scratch.clear()
    call = _decode_call()
    for path in ("slow", "thin", "thin"):
        call()
        (p, fam, grid, args, _), = cap.take()
        rec = _record(args[0], "FwdParams")
        assert (p, fam) == (path, "fwd_decode") and rec["num_splits"][0] > 1
        groups = grid[0] // int(rec["num_splits"][0]) * grid[1] * grid[2]
        assert groups == 8   # 1 sequence x 8 kv heads x 1 slab (32 heads / 8: 4 rows)
        (key, buf), = scratch._counters.items()
        assert key[0] == ("torch", 0, groups, "split_counters") and buf.dtype == torch.int32
        assert buf.shape == (groups,) and not buf.any()
        assert int(rec["split_counters"][0]) == buf.data_ptr()
    kept = dict(scratch._counters)
    _call_capturing(call)
    rec = _record(cap.take()[0][3][0], "FwdParams")
    assert int(rec["split_counters"][0]) not in {b.data_ptr() for b in kept.values()}
    assert scratch._counters == kept
    monkeypatch.setenv("DMATTN_SPLIT_COMBINE", "kernel")
    for path in ("slow", "thin"):
        call()
        got = cap.take()
        assert [(p, f) for p, f, *_ in got] == [(path, "fwd_decode"), (path, "fwd_combine")]
        assert int(_record(got[0][3][0], "FwdParams")["split_counters"][0]) == 0


def test_scratch_is_per_thread_and_bounded(cap, monkeypatch):
    import threading

    call = _decode_call()
    call()
    call()
    cap.take()
    got = []

    def other():
        call()
        got.append(_record([x for x in cap.launches if x[1] == "fwd_decode"][-1][3][0],
                           "FwdParams"))

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert len(scratch._bufs) == 2    # one per calling thread
    assert int(got[0]["o_accum"][0]) in _kept_pointers()
    monkeypatch.setattr(scratch, "MAX_BYTES", 1024)   # too large to keep: per call
    cap.take()
    call()
    rec = _record(cap.take()[0][3][0], "FwdParams")
    assert int(rec["o_accum"][0]) not in _kept_pointers()
    scratch.clear()
    for i in range(scratch.MAX_BUFFERS + 3):
        scratch.get(("torch", 0), 100 + i, 16, lambda n: torch.empty(n // 4))
    assert len(scratch._bufs) == scratch.MAX_BUFFERS


def test_backward_workspace_is_scratch_without_a_fill(cap):
    """The backward's dq_accum + dsum workspace: no zero fill anywhere (the pre kernel zeroes
    dq_accum), the validated call's own buffer, then the kept buffer on cached calls."""
    from dmattn_cupy import arrays

    fills = []
    real = arrays.zeros

    def zeros(like, shape, dtype):
        fills.append(shape)
        return real(like, shape, dtype)

    arrays.zeros = zeros
    try:
        q, k, v = (_rand(1, 40, 4, 64, seed=s).requires_grad_() for s in (1, 2, 3))
        dout = _rand(1, 40, 4, 64, seed=5)
        for i in range(3):
            torch.autograd.grad(dm.flash_dmattn_func(q, k, v), (q, k, v), dout)
            assert len(scratch._bufs) == min(i, 1)   # validated first: its own buffer
    finally:
        arrays.zeros = real
    launches = cap.take()
    bwd = [_record(x[3][0], "BwdParams") for x in launches if x[1].startswith("bwd")]
    assert fills == [] and len(bwd) == 9     # pre + dK/dV + post, three times
    ws = [int(r["dq_accum"][0]) for r in bwd]
    assert ws[3] in _kept_pointers() and ws[3] == ws[6] == ws[8]
    assert launches[1][1] == "bwd_pre"       # the kernel that zeroes dq_accum runs first
    assert launches[3][1] == "bwd_post"      # and the one that reads it into dq last


# --- the dynamic scheduler's counter (DM_SM90_PERSISTENT=2, dmattn_cupy.scratch.counter) ----

def _counter_ptr(launch) -> int:
    """The item_counter pointer of a captured fwd_sm90 launch's Sm90FwdArgs."""
    raw = launch[3][1]
    return int(np.frombuffer(raw, dtype=forward_sm90.ARGS_DTYPE)["item_counter"][0])


def _counter_fills(monkeypatch) -> list:
    """Records every zero-filled int32 (1,) allocation (the counters made)."""
    from dmattn_cupy import arrays

    made = []
    real = arrays.allocator

    def allocator(like, shape, dtype, zero=False):
        fn = real(like, shape, dtype, zero)
        if dtype == "int32" and zero:
            return lambda: made.append(shape) or fn()
        return fn

    monkeypatch.setattr(arrays, "allocator", allocator)
    return made


@pytest.mark.parametrize("unpatchable", [False, True], ids=["patched_maps", "rebuilt_maps"])
def test_dynamic_schedule_launches_carry_one_kept_counter(cap, monkeypatch, unpatchable):
    """Validated and cached calls put the same kept, once zero-filled counter into
    Sm90FwdArgs.item_counter (also when the maps are rebuilt per call: the rebuild comes before
    the pointer patches); the other schedules carry none."""
    if unpatchable:
        _scramble_maps(monkeypatch)
    made = _counter_fills(monkeypatch)
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "0")   # the mask's own spec (block lists: an order)
    monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=2")
    try:
        for name in ("dense", "mask_bias"):
            for seed in (0, 3, 6):
                args, kw = _dense_case(name, seed)
                dm.flash_dmattn_func(*args, **kw)
        launches = cap.take()
        assert [x[0] for x in launches] == ["slow", "thin", "thin"] * 2
        assert all(x[1] == "fwd_sm90" for x in launches)
        assert len(scratch._counters) == 1 and len(made) == 1
        kept, = scratch._counters.values()
        assert kept.dtype == torch.int32 and kept.shape == (1,) and int(kept[0]) == 0
        assert {_counter_ptr(x) for x in launches} == {kept.data_ptr()}
        # the grid: min(items, SMs) CTAs; items = ceil(40 / 128) * 4 heads * 2 batches
        assert {x[2] for x in launches} == {(8, 1, 1)}
        # a capturing stream gets a fresh zero-filled counter; the kept one stays
        runtime.stream_capturing, saved = (lambda stream: True), runtime.stream_capturing
        try:
            dm.flash_dmattn_func(*_dense_case("dense", 9)[0])
        finally:
            runtime.stream_capturing = saved
        fresh = _counter_ptr(cap.take()[0])
        assert fresh not in (0, kept.data_ptr()) and len(made) == 2
        assert list(scratch._counters.values()) == [kept]
        monkeypatch.setenv("DMATTN_NVRTC_DEFINES", "DM_SM90_PERSISTENT=1")
        dm.flash_dmattn_func(*_dense_case("dense", 0)[0])
        static = cap.take()[0]
        assert _counter_ptr(static) == 0 and len(made) == 2
    finally:
        tensor_map.address_offset.cache_clear()


def test_counter_alloc_rules():
    from dmattn_cupy.launch_plan import Alloc

    Alloc("c", (1,), "int32", counter=True)
    for bad in (dict(dtype="float32"), dict(shape=(1, 1)), dict(scratch=True)):
        kw = dict(name="c", shape=(1,), dtype="int32", counter=True) | bad
        if bad.get("scratch"):
            kw["dtype"] = "float32"
        with pytest.raises(ValueError, match="workspace is a 1-D"):
            Alloc(**kw)


@pytest.mark.parametrize("layout", ["odd_mask", "misaligned_bias", "strided_mask"])
def test_padded_mask_bias_rows_are_cached_with_their_copy(cap, monkeypatch, layout):
    """A mask/bias copied into 16-byte rows for the Hopper family (forward.operands_to_pad):
    with equally spaced rows a repeated call takes the thin path, which repeats the pitched
    copy (RowCopy: the call's operand into a buffer it allocates) before the launch, whose
    FwdParams and tensor map point at that buffer; the launch equals a fresh validated build
    but for that buffer's address. Rows that are not equally spaced (keys 2 apart) are copied
    element by element and never cached."""
    copies = []
    monkeypatch.setattr(row_pad, "copy_rows", lambda *a: copies.append(a))
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "0")   # the mask's bytes in tiles: padded rows
    B, S, H, D = 2, 201, 4, 64
    q, k, v = (_rand(B, S, H, D, seed=i) for i in range(3))
    g = torch.Generator().manual_seed(3)
    mask = bias = None
    if layout == "odd_mask":
        mask = torch.rand(B, 1, S, S, generator=g) > 0.2
    elif layout == "misaligned_bias":
        bias = _rand(B, H, S, S + 1, seed=4)[..., 1:]            # rows 2 bytes off 16
    else:
        mask = (torch.rand(B, 1, S, 2 * S, generator=g) > 0.2)[..., ::2]
    name = "mask" if mask is not None else "bias"
    operand = mask if mask is not None else bias
    dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    first = cap.take()
    assert [(p, f) for p, f, *_ in first] == [("slow", "fwd_sm90")]
    rec = _record(first[0][3][0], "FwdParams")
    assert int(rec[name][0]) not in (0, operand.data_ptr())      # the padded copy
    # equally spaced rows: one row_pad launch (element by element otherwise)
    assert len(copies) == (0 if layout == "strided_mask" else 1)
    if copies:
        assert copies[0][1] == int(rec[name][0])
    dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    again = cap.take()
    if layout == "strided_mask":
        assert [p for p, *_ in again] == ["slow"] and copies == []
        return
    assert [p for p, *_ in again] == ["thin"] and len(copies) == 2
    dev, dst, dst_pitch, src, src_pitch, width, rows, _stream = copies[1]
    item = operand.element_size()
    assert src == operand.data_ptr() and width == S * item and dst_pitch % 16 == 0
    assert src_pitch == operand.stride(-2) * item and dst_pitch >= width
    assert rows == operand.numel() // S
    rec = _record(again[0][3][0], "FwdParams")
    assert int(rec[name][0]) == dst                               # the call's own buffer
    maps = np.frombuffer(again[0][3][1], dtype=np.uint8)
    at = 128 * forward_sm90.MAP_NAMES.index(name)                 # the stub keeps it at 8
    assert int.from_bytes(maps[at + 8:at + 16].tobytes(), "little") == dst
    fastpath.clear()
    dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=bias)
    slow = cap.take()
    a, b = _record(again[0][3][0], "FwdParams"), _record(slow[0][3][0], "FwdParams")
    assert [n for n in a.dtype.names if a[n][0] != b[n][0] and n not in _FRESH + (name,)] == []


@pytest.mark.parametrize("name", ["mask_bias", "mask_bias_route", "decode_split"])
def test_custom_op_forward_reuses_its_plan(cap, name, monkeypatch):
    """The ops torch.compile traces (``autograd``) run their forward through the thin path: a
    repeated signature (every call of a compiled graph) launches its cached plan, byte for
    byte what the validated path builds (also with the attn_mask route's two launches)."""
    from dmattn_cupy import autograd

    route = name == "mask_bias_route"
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "1" if route else "0")
    name = "mask_bias" if route else name
    (q, k, v), kw = _dense_case(name, 0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        return autograd.dense(q, k, v, kw.get("attn_mask"), kw.get("attn_bias"), None, False,
                              (-1, -1), 0.0, None, False, False, "auto")

    step()
    first = cap.take()
    out = step()
    again = cap.take()
    assert [p for p, *_ in first] == ["slow"] * len(first)
    assert [p for p, *_ in again] == ["thin"] * len(first)
    routed = [f for _, f, *_ in again if f in _MASK_ROUTE]
    assert routed == (list(_MASK_ROUTE) if route else [])
    assert _masked(again, cap) == _masked(first, cap)
    assert int(_record(_fwd(again)[3][0], "FwdParams")["o"][0]) == out.data_ptr()


def test_mask_route_thin_calls_wire_their_own_buffers(cap, monkeypatch):
    """The attn_mask route (mask_pack.plan_lists): validated and cached calls launch the
    packing, the lists and the forward; in each call the packing reads that call's mask, and
    the forward reads the lists and bits the two launches before it wrote (the same fresh
    buffers, all distinct)."""
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "1")
    for seed, path in ((0, "slow"), (10, "thin"), (20, "thin")):
        (q, k, v), kw = _dense_case("mask_bias", seed)
        dm.flash_dmattn_func(q, k, v, **kw)
        launches = cap.take()
        assert [(p, f) for p, f, *_ in launches] == [(path, "mask_pack"), (path, "mask_lists"),
                                                     (path, "fwd_sm90")]
        pack = _record(launches[0][3][0], "MaskPackParams")
        lists = _record(launches[1][3][0], "MaskListsParams")
        assert int(pack["mask"][0]) == kw["attn_mask"].data_ptr()
        assert int(lists["kept"][0]) == int(pack["kept"][0]) != 0   # the packing's counts
        fwd = _record(launches[2][3][0], "FwdParams")
        assert int(fwd["mask"][0]) == 0                       # the forward reads the lists
        for sp in _SPARSE_FIELDS:
            src = pack["words"] if sp == "sp_partial_bits" else lists[sp[3:]]
            assert int(fwd[sp][0]) == int(src[0]) != 0, sp
        ptrs = [int(fwd[f][0]) for f in _SPARSE_FIELDS] + [int(pack["kept"][0])]
        assert len(set(ptrs)) == len(ptrs)
        # mask (2, 1, 40, 48): one 128 x 128 block per (batch, row); lists per (batch, row)
        assert launches[0][2] == (1, 1, 2) and launches[1][2] == (1, 1, 1)


def test_overlap_route_launches_the_forward_behind_its_packing(cap, monkeypatch):
    """DMATTN_MASK_ROUTE=overlap with a mask of its own per (batch, head): validated and cached
    calls launch the overlapped packing (mask_rows: one small grid, its counts in dynamic
    shared memory) and then the forward, programmatically and with no ranking launch. Both
    carry one kept counter buffer of a zero word per block row (named apart from the forward's
    item counter), the packing reads each call's mask and the forward the lists it writes; a
    cached call's records equal the validated call's but for the buffers a call allocates."""
    monkeypatch.setenv("DMATTN_MASK_ROUTE", "overlap")
    readies = set()
    for seed, path in ((0, "slow"), (10, "thin"), (20, "thin")):
        (q, k, v), kw = _dense_case("mask_bias", seed)
        mask = torch.rand(2, 4, 40, 48, generator=torch.Generator().manual_seed(seed)) > 0.2
        dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=kw["attn_bias"])
        launches = cap.take()
        assert [(p, f) for p, f, *_ in launches] == [(path, "mask_rows"), (path, "fwd_sm90")]
        assert cap.taken_programmatic == [1] and not cap.orders
        raws, smem = launches[0][3], launches[0][4]
        pack, lists = _record(raws[0], "MaskPackParams"), _record(raws[1], "MaskListsParams")
        assert int(pack["mask"][0]) == mask.data_ptr() and int(pack["vec"][0]) == 2
        rows = int(lists["rows"][0])
        assert rows == 2 * 4 * 1 and launches[0][2] == (rows, 1, 1) and smem == 4 * 1
        fwd = _record(launches[1][3][0], "FwdParams")
        args = np.frombuffer(launches[1][3][1], dtype=forward_sm90.ARGS_DTYPE)
        ready = int(lists["ready"][0])
        assert ready == int(args["row_ready"][0]) != 0 and int(args["item_order"][0]) == 0
        assert ready != int(args["item_counter"][0]) != 0
        for sp in _SPARSE_FIELDS:
            src = pack["words"] if sp == "sp_partial_bits" else lists[sp[3:]]
            assert int(fwd[sp][0]) == int(src[0]) != 0, sp
        readies.add(ready)
    assert len(readies) == 1
    # the same call again (cached): byte for byte the validated call's records but for the
    # buffers every call allocates
    dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=kw["attn_bias"])
    again = cap.take()
    fastpath.clear()
    dm.flash_dmattn_func(q, k, v, attn_mask=mask, attn_bias=kw["attn_bias"])
    slow = cap.take()
    assert [p for p, *_ in again] == ["thin"] * 2 and [p for p, *_ in slow] == ["slow"] * 2

    def fields(launches):
        res = []
        for (_, fam, grid, raws, smem), dts in zip(launches, (
                ("MaskPackParams", "MaskListsParams"), ("FwdParams",)), strict=True):
            recs = [_record(raw, name) for raw, name in zip(raws, dts, strict=False)]
            for rec in recs:
                for f in _FRESH + _ROUTE_FRESH + _SPARSE_FIELDS:
                    if f in rec.dtype.names:
                        rec[f] = 0
            res.append((fam, grid, smem,   # field by field: a copy's padding is undefined
                        [b"".join(r[n][0].tobytes() for n in r.dtype.names) for r in recs],
                        raws[len(dts):]))
        return res

    assert fields(again) == fields(slow)
    (buf,) = [b for key, b in scratch._counters.items() if key[0][-1] == "mask_ready"]
    assert buf.data_ptr() in readies and buf.shape == (8,) and not buf.any()
    # a mask shared by the heads: the two packing launches, the forward launched plainly
    (q, k, v), kw = _dense_case("mask_bias", 30)
    dm.flash_dmattn_func(q, k, v, **kw)
    launches = cap.take()
    assert [f for _, f, *_ in launches] == ["mask_pack", "mask_lists", "fwd_sm90"]
    assert cap.taken_programmatic == []
    args = np.frombuffer(launches[2][3][1], dtype=forward_sm90.ARGS_DTYPE)
    assert int(args["row_ready"][0]) == 0
