"""The array bridge: torch / CuPy / NumPy inputs described uniformly, without copies.

An ``ArrayInfo`` records what the rest of the pipeline needs of an array: its kind, dtype name,
shape, strides in elements, device and data pointer. GPU data is read in place: the kernel gets
the torch (or CuPy) storage pointer itself, so torch tensors cross with no copy and no sync.
The adapter at the end (``empty``, ``zeros``, ``cast``, ``contiguous_copy``, ``to_host``,
``upload``, ``strided_copy``, ``padded_buffer``, ``padded_copy``) is the one place that
switches on torch / CuPy / NumPy.
Only this module and ``runtime`` touch torch/CuPy objects; both are imported lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


def array_kind(x: Any) -> str | None:
    """'numpy', 'cupy', 'torch', or None for anything else (never imports a framework)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__
    if mod.startswith("cupy") and "cupy" in sys.modules:
        import cupy

        if isinstance(x, cupy.ndarray):
            return "cupy"
    if mod.startswith("torch") and "torch" in sys.modules:
        import torch

        if isinstance(x, torch.Tensor):
            return "torch"
    return None


def module_of(x: Any) -> Any:
    """The array library of ``x`` (torch, cupy or numpy) for its array functions (``where``,
    ``isfinite``, ...); TypeError for anything else."""
    kind = array_kind(x)
    if kind == "torch":
        import torch

        return torch
    if kind == "cupy":
        import cupy

        return cupy
    if kind == "numpy":
        return np
    raise TypeError(f"expected a torch.Tensor, cupy.ndarray or numpy.ndarray, got "
                    f"{type(x).__name__}")


def dtype_name(x: Any) -> str:
    """'float16', 'bfloat16', 'float32', 'bool', ... for any supported array kind."""
    kind = array_kind(x)
    if kind == "torch":
        return str(x.dtype).removeprefix("torch.")
    return np.dtype(x.dtype).name if kind == "numpy" else str(x.dtype)


@dataclass(frozen=True)
class ArrayInfo:
    kind: str
    dtype: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]   # in elements (0 for a broadcast dimension)
    device: int                # CUDA device ordinal; -1 for host arrays
    ptr: int                   # device pointer (0 for host arrays)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def describe(x: Any) -> ArrayInfo:
    kind = array_kind(x)
    if kind == "numpy":
        item = x.itemsize
        return ArrayInfo("numpy", dtype_name(x), tuple(x.shape),
                         tuple(s // item for s in x.strides), -1, 0)
    if kind == "cupy":
        item = x.itemsize
        return ArrayInfo("cupy", dtype_name(x), tuple(x.shape),
                         tuple(s // item for s in x.strides), int(x.device.id), int(x.data.ptr))
    if kind == "torch":
        dev = x.device
        ordinal = (dev.index if dev.index is not None else 0) if dev.type == "cuda" else -1
        x = _unwrapped(x)
        ptr = int(x.data_ptr()) if dev.type == "cuda" else 0
        return ArrayInfo("torch", dtype_name(x), tuple(x.shape), tuple(x.stride()), ordinal, ptr)
    raise TypeError(
        f"expected a numpy.ndarray, cupy.ndarray or torch.Tensor, got {type(x).__name__}"
    )


def _unwrapped(x: Any) -> Any:
    """The tensor a torch.func transform's wrapper (grad, vjp) holds, else ``x``: the same
    memory, whose data_ptr the wrapper does not give. vmap's batched tensors raise: a mapped
    dimension is not a memory layout the kernels can read."""
    torch = sys.modules["torch"]
    if torch.compiler.is_compiling():  # traced: fake tensors, and dynamo cannot trace the test
        return x
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(x):
        if functorch.is_batchedtensor(x):
            raise TypeError("torch.func.vmap over dmattn_cupy's attention is not supported: "
                            "fold the mapped dimension into the batch (or heads) dimension "
                            "of query/key/value instead")
        x = functorch.get_unwrapped(x)
    return x


def common_kind(named: dict[str, Any]) -> str:
    """The one array kind of all non-None arguments; mixing kinds raises TypeError."""
    kinds: dict[str, str] = {}
    for name, x in named.items():
        if x is None:
            continue
        kind = array_kind(x)
        if kind is None:
            raise TypeError(
                f"{name} must be a numpy.ndarray, cupy.ndarray or torch.Tensor, "
                f"got {type(x).__name__}"
            )
        kinds[name] = kind
    distinct = sorted(set(kinds.values()))
    if len(distinct) > 1:
        detail = ", ".join(f"{n}={k}" for n, k in kinds.items())
        raise TypeError(f"all array arguments must be of one kind (got {detail}); convert them "
                        "to one of numpy, cupy or torch first")
    return distinct[0]


def to_numpy_f64(x: Any) -> np.ndarray | None:
    """Host float64 copy (bool stays bool) for the reference backend; None passes through."""
    if x is None:
        return None
    kind = array_kind(x)
    if kind == "torch":
        t = x.detach()
        if t.dtype.is_floating_point:
            t = t.double()
        arr = t.cpu().numpy()
    elif kind == "cupy":
        import cupy

        arr = cupy.asnumpy(x.astype(cupy.float64) if x.dtype.kind == "f" else x)
    else:
        arr = np.asarray(x)
    return arr if arr.dtype == np.bool_ else arr.astype(np.float64)


def from_numpy_like(arr: np.ndarray, like: Any) -> Any:
    """``arr`` converted to the kind, device and dtype of ``like`` (reference-backend results)."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=like.device, dtype=like.dtype)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(arr).astype(like.dtype)
    return arr.astype(like.dtype)


def lse_like(arr: np.ndarray, like: Any) -> Any:
    """float32 lse in the kind/device of ``like``."""
    kind = array_kind(like)
    arr = np.ascontiguousarray(arr.astype(np.float32))
    if kind == "torch":
        import torch

        return torch.from_numpy(arr).to(device=like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(arr)
    return arr


# ---------------------------------------------------------------------------------------------
# The adapter: allocation and copies in the library and on the device of a given array.

def torch_dtype(dtype: str) -> Any:
    """The torch dtype named ``dtype`` (e.g. "float32")."""
    import torch

    return getattr(torch, dtype)


def empty(like: Any, shape: tuple[int, ...], dtype: str | None = None) -> Any:
    """Uninitialized array in the library and on the device of ``like`` (default: its dtype)."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        dt = like.dtype if dtype is None else torch_dtype(dtype)
        return torch.empty(shape, dtype=dt, device=like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.empty(shape, dtype=like.dtype if dtype is None else dtype)
    return np.empty(shape, dtype=like.dtype if dtype is None else dtype)


def zeros(like: Any, shape: tuple[int, ...], dtype: str) -> Any:
    """Zero-filled array in the library and on the device of ``like``."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        return torch.zeros(shape, dtype=torch_dtype(dtype), device=like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.zeros(shape, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def cast(x: Any, dtype: str) -> Any:
    """``x`` in ``dtype`` (``x`` itself when it already has it)."""
    if dtype_name(x) == dtype:
        return x
    if array_kind(x) == "torch":
        return x.to(torch_dtype(dtype))
    return x.astype(dtype)


def contiguous_copy(x: Any, dtype: str | None = None) -> Any:
    """A fresh, C-contiguous (so 16-byte aligned) copy of ``x``, optionally cast."""
    kind = array_kind(x)
    if kind == "torch":
        import torch

        y = x.to(torch_dtype(dtype)) if dtype is not None else x
        return y.clone(memory_format=torch.contiguous_format)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(x.device.id):
            y = x.astype(dtype) if dtype is not None else x
            return cupy.array(y, order="C", copy=True)
    return np.array(x if dtype is None else x.astype(dtype), order="C", copy=True)


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of ``x`` (``x`` itself for NumPy). Syncs for GPU arrays."""
    kind = array_kind(x)
    if kind == "torch":
        return x.detach().cpu().numpy()
    if kind == "cupy":
        import cupy

        return cupy.asnumpy(x)
    return np.asarray(x)


def upload(arr: np.ndarray, like: Any, dtype: str) -> Any:
    """Host ``arr`` as a contiguous ``dtype`` array in the library and on the device of
    ``like`` (enqueued on that library's current stream)."""
    host = np.ascontiguousarray(arr, dtype=dtype)
    kind = array_kind(like)
    if kind == "torch":
        import torch

        return torch.from_numpy(host).to(like.device)
    if kind == "cupy":
        import cupy

        with cupy.cuda.Device(like.device.id):
            return cupy.asarray(host)
    return host


def in_private_pool(*xs: Any) -> bool:
    """Whether torch's caching allocator placed any of ``xs`` (None: skipped) in a pool other
    than its default one (a CUDA graph's or a ``MemPool``'s: inductor's CUDA-graph trees route
    a thread's allocations there while they warm a graph up). Such a pool must hold only
    tensors its owner tracks, so a buffer kept past its call must not come from one. Walks
    every segment once: ask only when buffers are about to be kept."""
    ours = [(x.data_ptr(), x.device.index) for x in xs
            if type(x).__module__ == "torch" and x.is_cuda]
    if not ours:
        return False
    import torch

    try:
        try:   # without the allocation history's traces where torch can leave them out
            segments = torch.cuda.memory_snapshot(include_traces=False)
        except TypeError:
            segments = torch.cuda.memory_snapshot()
    except RuntimeError:   # an allocator backend without snapshots (cudaMallocAsync)
        return False
    return any(seg["device"] == dev and seg["address"] <= ptr < seg["address"]
               + seg["total_size"] and tuple(seg["segment_pool_id"]) != (0, 0)
               for seg in segments for ptr, dev in ours)


def _cupy_source(info: ArrayInfo, item: int, shape: tuple[int, ...]) -> Any:
    """A CuPy view (raw words of ``item`` bytes) of the memory ``info`` describes, with
    ``shape`` (``info``'s, or 1 where a stride-0 dimension is read once); any strides,
    negative ones included. Call inside the device and stream context."""
    import cupy

    words = {1: cupy.uint8, 2: cupy.uint16, 4: cupy.uint32}[item]
    dims = list(zip(shape, info.strides, strict=True))
    lo = sum((n - 1) * st for n, st in dims if st < 0)
    hi = sum((n - 1) * st for n, st in dims if st > 0)
    mem = cupy.cuda.UnownedMemory(info.ptr + lo * item, (hi - lo + 1) * item, owner=None,
                                  device_id=info.device)
    return cupy.ndarray(shape, words, cupy.cuda.MemoryPointer(mem, -lo * item),
                        strides=tuple(st * item for st in info.strides))


def _cupy_target(buf: Any, ptr: int, nbytes: int, device: int, item: int,
                 shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    """A CuPy view (raw words) over ``nbytes`` at ``ptr`` that ``buf`` owns."""
    import cupy

    words = {1: cupy.uint8, 2: cupy.uint16, 4: cupy.uint32}[item]
    mem = cupy.cuda.UnownedMemory(ptr, max(1, nbytes), owner=buf, device_id=device)
    return cupy.ndarray(shape, words, cupy.cuda.MemoryPointer(mem, 0),
                        strides=tuple(st * item for st in strides))


def strided_copy(info: ArrayInfo, stream: Any, like: Any = None) -> tuple[Any, ArrayInfo]:
    """The 16-bit elements ``info`` describes (any strides, negative ones included) copied
    on ``stream`` into a fresh C-contiguous buffer, allocated in the library of ``like`` (so
    torch's caching allocator, and its CUDA-graph pool, owns it) or by CuPy when ``like`` is
    None; returns it and its description."""
    import cupy

    item = 2  # fp16 / bf16, copied as raw 16-bit words
    with cupy.cuda.Device(info.device), stream:
        src = _cupy_source(info, item, info.shape)
        if like is None or array_kind(like) != "torch":
            dst = src.copy(order="C")
            return dst, dataclasses.replace(info, ptr=dst.data.ptr,
                                            strides=tuple(st // item for st in dst.strides))
        buf = empty(like, tuple(info.shape), info.dtype)
        out = describe(buf)
        dst = _cupy_target(buf, out.ptr, buf.numel() * item, info.device, item, info.shape,
                           out.strides)
        dst[...] = src
    return buf, dataclasses.replace(info, ptr=out.ptr, strides=out.strides)


ITEM_BYTES = {"bool": 1, "uint8": 1, "int8": 1, "float16": 2, "bfloat16": 2, "float32": 4}


def collapse_broadcast(info: ArrayInfo) -> ArrayInfo:
    """``info`` with every non-last dimension of stride 0 (an expanded broadcast) described
    as size 1: the same elements under the broadcast rules, and a layout a tensor map can
    encode (it cannot step a stride of 0)."""
    shape = tuple(1 if st == 0 and i < info.ndim - 1 else n
                  for i, (n, st) in enumerate(zip(info.shape, info.strides, strict=True)))
    return info if shape == info.shape else dataclasses.replace(info, shape=shape)


def padded_rows(info: ArrayInfo, align: int = 16) -> ArrayInfo:
    """How ``padded_buffer`` lays ``info`` out (pointer 0 until allocated): broadcast dimensions
    collapsed (``collapse_broadcast``: stored once), each row of the last dimension starting
    ``align`` bytes apart (the row padded), the other dimensions C-contiguous."""
    info = collapse_broadcast(info)
    item = ITEM_BYTES[info.dtype]
    row = -(-info.shape[-1] * item // align) * align // item
    strides = [1]
    size = row
    for n in reversed(info.shape[:-1]):
        strides.insert(0, size)
        size *= n
    return dataclasses.replace(info, strides=tuple(strides), ptr=0)


def padded_buffer(info: ArrayInfo, stream: Any, like: Any, align: int = 16
                  ) -> tuple[Any, ArrayInfo]:
    """A fresh buffer (allocated like ``strided_copy``'s, on ``stream``) for ``info``'s
    elements laid out as ``padded_rows`` says, and its description; nothing is copied."""
    import cupy

    nbytes = padded_bytes(info, align)
    with cupy.cuda.Device(info.device), stream:
        if like is None or array_kind(like) != "torch":
            buf = cupy.empty(nbytes, cupy.uint8)
            ptr = buf.data.ptr
        else:
            buf = empty(like, (nbytes,), "uint8")
            ptr = describe(buf).ptr
    return buf, dataclasses.replace(padded_rows(info, align), ptr=ptr)


def padded_copy(info: ArrayInfo, stream: Any, like: Any, align: int = 16) -> tuple[Any, ArrayInfo]:
    """``padded_buffer`` holding the elements ``info`` describes, copied element by element on
    ``stream`` (rows that are not equally spaced; ``row_pad.copy_rows`` copies the others).
    The padding is never written (nothing reads past a row's last element)."""
    import cupy

    buf, out = padded_buffer(info, stream, like, align)
    item = ITEM_BYTES[info.dtype]
    with cupy.cuda.Device(info.device), stream:
        dst = _cupy_target(buf, out.ptr, padded_bytes(info, align), info.device, item,
                           out.shape, out.strides)
        dst[...] = _cupy_source(collapse_broadcast(info), item, out.shape)
    return buf, out


def padded_bytes(info: ArrayInfo, align: int = 16) -> int:
    """The size of ``padded_buffer``'s buffer for ``info`` (at least 1 byte)."""
    out = padded_rows(info, align)
    words = math.prod(out.shape[:-1]) * out.strides[-2] if out.ndim > 1 else out.shape[0]
    return max(1, words) * ITEM_BYTES[info.dtype]


def row_copy(info: ArrayInfo, align: int = 16) -> tuple[int, int, int, int] | None:
    """(row bytes, rows, source pitch, destination pitch in bytes) of the one pitched copy
    (``row_pad.copy_rows``) into ``padded_buffer`` that pads ``info``'s rows, or None when
    its rows are not equally spaced (``padded_copy``: element by element)."""
    src = collapse_broadcast(info)
    pitch = _row_pitch(src)
    out = padded_rows(info, align)
    if pitch is None or out.ndim < 2:
        return None
    item = ITEM_BYTES[info.dtype]
    return (out.shape[-1] * item, math.prod(out.shape[:-1]), pitch * item,
            out.strides[-2] * item)


def _row_pitch(info: ArrayInfo) -> int | None:
    """The element distance between consecutive rows (last-dimension vectors, in C order over
    the other dimensions) when it is one constant no smaller than a row and keys are
    contiguous, else None."""
    if info.strides[-1] != 1 and info.shape[-1] > 1:
        return None
    dims = [(n, st) for n, st in zip(info.shape[:-1], info.strides[:-1], strict=True) if n > 1]
    if not dims:
        return info.shape[-1]
    pitch = dims[-1][1]
    expect = pitch
    for n, st in reversed(dims):
        if st != expect:
            return None
        expect = st * n
    return pitch if pitch >= info.shape[-1] else None


def _cupy_on_device(dev: int) -> Callable[..., Any]:
    """``call(make, *args, **kwargs)``: ``make``'s result with CuPy device ``dev`` current
    (CuPy allocates on the current device), entering a Device context only where another
    device is current (the thin path's allocators: the context costs on every call)."""
    import cupy

    current, device = cupy.cuda.runtime.getDevice, cupy.cuda.Device

    def call(make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if current() == dev:
            return make(*args, **kwargs)
        with device(dev):
            return make(*args, **kwargs)

    return call


def allocator(like: Any, shape: tuple[int, ...], dtype: str | None,
              zero: bool = False) -> Callable[[], Any]:
    """A function making a new (zero-filled if ``zero``) array of ``shape`` and ``dtype``
    (default: ``like``'s) in the library and on the device of ``like``, each time it is
    called: the thin launch path's allocation, bound once per plan."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        dt = like.dtype if dtype is None else torch_dtype(dtype)
        return functools.partial(torch.zeros if zero else torch.empty, shape, dtype=dt,
                                 device=like.device)
    if kind == "cupy":
        import cupy

        dt = like.dtype if dtype is None else dtype
        return functools.partial(_cupy_on_device(like.device.id), cupy.zeros if zero else
                                 cupy.empty, shape, dtype=dt)
    return functools.partial(np.zeros if zero else np.empty, shape,
                             dtype=like.dtype if dtype is None else dtype)


def sized_allocator(like: Any, dtype: str) -> Callable[[int], Any]:
    """A function making a new 1-D array of ``n`` elements of ``dtype`` in the library and on
    the device of ``like`` (bound once; ``like`` itself is not kept)."""
    kind = array_kind(like)
    if kind == "torch":
        import torch

        dt, dev = torch_dtype(dtype), like.device
        return lambda n: torch.empty(n, dtype=dt, device=dev)
    if kind == "cupy":
        import cupy

        on_device = _cupy_on_device(like.device.id)
        return lambda n: on_device(cupy.empty, n, dtype=dtype)
    return lambda n: np.empty(n, dtype=dtype)


def flat_view(flat: Any, shape: tuple[int, ...]) -> Any:
    """The first ``prod(shape)`` elements of the 1-D array ``flat`` as a C-contiguous array of
    ``shape`` (a view, same library)."""
    n = math.prod(shape)
    if array_kind(flat) == "torch":
        return flat.as_strided(tuple(shape), c_strides(shape), 0)
    return flat[:n].reshape(shape)


def c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous array of ``shape`` (as torch and CuPy make them)."""
    st, acc = [], 1
    for n in reversed(shape):
        st.append(acc)
        acc *= max(1, int(n))
    return tuple(reversed(st))


def caster(like: Any, dtype: str) -> Callable[[Any], Any]:
    """A function casting arrays of ``like``'s library to ``dtype`` (bound once: no kind or
    dtype lookups per call)."""
    if array_kind(like) == "torch":
        tdt = torch_dtype(dtype)
        return lambda x: x.to(tdt)
    return lambda x: x.astype(dtype)


def summer(like: Any, axes: tuple[int, ...], dtype: str) -> Callable[[Any], Any]:
    """A function summing arrays of ``like``'s library over ``axes`` (kept, size 1) into
    ``dtype`` with a float32 accumulator, without a float32 copy of the input (bound once).
    torch: up to _FEW_TERMS slices are added one by one in float32 in C order (a new tensor,
    rounded once into ``dtype``); more are summed by torch's reduction, 16-bit inputs in
    float32 rounded once into their own dtype. NumPy/CuPy give a float32 sum cast to
    ``dtype``."""
    if array_kind(like) == "torch":
        import torch

        tdt = torch_dtype(dtype)

        def total(x: Any) -> Any:
            if math.prod(x.shape[a] for a in axes) > _FEW_TERMS:
                return (x.sum(dim=axes, keepdim=True) if x.dtype == tdt != torch.float32 else
                        x.sum(dim=axes, keepdim=True, dtype=torch.float32).to(tdt))
            # a few terms (a batch of 2, a kv head's pair of heads): the slices added in order,
            # in float32 (torch's reduction over a leading axis of 2 moved ~1.5 TB/s on the
            # H200; adds move what they read and write at full bandwidth)
            terms = [x[k] for k in _slices(tuple(x.shape), axes)]
            # (results are new tensors: x is the plan's scratch, rewritten by the next step)
            if len(terms) == 1:
                return terms[0].to(tdt, copy=True)
            if len(terms) == 2 and x.dtype == tdt != torch.float32:
                return torch.add(terms[0], terms[1])  # float32 inside, rounded once
            # (an add into a float32 out= would round to x's dtype first)
            acc = terms[0].to(torch.float32, copy=True)
            for t in terms[1:]:
                acc.add_(t)
            return acc.to(tdt)

        return total
    return lambda x: x.sum(axes, keepdims=True, dtype="float32").astype(dtype, copy=False)


_FEW_TERMS = 4  # summer adds up to this many slices itself


@functools.lru_cache(maxsize=64)
def _slices(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[tuple[slice, ...], ...]:
    """The index tuples of ``shape``'s slices along ``axes`` (each kept, size 1), in C order
    (cached: a plan sums the same shape every step)."""
    keys: list[tuple[slice, ...]] = [()]
    for d, n in enumerate(shape):
        keys = [k + ((slice(i, i + 1),) if d in axes else (slice(None),))
                for k in keys for i in (range(n) if d in axes else (0,))]
    return tuple(keys)


def set_rows(dst: Any, first: np.ndarray, second: np.ndarray, src: Any) -> None:
    """``dst[first[i], second[i]] = src[i]`` in place, for host index arrays and ``dst``/``src``
    of one kind (on ``dst``'s device; ``src`` cast to ``dst``'s dtype)."""
    kind = array_kind(dst)
    if kind == "torch":
        import torch

        i0 = torch.as_tensor(first, device=dst.device)
        i1 = torch.as_tensor(second, device=dst.device)
        dst[i0, i1] = src.to(dst.dtype)
    elif kind == "cupy":
        import cupy

        with cupy.cuda.Device(dst.device.id):
            dst[cupy.asarray(first), cupy.asarray(second)] = src.astype(dst.dtype)
    else:
        dst[first, second] = np.asarray(src).astype(dst.dtype)
