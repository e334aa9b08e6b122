"""The CUDA runtime seam: device properties, kernel loading, streams, launches.

With ``arrays`` (the array bridge) the only module that touches CuPy. A loaded ``Kernel`` is
cached per (spec, device); the spec carries its cubin target, checked against the device.
Launches enqueue on the given stream and never synchronize. Kernel arguments are NumPy records
(structured scalars or one-element arrays) of any size and alignment: each is passed by value
and the driver places it by the cubin's parameter layout (a ``FwdParams`` record, a 64-byte
aligned struct of CUDA tensor maps declared ``const __grid_constant__``, ...).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from . import env
from .compile import CompiledKernel, compile_spec
from .device import DeviceProps, parse_arch
from .device_check import require_supported_device
from .spec import KernelSpec

__all__ = ["Kernel", "current_stream", "device_props", "get_kernel", "launch", "launch_ex",
           "launch_raw", "launch_record", "prefer_shared_memory", "stream_capturing",
           "stream_ptr"]


@cache
def device_props(device: int) -> DeviceProps:
    """The limits of CUDA device ``device``, read once. A GPU the kernels cannot run on
    (compute capability below 8.0) raises one RuntimeError here, before anything compiles."""
    import cupy

    require_supported_device(device)

    rt = cupy.cuda.runtime

    def attr(name: str) -> int:
        return int(rt.deviceGetAttribute(getattr(rt, name), device))

    def dram_bytes_per_s() -> float:
        # double data rate: two transfers a memory clock (kHz) over the bus (bits); 0 where
        # the driver does not report them
        try:
            return 2.0 * attr("cudaDevAttrMemoryClockRate") * 1e3 \
                * attr("cudaDevAttrGlobalMemoryBusWidth") / 8
        except (AttributeError, KeyError, rt.CUDARuntimeError):
            return 0.0

    cc = cupy.cuda.Device(device).compute_capability  # "86", "90", "100"
    return DeviceProps(
        cc=(int(cc[:-1]), int(cc[-1])),
        sm_count=attr("cudaDevAttrMultiProcessorCount"),
        smem_per_block=attr("cudaDevAttrMaxSharedMemoryPerBlockOptin"),
        smem_per_sm=attr("cudaDevAttrMaxSharedMemoryPerMultiprocessor"),
        threads_per_sm=attr("cudaDevAttrMaxThreadsPerMultiProcessor"),
        ctas_per_sm=attr("cudaDevAttrMaxBlocksPerMultiprocessor"),
        regs_per_sm=attr("cudaDevAttrMaxRegistersPerMultiprocessor"),
        dram_bytes_per_s=dram_bytes_per_s())


@dataclass(frozen=True)
class Kernel:
    """A spec's function loaded on one device (``function.module`` keeps it loaded)."""
    spec: KernelSpec
    device: int
    function: Any
    compiled: CompiledKernel

    @property
    def registers(self) -> int:
        return self.compiled.registers


# keyed by spec, device and DMATTN_NVRTC_DEFINES (an A/B define changes the cubin and, for
# some families, the shared memory its launch asks for)
_kernels: dict[tuple[KernelSpec, int, tuple[str, ...]], Kernel] = {}
_lock = threading.Lock()


def _check_runs_on(spec: KernelSpec, dev: DeviceProps) -> None:
    cc, specific = parse_arch(spec.arch)
    ok = cc == dev.cc if specific else (cc[0] == dev.cc[0] and cc <= dev.cc)
    if not ok:
        raise ValueError(f"kernel {spec.id} is built for {spec.arch}, which does not run on "
                         f"compute capability {dev.cc[0]}.{dev.cc[1]}")


def get_kernel(spec: KernelSpec, device: int) -> Kernel:
    """The loaded kernel of ``spec`` on ``device`` (compiled on first use, then cached)."""
    key = (spec, device, env.nvrtc_defines())
    with _lock:
        k = _kernels.get(key)
    if k is not None:
        return k
    dev = device_props(device)
    if spec.dynamic_smem > dev.smem_per_block:
        raise NotImplementedError(
            f"kernel {spec.id} needs {spec.dynamic_smem} bytes of shared memory per block; this "
            f"GPU allows {dev.smem_per_block}. Smaller tiles for such GPUs exist for the forward "
            "kernel only; use backend='reference' here")
    _check_runs_on(spec, dev)
    import cupy
    from cupy_backends.cuda.api import driver

    with cupy.cuda.Device(device):
        ck = compile_spec(spec)
        mod = cupy.cuda.function.Module()
        mod.load(ck.cubin)
        fn = mod.get_function(ck.lowered_name)
        if spec.dynamic_smem > 48 * 1024:
            driver.funcSetAttribute(fn.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    spec.dynamic_smem)
    k = Kernel(spec, device, fn, ck)
    with _lock:
        _kernels[key] = k
    return k


def prefer_shared_memory(kernel: Kernel) -> None:
    """Ask for the largest shared-memory carveout (several CTAs of a small kernel per SM)."""
    import cupy
    from cupy_backends.cuda.api import driver

    with cupy.cuda.Device(kernel.device):
        driver.funcSetAttribute(kernel.function.ptr,
                                driver.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100)


class _StreamHandle:
    """A raw stream pointer exposed through the CUDA stream protocol."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def current_stream(kind: str, device: int) -> Any:
    """torch's current stream for torch inputs, CuPy's otherwise (as a CuPy stream)."""
    import cupy

    if kind == "torch":
        import torch

        ptr = torch.cuda.current_stream(device).cuda_stream
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14; ExternalStream deprecated
            return cupy.cuda.Stream.from_external(_StreamHandle(ptr))
        return cupy.cuda.ExternalStream(ptr, device)
    return cupy.cuda.get_current_stream(device)


def _torch_stream_getter() -> Any:
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # CUDA builds: an int, no object
    if raw is not None:
        return raw
    return lambda device: torch.cuda.current_stream(device).cuda_stream


def _cupy_stream_getter() -> Any:
    import cupy

    get = cupy.cuda.get_current_stream
    return lambda device: get(device).ptr


_stream_getters: dict[str, Any] = {}


def stream_ptr(kind: str, device: int) -> int:
    """The raw handle of the stream ``current_stream`` would return (torch's current stream
    for torch inputs, CuPy's otherwise), without building a stream object."""
    get = _stream_getters.get(kind)
    if get is None:
        get = _stream_getters[kind] = (_torch_stream_getter() if kind == "torch" else
                                       _cupy_stream_getter())
    return get(device)


_capture_query: list[Any] = []   # [cupy runtime.streamIsCapturing], bound once


def stream_capturing(stream: int) -> bool:
    """Whether the raw ``stream`` handle is capturing a CUDA graph. A state that cannot be read
    (the legacy stream while another stream captures globally, an invalidated capture) counts
    as capturing: callers then take the path that is safe inside a graph."""
    if not _capture_query:
        from cupy_backends.cuda.api import runtime as rt

        _capture_query.append(rt.streamIsCapturing)
    try:
        return bool(_capture_query[0](stream))
    except Exception:  # noqa: BLE001  (CUDARuntimeError, RuntimeError: see above)
        return True


Dim3 = tuple[int, int, int]


def launch(kernel: Kernel, grid: Dim3, args: tuple[Any, ...], stream: Any,
           shared_mem: int | None = None) -> None:
    """Launch ``kernel`` with ``kernel.spec.threads`` threads per block and ``args`` (NumPy
    records, each passed by value) on ``stream``; ``shared_mem`` defaults to the spec's."""
    import cupy

    smem = kernel.spec.dynamic_smem if shared_mem is None else shared_mem
    with cupy.cuda.Device(kernel.device):
        if not getattr(_thread, "bound", False):
            _bind_thread(kernel.device, (_raw or _bind_raw())[4])
        kernel.function(grid, (kernel.spec.threads, 1, 1), args, shared_mem=smem, stream=stream)


class _LaunchAttr(ctypes.Structure):   # CUlaunchAttribute: id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


_CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


@cache
def _cu_launch_kernel_ex() -> Any:
    """cuLaunchKernelEx taking every argument as an address."""
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4
    return fn


class LaunchConfig:
    """A prebuilt ``CUlaunchConfig`` for ``cuLaunchKernelEx``: grid, block, shared memory and
    launch attributes; only the stream changes between launches (``launch_raw``).
    ``cluster``: thread-block cluster dims (sm_90+). ``programmatic``: programmatic stream
    serialization (sm_90+): the launch may begin before the previous kernel in its stream has
    finished (once that kernel's CTAs have all run ``griddepcontrol.launch_dependents`` or
    exited); the kernel itself must run ``griddepcontrol.wait`` (common.cuh,
    grid_dependency_wait) before it reads what the previous kernel wrote."""

    __slots__ = ("cfg", "attrs", "address")

    def __init__(self, grid: Dim3, block: Dim3, shared_mem: int, cluster: Dim3 | None = None,
                 programmatic: bool = False) -> None:
        attrs = []
        if cluster is not None:
            attrs.append(_LaunchAttr(id=_CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION))
            attrs[-1].value[0], attrs[-1].value[1], attrs[-1].value[2] = cluster
        if programmatic:
            attrs.append(_LaunchAttr(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION))
            attrs[-1].value[0] = 1
        self.attrs = (_LaunchAttr * max(1, len(attrs)))(*attrs)
        self.cfg = _LaunchConfig(grid=(ctypes.c_uint * 3)(*grid),
                                 block=(ctypes.c_uint * 3)(*block), shared=shared_mem,
                                 stream=None, attrs=self.attrs, num_attrs=len(attrs))
        self.address = ctypes.addressof(self.cfg)


def launch_ex(kernel: Kernel, grid: Dim3, args: tuple[Any, ...], stream: Any,
              shared_mem: int | None = None, cluster: Dim3 | None = None,
              programmatic: bool = False) -> None:
    """``launch`` with launch attributes (``LaunchConfig``) through ``cuLaunchKernelEx``:
    ``cluster`` dims (no family uses them today: the Hopper forward runs one CTA per cluster;
    ``grid`` must be a multiple of them; kernels whose cluster shape is fixed by
    ``__cluster_dims__`` need none) and ``programmatic`` (the split-KV combine). Without
    attributes it is ``launch``."""
    if cluster is None and not programmatic:
        launch(kernel, grid, args, stream, shared_mem)
        return
    if cluster is not None and any(g % c for g, c in zip(grid, cluster, strict=True)):
        raise ValueError(f"grid {grid} must be a multiple of the cluster dims {cluster}")
    smem = kernel.spec.dynamic_smem if shared_mem is None else shared_mem
    block = (kernel.spec.threads, 1, 1)
    bufs = [np.ascontiguousarray(np.asarray(a)).reshape(-1) for a in args]  # alive until return
    params = np.array([b.ctypes.data for b in bufs], dtype=np.uint64)
    launch_raw(kernel.device, kernel.function.ptr, grid, block, smem, stream.ptr,
               int(params.ctypes.data), LaunchConfig(grid, block, smem, cluster, programmatic))


# [driver.launchKernel, runtime.getDevice, cupy.cuda.Device, driver.CUDADriverError,
# runtime.setDevice], bound once
_raw: list[Any] = []
_CUDA_ERROR_INVALID_CONTEXT = 201
# .bound: this thread's runtime has bound a device's primary context (_bind_thread).
_thread = threading.local()


def _bind_raw() -> list[Any]:
    import cupy
    from cupy_backends.cuda.api import driver
    from cupy_backends.cuda.api import runtime as rt

    _raw[:] = [driver.launchKernel, rt.getDevice, cupy.cuda.Device, driver.CUDADriverError,
               rt.setDevice]
    return _raw


def _bind_thread(device: int, set_device: Any) -> None:
    """A thread's first launch on its current device binds that device's primary context by
    cudaSetDevice first: a new thread, torch's autograd thread among them, has none bound
    until a runtime call of its own, and a launch there would fail with
    CUDA_ERROR_INVALID_CONTEXT (an API error compute-sanitizer reports). Once bound, a thread
    keeps a context: cudaSetDevice switches it, never unbinds it. (Inline test of
    ``_thread.bound`` at the callers: ~40 ns against ~80 for a call per launch.)"""
    set_device(device)
    _thread.bound = True


def launch_raw(device: int, function_ptr: int, grid: Dim3, block: Dim3, shared_mem: int,
               stream: int, params_ptr: int, config: LaunchConfig | None = None) -> None:
    """``cuLaunchKernel`` on a raw stream handle; ``params_ptr`` is the address of a ``void*``
    array pointing at each argument's bytes (the driver copies them at the call, so the caller
    may patch its buffers for the next launch). The thin launch path's launch. ``config``: a
    launch with attributes (``cuLaunchKernelEx``) of the same grid, block and shared memory."""
    if config is not None:
        _launch_configured(device, function_ptr, stream, params_ptr, config)
        return
    launch_kernel, get_device, device_ctx, driver_error, set_device = _raw or _bind_raw()
    args = (function_ptr, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared_mem,
            stream, params_ptr, 0)
    try:
        if get_device() == device:
            if not getattr(_thread, "bound", False):
                _bind_thread(device, set_device)
            launch_kernel(*args)
            return
        with device_ctx(device):
            launch_kernel(*args)
    except driver_error as e:
        if e.status != _CUDA_ERROR_INVALID_CONTEXT:
            raise
        # A context unbound after this thread's first launch (cuCtxSetCurrent(NULL) by another
        # library): cudaSetDevice binds the device's primary context, then the launch goes on.
        with device_ctx(device):
            set_device(device)
            launch_kernel(*args)


def launch_record(device: int, spec: KernelSpec, grid: Dim3, record: np.ndarray,
                  stream: int) -> None:
    """One launch of ``spec`` on ``device`` whose only argument is the params struct
    ``record`` (a one-element structured array), no dynamic shared memory, on the raw
    ``stream`` handle (the helper kernels: row padding, mask packing)."""
    args = np.array([record.ctypes.data], dtype=np.uint64)  # the driver copies it at the call
    kernel = get_kernel(spec, device)
    launch_raw(device, kernel.function.ptr, grid, (kernel.spec.threads, 1, 1), 0, stream,
               int(args.ctypes.data))


def _launch_configured(device: int, function_ptr: int, stream: int, params_ptr: int,
                       config: LaunchConfig) -> None:
    _, get_device, device_ctx, _, set_device = _raw or _bind_raw()
    config.cfg.stream = stream
    launch = _cu_launch_kernel_ex()
    if get_device() == device:
        if not getattr(_thread, "bound", False):
            _bind_thread(device, set_device)
        err = launch(config.address, function_ptr, params_ptr, None)
    else:
        with device_ctx(device):
            err = launch(config.address, function_ptr, params_ptr, None)
    if err == _CUDA_ERROR_INVALID_CONTEXT:   # as in launch_raw: bind the primary context
        with device_ctx(device):
            set_device(device)
            err = launch(config.address, function_ptr, params_ptr, None)
    if err != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed: CUresult {err}")
