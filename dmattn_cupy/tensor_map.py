"""CUDA tensor maps (TMA descriptors): what to encode, checked here, and the driver call.

A ``TensorMapSpec`` is pure data (element size, dims, byte strides, box, swizzle), so the rules
that decide whether a layout can be read by TMA are testable without a GPU. ``encode`` calls
the driver's ``cuTensorMapEncodeTiled`` (in ``libcuda.so.1``, through ctypes: CuPy wraps no
tensor-map API) and returns the 128 opaque bytes a kernel receives by value.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache

# CUtensorMapDataType / CUtensorMapSwizzle / L2 promotion values of the driver API.
_DTYPE_BY_SIZE = {1: 0, 2: 1, 4: 2}  # UINT8, UINT16, UINT32: TMA copies bits, zero-fills OOB
_FLOAT32 = 7  # the type a bulk tensor reduce-add adds in (a copy of bits cannot add)
_SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}
_L2_PROMOTION_256B = 3
MAX_STRIDE = 1 << 40
MAP_BYTES = 128


class TensorMapError(ValueError):
    """A layout that TMA cannot read (the caller picks another kernel)."""


@dataclass(frozen=True)
class TensorMapSpec:
    """A tiled tensor map. Dim 0 is the contiguous one; ``strides`` are the byte strides of
    dims 1.. (a dim of size 1 may carry any legal stride: it is never stepped). ``float32``:
    4-byte elements typed as fp32 (what a reduce-add needs), else plain bits."""
    elem_bytes: int
    dims: tuple[int, ...]
    strides: tuple[int, ...]
    box: tuple[int, ...]
    swizzle: int = 0
    float32: bool = False

    def check(self) -> None:
        """Raise TensorMapError unless the driver's rules for tiled maps hold."""
        rank = len(self.dims)
        if not 1 <= rank <= 5 or len(self.box) != rank or len(self.strides) != rank - 1:
            raise TensorMapError(f"rank {rank} map with box {self.box} and strides {self.strides}")
        if self.elem_bytes not in _DTYPE_BY_SIZE or self.swizzle not in _SWIZZLE or (
                self.float32 and self.elem_bytes != 4):
            raise TensorMapError(f"element size {self.elem_bytes} / swizzle {self.swizzle}")
        if any(d < 1 or d >= 1 << 32 for d in self.dims):
            raise TensorMapError(f"dims {self.dims} must be in [1, 2**32)")
        for st in self.strides:
            if st <= 0 or st % 16 or st >= MAX_STRIDE:
                raise TensorMapError(f"byte strides {self.strides} must be positive multiples "
                                     "of 16 below 2**40")
        if any(not 1 <= b <= 256 for b in self.box):
            raise TensorMapError(f"box {self.box} must be in [1, 256] per dim")
        inner = self.box[0] * self.elem_bytes
        if inner % 16 or (self.swizzle and inner > self.swizzle):
            raise TensorMapError(f"inner box of {inner} bytes must be a multiple of 16 and at "
                                 f"most the swizzle span {self.swizzle}")


def dim_stride(size: int, stride_elems: int, elem_bytes: int) -> int:
    """The byte stride to encode for a dim: its own, or 16 for a dim of size 1 (never stepped;
    broadcast dims are given size 1 by the caller). TensorMapError for a stepped dim whose
    stride TMA cannot express (0, negative, or not a multiple of 16 bytes)."""
    if size == 1:
        return 16
    b = stride_elems * elem_bytes
    if b <= 0 or b % 16 or b >= MAX_STRIDE:
        raise TensorMapError(f"stride of {b} bytes over a dim of size {size}")
    return b


@lru_cache(maxsize=1)
def _encoder():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                   ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


def encode(spec: TensorMapSpec, address: int) -> bytes:
    """The 128-byte CUtensorMap of ``spec`` over device memory at ``address`` (16-byte
    aligned). Needs the CUDA driver; raises TensorMapError when the driver refuses."""
    spec.check()
    if address % 16:
        raise TensorMapError(f"global address {address:#x} is not 16-byte aligned")
    rank = len(spec.dims)
    out = (ctypes.c_uint8 * MAP_BYTES)()
    dims = (ctypes.c_uint64 * rank)(*spec.dims)
    strides = (ctypes.c_uint64 * max(1, rank - 1))(*spec.strides)
    box = (ctypes.c_uint32 * rank)(*spec.box)
    ones = (ctypes.c_uint32 * rank)(*([1] * rank))
    dtype = _FLOAT32 if spec.float32 else _DTYPE_BY_SIZE[spec.elem_bytes]
    err = _encoder()(ctypes.addressof(out), dtype, rank, address, dims,
                     strides, box, ones, 0, _SWIZZLE[spec.swizzle], _L2_PROMOTION_256B, 0)
    if err != 0:
        raise TensorMapError(f"cuTensorMapEncodeTiled failed with CUresult {err} for {spec}")
    return bytes(out)


_PROBE_BASE = 0x7F00_0000_0000   # probe addresses: 16-byte aligned, never dereferenced
_PROBE_STEPS = (0x10_0000, 0x1234_5670, 0x7_6543_2100)


@lru_cache(maxsize=512)
def address_offset(spec: TensorMapSpec) -> int | None:
    """The byte offset of the global address inside ``spec``'s encoded map, when the map holds
    it as a plain little-endian uint64 at an 8-byte aligned offset and nowhere else: found by
    encoding maps that differ only in their address, and checked by patching one into another.
    None when that does not hold (or the driver is missing): callers then re-encode."""
    try:
        maps = [encode(spec, _PROBE_BASE + step) for step in (0,) + _PROBE_STEPS]
    except (OSError, AttributeError, TensorMapError):
        return None
    diff = [i for i in range(MAP_BYTES) if any(m[i] != maps[0][i] for m in maps[1:])]
    if not diff:
        return None
    off = diff[0] - diff[0] % 8
    if diff[-1] >= off + 8:
        return None
    for step, m in zip((0,) + _PROBE_STEPS, maps, strict=True):
        if int.from_bytes(m[off:off + 8], "little") != _PROBE_BASE + step:
            return None
    patched = maps[0][:off] + (_PROBE_BASE + _PROBE_STEPS[-1]).to_bytes(8, "little") + \
        maps[0][off + 8:]
    return off if patched == maps[-1] else None


def record_slots(maps: dict[str, TensorMapSpec | None],
                 names: tuple[str, ...]) -> tuple[tuple[str, int], ...] | None:
    """(operand, byte offset) of each encoded map's global address in a record that holds the
    maps of ``names`` at MAP_BYTES-sized slots in that order (absent maps: no slot); None when
    one of them cannot be patched (address_offset)."""
    slots = []
    for i, name in enumerate(names):
        spec = maps.get(name)
        if spec is None:
            continue
        off = address_offset(spec)
        if off is None:
            return None
        slots.append((name, MAP_BYTES * i + off))
    return tuple(slots)
