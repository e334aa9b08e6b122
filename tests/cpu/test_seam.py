"""The kernel-family seam without a GPU: family selection per compute capability, a family
added as one table row (selected and compiled for its arch), the cache key seeing a header
edit, ptxas advisories, per-SM limits read off the device properties."""

from __future__ import annotations

import dataclasses
import shutil
import textwrap

import pytest

from dmattn_cupy import decode, families, precompile, select
from dmattn_cupy.compile import CompiledKernel, parse_advisories
from dmattn_cupy.device import PRESETS, DeviceProps, parse_arch
from dmattn_cupy.spec import KernelSpec

H100, A100, RTX3090, L40 = PRESETS["sm_90"], PRESETS["sm_80"], PRESETS["sm_86"], PRESETS["sm_89"]

# A test-only Hopper family: one source file and one row (the shape of the lead's fwd_sm90:
# FwdParams plus a 64-byte aligned struct of four 128-byte tensor maps, 3 warpgroups).
TEST_KERNEL = textwrap.dedent("""\
    #pragma once
    #include "params.cuh"
    namespace dm {
    struct alignas(64) TestMaps { unsigned char bytes[4][128]; };
    template <typename T, int kHeadDim, int kBlockN, int kStages, bool kHasMask, bool kHasBias>
    __global__ void __launch_bounds__(384, 1)
    test_fwd_sm90_kernel(const FwdParams p, const __grid_constant__ TestMaps maps) {
      if (threadIdx.x == 0 && p.batch < 0) { ((unsigned char*)p.o)[0] = maps.bytes[0][0]; }
    }
    }  // namespace dm
    """)


def _dense_only(pb, dev, sparse):
    return not (pb.varlen or sparse)


def _tiles(pb, sparse):
    """One tile per head dim, at this family's own head dims (64, 128, 256)."""
    hd = next(d for d in (64, 128, 256) if pb.head_dim <= d)
    return (families.Tile(128, 128 if hd <= 128 else 64, 12, stages=2, head_dim=hd),)


TEST_ROW = families.Family(
    "test_sm90", "sm90/test_fwd.cu", "dm::test_fwd_sm90_kernel",
    ("dtype", "head_dim", "block_n", "stages", "has_mask", "has_bias"),
    "FwdParams", "sm_90a", smem=lambda s: 64 * 1024, threads=lambda s: 384, role="forward",
    accepts=_dense_only, tiles=_tiles)


@pytest.fixture
def test_family(monkeypatch):
    """The test row in place of the real Hopper forward (both are sm_90a forward rows)."""
    monkeypatch.delitem(families.FAMILIES, "fwd_sm90")
    monkeypatch.setitem(families.FAMILIES, TEST_ROW.name, TEST_ROW)
    return TEST_ROW


def _pb(varlen=False, mask=True, bias=True, hd=128):
    return precompile.stub_problem("bf16", hd, mask, bias, varlen)


@pytest.mark.parametrize("dev,arch", [(A100, "sm_80"), (RTX3090, "sm_86"), (L40, "sm_89"),
                                      (H100, "sm_90")], ids=["sm80", "sm86", "sm89", "sm90"])
def test_portable_family_builds_for_the_device(dev: DeviceProps, arch: str) -> None:
    spec = select.forward(_pb(varlen=True), dev)  # varlen: no sm_90a row takes it
    assert (spec.family, spec.arch) == ("fwd_mma", arch)
    assert spec.dynamic_smem <= dev.smem_per_block


def test_hopper_row_is_selected_on_cc90_only(test_family) -> None:
    spec = select.forward(_pb(), H100)
    assert (spec.family, spec.arch, spec.threads, spec.stages) == ("test_sm90", "sm_90a", 384, 2)
    assert spec.id == "test_sm90_bf16_d128_m128n128w12_mask1_bias1_varlen0_st2"
    assert select.forward(_pb(), A100).family == "fwd_mma"            # sm_90a: cc 9.0 only
    assert select.forward(_pb(), dataclasses.replace(H100, cc=(10, 0))).family == "fwd_mma"
    assert select.forward(_pb(varlen=True), H100).family == "fwd_mma"  # the row declines
    assert select.forward(_pb(), H100, sparse=True).family == "fwd_mma"
    # no kDebug in its template: debug-counter builds stay on the portable family
    assert select.forward(_pb(), H100, debug_counters=True).family == "fwd_mma"
    assert select.forward(_pb(hd=96), H100).head_dim == 128  # the tile's own head dim
    assert select.forward(_pb(hd=96), A100).head_dim == 96


def test_adding_a_family_is_one_row(test_family, tmp_path, monkeypatch) -> None:
    """The row plus its source: selected for its arch, enumerated by precompile for sm_90
    (beside the portable specs, which still serve what it declines), and compiled."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy import compile as dmc

    src = tmp_path / "cuda_src"
    shutil.copytree(dmc.cuda_src_dir(), src)
    (src / "sm90").mkdir(exist_ok=True)
    (src / "sm90" / "test_fwd.cu").write_text(TEST_KERNEL)
    monkeypatch.setattr(dmc, "cuda_src_dir", lambda: src)
    spec = select.forward(_pb(), H100)
    sm90 = precompile.all_specs("sm_90")
    assert spec in sm90 and dataclasses.replace(spec, family="fwd_mma", block_n=64, num_warps=8,
                                                stages=1, arch="sm_90") in sm90
    assert not any(s.family == "test_sm90" for s in precompile.all_specs("sm_80"))
    ck = dmc.compile_spec(spec, use_disk_cache=False)
    assert ck.cubin[:4] == b"\x7fELF" and ck.arch == "sm_90a"
    assert "test_fwd_sm90_kernel" in ck.lowered_name and not ck.spills and not ck.slow


def test_header_edit_changes_the_cache_key(tmp_path, monkeypatch) -> None:
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="needs CuPy's NVRTC bindings")
    from dmattn_cupy import compile as dmc

    src = tmp_path / "cuda_src"
    shutil.copytree(dmc.cuda_src_dir(), src)
    monkeypatch.setattr(dmc, "cuda_src_dir", lambda: src)
    spec = KernelSpec(dtype="fp16", head_dim=32, block_m=64, block_n=32, num_warps=4)
    before = dmc.cache_key(spec)
    assert dmc.cache_key(spec) == before
    header = src / "softmax.cuh"
    header.write_text(header.read_text() + "\n// an edit\n")
    assert dmc.cache_key(spec) != before
    assert dmc.cache_key(dataclasses.replace(spec, arch="sm_90")) != dmc.cache_key(spec)


def test_parse_ptxas_advisories() -> None:
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_ZN2dm4testEv' for 'sm_90a'
        ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are \
serialized due to non wgmma instructions defining accumulator registers of a wgmma.
        ptxas info    : (C7508) Potential Performance Loss: setmaxnreg ignored; unable to \
determine register count at entry.
        ptxas info    : (C7515) Potential Performance Loss: again
        ptxas info    : (C7517) wgmma.wait_group injected; (C7510) something else
        ptxas info    : Used 168 registers, used 1 barriers, 0 bytes smem, (C1234) other
        """)
    assert parse_advisories(log) == ("C7515", "C7508", "C7517", "C7510")
    assert parse_advisories("ptxas info    : Used 96 registers, 4096 bytes smem") == ()
    ck = CompiledKernel(spec=KernelSpec(), arch="sm_80", cubin=b"", lowered_name="", registers=1,
                        spill_stores=0, spill_loads=0, stack_frame=0, static_smem=0, log=log,
                        advisories=parse_advisories(log))
    assert ck.slow and not ck.spills


def test_precompile_fails_on_slow_advisories(monkeypatch, capsys) -> None:
    def fake(args):
        spec, _ = args
        return CompiledKernel(spec=spec, arch=spec.arch, cubin=b"", lowered_name="",
                              registers=1, spill_stores=0, spill_loads=0, stack_frame=0,
                              static_smem=0, log="", advisories=("C7515",))

    class Serial:
        def __init__(self, **kw): ...
        def __enter__(self): return self
        def __exit__(self, *exc): return False
        def map(self, fn, items): return map(fn, items)

    monkeypatch.setattr(precompile, "_compile", fake)
    monkeypatch.setattr(precompile, "ProcessPoolExecutor", Serial)
    monkeypatch.setattr(precompile, "all_specs", lambda arch, debug=False: [KernelSpec(arch=arch)])
    assert precompile.main(["--arch", "sm_90", "--check-spills"]) == 1
    assert "SLOW C7515" in capsys.readouterr().out
    assert precompile.main(["--arch", "sm_90"]) == 0


def test_resident_ctas_reads_per_sm_limits() -> None:
    """Threads and CTAs per SM differ by device: sm_86 holds 1536 threads and 16 CTAs, sm_89
    1536 and 24, sm_80 / sm_90 2048 and 32 (hard-coded 2048 / 32 over-counted on sm_86/89)."""
    spec = KernelSpec(family="fwd_combine", dtype="bf16", head_dim=128, block_m=1, block_n=1,
                      num_warps=4)
    assert decode.resident_ctas(spec, registers=32, dev=A100) == 16   # 2048 threads / 128
    assert decode.resident_ctas(spec, registers=32, dev=RTX3090) == 12  # 1536 threads / 128
    assert decode.resident_ctas(spec, registers=16, dev=RTX3090) == 12
    small = dataclasses.replace(spec, num_warps=1)                      # 32 threads
    assert decode.resident_ctas(small, registers=16, dev=RTX3090) == 16  # the CTA limit
    assert decode.resident_ctas(small, registers=16, dev=L40) == 24


def test_spec_rejects_switches_and_archs_its_family_lacks() -> None:
    with pytest.raises(ValueError, match="KernelSpec.sparse"):
        KernelSpec(family="bwd_dkdv", sparse=True)
    with pytest.raises(ValueError, match="KernelSpec.deterministic"):
        KernelSpec(family="fwd_mma", deterministic=True)
    with pytest.raises(ValueError, match="KernelSpec.bias_key_row"):   # no such switch
        KernelSpec(family="fwd_mma", has_bias=True, bias_key_row=True)
    with pytest.raises(ValueError, match="KernelSpec.bias_key_row: only with has_bias"):
        KernelSpec(family="bwd_sm90", bias_key_row=True)
    assert KernelSpec(family="bwd_sm90", has_bias=True, bias_key_row=True).id.endswith("_krow")
    with pytest.raises(ValueError, match="KernelSpec.arch"):
        KernelSpec(arch="sm_75")
    with pytest.raises(ValueError, match="KernelSpec.arch"):
        KernelSpec(arch="sm_90a")
    with pytest.raises(ValueError, match="KernelSpec.family"):
        KernelSpec(family="nope")
    assert parse_arch("sm_90a") == ((9, 0), True) and parse_arch("sm_86") == ((8, 6), False)
    with pytest.raises(ValueError, match="arch"):
        parse_arch("compute_90")


def test_device_props_are_read_off_the_device(monkeypatch) -> None:
    """runtime.device_props with CuPy's device queries stubbed (an RTX 3090's values)."""
    cupy = pytest.importorskip("cupy")
    from dmattn_cupy import runtime

    rt = cupy.cuda.runtime
    values = {rt.cudaDevAttrMultiProcessorCount: 82,
              rt.cudaDevAttrMaxSharedMemoryPerBlockOptin: 101376,
              rt.cudaDevAttrMaxSharedMemoryPerMultiprocessor: 102400,
              rt.cudaDevAttrMaxThreadsPerMultiProcessor: 1536,
              rt.cudaDevAttrMaxBlocksPerMultiprocessor: 16,
              rt.cudaDevAttrMaxRegistersPerMultiprocessor: 65536}

    class FakeDevice:
        def __init__(self, device):
            self.compute_capability = "86"

    monkeypatch.setattr(rt, "deviceGetAttribute", lambda attr, device: values[attr])
    monkeypatch.setattr(cupy.cuda, "Device", FakeDevice)
    checked = []
    monkeypatch.setattr(runtime, "require_supported_device", checked.append)
    runtime.device_props.cache_clear()
    try:
        dev = runtime.device_props(0)
    finally:
        runtime.device_props.cache_clear()
    # no memory clock or bus width reported (the stub has none): bandwidth unknown, 0
    assert dev == DeviceProps((8, 6), 82, 101376, 102400, 1536, 16, 65536)
    assert dev.dram_bytes_per_s == 0.0
    assert dev.arch == "sm_86"
    assert checked == [0]  # the capability gate runs before anything reads the device
    assert select.forward(_pb(), dev).arch == "sm_86"
    # reported: double data rate over the bus (an RTX 3090: 9751 MHz x 384 bits = 936 GB/s)
    values[rt.cudaDevAttrMemoryClockRate] = 9751000
    values[rt.cudaDevAttrGlobalMemoryBusWidth] = 384
    runtime.device_props.cache_clear()
    try:
        dev = runtime.device_props(0)
    finally:
        runtime.device_props.cache_clear()
    assert dev.dram_bytes_per_s == pytest.approx(936.1e9, rel=1e-4)


def test_cupy_allocation_enters_a_device_context_only_off_the_current_device(monkeypatch
                                                                             ) -> None:
    """arrays._cupy_on_device: the thin path's CuPy allocators call CuPy directly where the
    array's device is current, and inside a Device context of that device otherwise."""
    cupy = pytest.importorskip("cupy")
    from dmattn_cupy import arrays

    current, entered = [0], []

    class FakeDevice:
        def __init__(self, device):
            self.id = device

        def __enter__(self):
            entered.append(self.id)
            current.insert(0, self.id)
            return self

        def __exit__(self, *exc):
            current.pop(0)
            return False

    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: current[0])
    monkeypatch.setattr(cupy.cuda, "Device", FakeDevice)

    def make(shape, dtype):   # what cupy.empty would see: the current device
        return (current[0], shape, dtype)

    assert arrays._cupy_on_device(0)(make, (2, 3), dtype="float16") == (0, (2, 3), "float16")
    assert entered == []
    assert arrays._cupy_on_device(1)(make, (4,), dtype="int32") == (1, (4,), "int32")
    assert entered == [1] and current == [0]


def test_launch_ex_passes_records_of_any_size_and_cluster_dims(monkeypatch) -> None:
    """launch_ex hands cuLaunchKernelEx one pointer per NumPy record (a FwdParams record and
    a 64-byte aligned 512-byte struct of tensor maps) and a cluster-dimension attribute."""
    import ctypes

    import numpy as np

    pytest.importorskip("cupy")
    from dmattn_cupy import runtime
    from dmattn_cupy.params import new_fwd_params

    maps_dtype = np.dtype({"names": ["maps"], "formats": [(np.uint8, (4, 128))],
                           "itemsize": 512}, align=True)
    params, maps = new_fwd_params(), np.zeros(1, maps_dtype)
    params[0]["seqlen_q"], maps[0]["maps"][3, 127] = 77, 9
    seen = {}

    def fake_launch(cfg_addr, fn, args, extra):   # cuLaunchKernelEx: every argument an address
        cfg = runtime._LaunchConfig.from_address(cfg_addr)
        seen["grid"], seen["block"] = tuple(cfg.grid), tuple(cfg.block)
        seen["smem"], seen["stream"] = cfg.shared, cfg.stream
        seen["attr"] = (cfg.attrs[0].id, tuple(cfg.attrs[0].value[:3]), cfg.num_attrs)
        seen["fn"] = fn
        arg = [ctypes.c_uint64.from_address(args + 8 * i).value for i in range(2)]
        p0 = (ctypes.c_ubyte * params.itemsize).from_address(arg[0])
        p1 = (ctypes.c_ubyte * maps.itemsize).from_address(arg[1])
        seen["bytes"] = (bytes(p0), bytes(p1))
        return 0

    class FakeFunction:
        ptr = 0x1234

    class FakeStream:
        ptr = 0x5678

    class NoDevice:
        def __init__(self, device): ...
        def __enter__(self): return self
        def __exit__(self, *exc): return False

    import cupy

    monkeypatch.setattr(runtime, "_cu_launch_kernel_ex", lambda: fake_launch)
    monkeypatch.setattr(cupy.cuda, "Device", NoDevice)
    monkeypatch.setattr(runtime, "_raw", [None, lambda: 0, NoDevice, RuntimeError,
                                          lambda dev: None])
    spec = select.forward(_pb(), H100)
    kernel = runtime.Kernel(spec, 0, FakeFunction(), None)
    runtime.launch_ex(kernel, (4, 2, 1), (params[0], maps[0]), FakeStream(), cluster=(2, 1, 1))
    assert seen["grid"] == (4, 2, 1) and seen["block"] == (spec.threads, 1, 1)
    assert seen["smem"] == spec.dynamic_smem and seen["stream"] == 0x5678
    assert seen["attr"] == (4, (2, 1, 1), 1) and seen["fn"] == 0x1234
    assert seen["bytes"] == (params.tobytes(), maps.tobytes())
    with pytest.raises(ValueError, match="multiple of the cluster"):
        runtime.launch_ex(kernel, (3, 2, 1), (params[0],), FakeStream(), cluster=(2, 1, 1))


def test_forward_launches_a_family_row_with_its_extra_args(test_family, monkeypatch) -> None:
    """run_forward on the CPU with the runtime stubbed: the test row is selected on cc 9.0
    and launched with the FwdParams record followed by its extra argument; elsewhere the
    portable family with the record alone."""
    import numpy as np

    from dmattn_cupy import forward, runtime
    from dmattn_cupy.arrays import describe
    from dmattn_cupy.validate import check_dense

    maps = np.zeros(1, np.dtype({"names": ["m"], "formats": [(np.uint8, (512,))]}, align=True))
    monkeypatch.setitem(families.FAMILIES, "test_sm90", dataclasses.replace(
        test_family, extra_args=lambda pb, out, spec: (maps[0],)))
    launches = []
    monkeypatch.setattr(runtime, "current_stream", lambda kind, device: "stream")
    monkeypatch.setattr(runtime, "get_kernel", lambda spec, device: spec)
    monkeypatch.setattr(runtime, "launch", lambda k, grid, args, stream: launches.append(
        (k, grid, args, stream)))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 300, 4, 128)).astype(np.float16)
    kv = rng.standard_normal((2, 200, 2, 128)).astype(np.float16)
    pb = dataclasses.replace(check_dense(q, kv, kv, None, None, None, False, (-1, -1), 0.0,
                                         "reference"), backend="cuda")
    for dev, family, n_args in ((H100, "test_sm90", 2), (A100, "fwd_mma", 1)):
        monkeypatch.setattr(runtime, "device_props", lambda device, dev=dev: dev)
        out, lse = forward.run_forward(pb, q)
        spec, grid, args, stream = launches.pop()
        assert (spec.family, len(args), stream) == (family, n_args, "stream")
        assert grid == (-(-300 // spec.block_m), 4, 2)
        assert args[0]["seqlen_q"] == 300 and args[0]["q_per_kv"] == 2
        assert out.shape == q.shape and lse.shape == (2, 4, 300) and describe(out).ptr == 0
    assert args[0].dtype.names[0] == "q"


def test_hopper_forward_takes_dense_problems_on_cc90_only(monkeypatch) -> None:
    dense = _pb(mask=False, bias=False)
    spec = select.forward(dense, H100)
    assert (spec.family, spec.arch, spec.threads, spec.block_m) == ("fwd_sm90", "sm_90a", 384, 128)
    assert spec.dynamic_smem <= H100.smem_per_block
    assert select.forward(dense, A100).family == "fwd_mma"
    assert select.forward(_pb(varlen=True), H100).family == "fwd_mma"
    assert select.forward(dense, H100, sparse=True).family == "fwd_mma"
    assert select.forward(dense, H100, debug_counters=True).family == "fwd_sm90"
    assert select.forward(_pb(hd=256), H100).family == "fwd_mma"   # d256 mask + bias: no tile
    monkeypatch.setenv("DMATTN_FWD_FAMILY", "fwd_mma")
    assert select.forward(dense, H100).family == "fwd_mma"
    monkeypatch.setenv("DMATTN_FWD_FAMILY", "nope")
    with pytest.raises(ValueError, match="DMATTN_FWD_FAMILY"):
        select.forward(dense, H100)


def test_programmatic_launches_pass_the_serialization_attribute(monkeypatch) -> None:
    """launch_ex(programmatic=True) and launch_raw(config=LaunchConfig) call cuLaunchKernelEx with
    CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (6) set to 1, the launch's dims,
    stream and argument pointers; the ctypes structs have CUDA's field offsets."""
    import ctypes

    import numpy as np

    from dmattn_cupy import runtime
    from dmattn_cupy.params import new_fwd_params

    assert (runtime._LaunchConfig.stream.offset, runtime._LaunchConfig.attrs.offset,
            runtime._LaunchConfig.num_attrs.offset) == (32, 40, 48)
    assert (runtime._LaunchAttr.value.offset, ctypes.sizeof(runtime._LaunchAttr)) == (8, 72)
    params = new_fwd_params()
    params[0]["seqlen_q"] = 77
    seen = []

    def fake_launch(cfg_addr, fn, args, extra):
        cfg = runtime._LaunchConfig.from_address(cfg_addr)
        arg0 = ctypes.c_uint64.from_address(args).value
        seen.append((tuple(cfg.grid), tuple(cfg.block), cfg.shared, cfg.stream, cfg.num_attrs,
                     cfg.attrs[0].id, cfg.attrs[0].value[0], fn,
                     bytes((ctypes.c_ubyte * params.itemsize).from_address(arg0))))
        return 0

    class NoDevice:
        def __init__(self, device): ...
        def __enter__(self): return self
        def __exit__(self, *exc): return False

    class FakeFunction:
        ptr = 0x1234

    class FakeStream:
        ptr = 0x5678

    monkeypatch.setattr(runtime, "_cu_launch_kernel_ex", lambda: fake_launch)
    monkeypatch.setattr(runtime, "_raw", [None, lambda: 0, NoDevice, RuntimeError,
                                          lambda dev: None])
    spec = select.forward(_pb(), H100)
    kernel = runtime.Kernel(spec, 0, FakeFunction(), None)
    runtime.launch_ex(kernel, (4, 2, 1), (params[0],), FakeStream(), 1000, programmatic=True)
    rec = np.array(params)   # what a plan keeps: a record and its pointer array
    ptrs = np.array([rec.ctypes.data], dtype=np.uint64)
    config = runtime.LaunchConfig((3, 1, 1), (128, 1, 1), 2000, programmatic=True)
    runtime.launch_raw(1, 0x99, (3, 1, 1), (128, 1, 1), 2000, 0x77, ptrs.ctypes.data, config)
    want = params.tobytes()
    assert seen == [((4, 2, 1), (spec.threads, 1, 1), 1000, 0x5678, 1, 6, 1, 0x1234, want),
                    ((3, 1, 1), (128, 1, 1), 2000, 0x77, 1, 6, 1, 0x99, want)]


def test_launch_record_passes_the_record_by_pointer(monkeypatch) -> None:
    """runtime.launch_record (the row padding and mask packing launches): one argument, the
    record's bytes behind its pointer, the spec's threads, no dynamic shared memory."""
    import ctypes

    import numpy as np

    from dmattn_cupy import mask_pack, runtime
    from dmattn_cupy.params import MASK_PACK_DTYPE

    class FakeFunction:
        ptr = 0x42

    spec = mask_pack.pack_spec("sm_90")
    rec = np.zeros(1, dtype=MASK_PACK_DTYPE)
    rec[0]["seqlen_q"], rec[0]["heads"] = 300, 7
    seen = []

    def launch_raw(device, fn, grid, block, smem, stream, params, config=None):
        arg0 = ctypes.c_uint64.from_address(params).value
        seen.append((device, fn, grid, block, smem, stream, config,
                     bytes((ctypes.c_ubyte * rec.itemsize).from_address(arg0))))

    monkeypatch.setattr(runtime, "get_kernel",
                        lambda s, d: runtime.Kernel(s, d, FakeFunction(), None))
    monkeypatch.setattr(runtime, "launch_raw", launch_raw)
    runtime.launch_record(1, spec, (5, 4, 3), rec, 0x77)
    assert seen == [(1, 0x42, (5, 4, 3), (spec.threads, 1, 1), 0, 0x77, None, rec.tobytes())]


def test_a_threads_first_launch_binds_the_context_before_it_launches(monkeypatch) -> None:
    """A launch on a thread without a bound context (a new thread, torch's autograd thread)
    binds the device's primary context by cudaSetDevice before it launches, once per thread,
    whichever kind of launch comes first (launch_raw, launch_raw with a LaunchConfig, launch
    through CuPy), so that no launch fails with CUDA_ERROR_INVALID_CONTEXT (compute-sanitizer
    reports each failed API call). A context unbound later still gets the raw launches'
    retry (cuLaunchKernelEx returns the error code, cuLaunchKernel raises it)."""
    import threading

    import cupy

    from dmattn_cupy import runtime

    bound: set[int] = set()   # idents of the threads with a context, as the fake driver sees
    sets, launches, failed = [], [], []

    class DriverError(Exception):
        def __init__(self, status):
            self.status = status

    def set_device(dev):
        sets.append((threading.get_ident(), dev))
        bound.add(threading.get_ident())

    def launch_kernel(fn, *rest):
        if threading.get_ident() not in bound:
            failed.append(fn)
            raise DriverError(201)
        launches.append(fn)

    def launch_ex(cfg, fn, params, extra):
        if threading.get_ident() not in bound:
            failed.append(fn)
            return 201
        launches.append(fn)
        return 0

    class Device:   # cupy.cuda.Device on the current device: sets nothing
        def __init__(self, dev): ...
        def __enter__(self): return self
        def __exit__(self, *exc): return False

    class Function:   # a loaded kernel that CuPy launches (runtime.launch)
        ptr = 0

        def __call__(self, grid, block, args, shared_mem, stream):
            launch_kernel(args[0])

    monkeypatch.setattr(runtime, "_thread", threading.local())
    monkeypatch.setattr(runtime, "_raw", [launch_kernel, lambda: 0, Device, DriverError,
                                          set_device])
    monkeypatch.setattr(runtime, "_cu_launch_kernel_ex", lambda: launch_ex)
    monkeypatch.setattr(cupy.cuda, "Device", Device)
    config = runtime.LaunchConfig((1, 1, 1), (32, 1, 1), 0, programmatic=True)
    kernel = runtime.Kernel(select.forward(_pb(), H100), 0, Function(), None)
    kinds = (lambda fn: runtime.launch_raw(0, fn, (1, 1, 1), (32, 1, 1), 0, 0, 0),
             lambda fn: runtime.launch_raw(0, fn, (1, 1, 1), (32, 1, 1), 0, 0, 0, config),
             lambda fn: runtime.launch(kernel, (1, 1, 1), (fn,), None))

    def on_a_new_thread(f):
        t = threading.Thread(target=f)
        t.start()
        t.join()

    for i, kind in enumerate(kinds):   # each kind as a new thread's first launch
        on_a_new_thread(lambda kind=kind, i=i: kind(10 + i))
    assert failed == [] and launches == [10, 11, 12] and len(sets) == 3

    def all_kinds(fn):
        for i, kind in enumerate(kinds):
            kind(fn + i)

    sets.clear()
    all_kinds(20)                       # this thread, then a new one: one bind each
    on_a_new_thread(lambda: all_kinds(30))
    assert failed == [] and launches[3:] == [20, 21, 22, 30, 31, 32]
    assert [dev for _, dev in sets] == [0, 0] and len({ident for ident, _ in sets}) == 2
    for i, kind in enumerate(kinds[:2]):   # unbound behind our back: each raw kind fails
        bound.clear()                      # once, binds and retries
        kind(40 + i)
    assert failed == [40, 41] and launches[-2:] == [40, 41] and len(sets) == 4
