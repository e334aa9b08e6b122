"""Launch plans: every launch of one call with all but its pointers decided.

A ``Plan`` holds the kernels, grids and argument records of a call, the buffers the call
allocates (shape, dtype, zero-filled or not) and *slots*: where in the records each pointer
goes. The forward, decode and backward builders make one per call; the first call with a given
signature runs it as built (``run``: ``runtime.launch`` with the records, pointers already in
them), and ``fastpath`` keeps it in a ``PlanCache`` so that a repeated call only allocates
its outputs, patches pointers into the same records and launches them raw (``execute``).

Invariants: a record's pointer fields are 8-byte aligned uint64 words, so a slot is (a uint64
view of the record, a word index); the driver copies kernel parameters at launch, so patching a
record after its launch is safe; ``execute`` holds the plan's lock while it patches and
launches, so threads sharing a plan do not interleave.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import arrays, row_pad, runtime, scratch


@dataclass(eq=False)
class Launch:
    kernel: Any                        # runtime.Kernel
    grid: tuple[int, int, int]
    args: tuple[np.ndarray, ...] = field(repr=False)  # one-element records, passed by value
    shared_mem: int | None = None      # None: the spec's
    # launched with programmatic stream serialization (runtime.LaunchConfig): it may start
    # while the previous launch runs, and waits for it (griddepcontrol.wait) before reading,
    # or (the forward behind the overlapped mask packing) for its own per-row ready words
    programmatic: bool = False


@dataclass(frozen=True)
class Alloc:
    name: str
    shape: tuple[int, ...]
    dtype: str | None                  # None: the query's dtype
    zero: bool = False
    # a float32 workspace whose contents never outlive the call's launches (and results read
    # from it are copies): a cached plan may run it on a reused buffer (``scratch``)
    scratch: bool = False
    # int32 words that are zero when a launch reading them starts and that the launch leaves
    # zero (a work counter the kernel itself winds back): a kept, once zero-filled buffer per
    # stream serves every such call (``scratch.counter``), fresh and zero-filled in a graph
    counter: bool = False

    def __post_init__(self) -> None:
        if self.scratch and (self.zero or self.dtype != "float32" or len(self.shape) != 1):
            raise ValueError(f"a scratch workspace is a 1-D float32 buffer with no fill, got "
                             f"{self}")
        if self.counter and (self.scratch or self.dtype != "int32" or len(self.shape) != 1):
            raise ValueError(f"a counter workspace is a 1-D int32 buffer, got {self}")


@dataclass(frozen=True)
class RowCopy:
    """A pitched copy a call makes before its launches (``row_pad.copy_rows``): ``rows`` rows
    of ``width`` bytes from the plan source ``src`` (rows ``src_pitch`` bytes apart) into the
    plan source ``dst`` (``dst_pitch`` apart, tails zeroed), e.g. a mask's rows into an
    allocation whose rows a tensor map can read."""
    src: str
    dst: str
    width: int
    rows: int
    src_pitch: int
    dst_pitch: int


@dataclass(eq=False)
class Plan:
    """What a call launches. ``sources``: the names whose pointers a call supplies, in order
    (inputs first, then ``allocs`` in their order)."""
    device: int
    launches: list[Launch] = field(default_factory=list, repr=False)
    allocs: list[Alloc] = field(default_factory=list)
    inputs: tuple[str, ...] = ()
    # source -> [(uint64 view of a record, word index, bytes added to the pointer)]
    slots: dict[str, list[tuple[np.ndarray, int, int]]] = field(default_factory=dict,
                                                                repr=False)
    hooks: list[Callable[[dict[str, int]], None]] = field(default_factory=list, repr=False)
    copies: list[RowCopy] = field(default_factory=list)  # made by ``execute`` before launching
    cacheable: bool = True             # False: built around copies or data a key cannot prove
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # builder facts (post-steps)
    _bound: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.inputs + tuple(a.name for a in self.allocs)

    def slot(self, name: str, record: np.ndarray, field_name: str, add: int = 0) -> None:
        """Pointer ``name`` (plus ``add`` bytes) goes into ``record[field_name]`` (uint64)."""
        off = record.dtype.fields[field_name][1]
        self.slot_at(name, record, off, add)

    def add_counter(self, name: str, words: int, kind: str, stream: int, like: Any) -> Any:
        """Allocation ``name``: ``words`` int32 counters every launch finds zero and leaves zero
        (``Alloc.counter``); returns this call's buffer, the one kept for (``kind``, device,
        words, ``name``) on the raw ``stream`` (``scratch.counter``, the key the thin path's
        runner asks for too; ``like``: an array of the call). The name keeps two counters of
        one call apart (an item counter and a mask's ready words may have as many words)."""
        self.allocs.append(Alloc(name, (words,), "int32", counter=True))
        return scratch.counter((kind, self.device, words, name), stream,
                               arrays.allocator(like, (words,), "int32", zero=True))

    def slot_at(self, name: str, buf: np.ndarray, byte_offset: int, add: int = 0) -> None:
        if byte_offset % 8:
            raise ValueError(f"pointer slot at byte {byte_offset} is not 8-byte aligned")
        self.slots.setdefault(name, []).append((buf.view(np.uint64).reshape(-1),
                                                byte_offset // 8, add))

    def run(self, stream: Any) -> None:
        """Launch as built (pointers already in the records) through ``runtime.launch``."""
        for ln in self.launches:
            args = tuple(a[0] for a in ln.args)
            if ln.programmatic:
                runtime.launch_ex(ln.kernel, ln.grid, args, stream, ln.shared_mem,
                                  programmatic=True)
            elif ln.shared_mem is None:
                runtime.launch(ln.kernel, ln.grid, args, stream)
            else:
                runtime.launch(ln.kernel, ln.grid, args, stream, ln.shared_mem)

    def _bind(self) -> Any:
        patches = []   # (memoryview of a record's uint64 words: a cheaper item store, ...)
        for pos, name in enumerate(self.sources):
            for view, idx, add in self.slots.get(name, ()):
                patches.append((memoryview(view), idx, pos, add))
        calls = []
        for ln in self.launches:
            ptrs = np.array([a.ctypes.data for a in ln.args], dtype=np.uint64)
            spec = ln.kernel.spec
            smem = spec.dynamic_smem if ln.shared_mem is None else ln.shared_mem
            block = (spec.threads, 1, 1)
            config = runtime.LaunchConfig(ln.grid, block, smem, programmatic=True) \
                if ln.programmatic else None
            calls.append((ln.kernel.function.ptr, ln.grid, block, smem, int(ptrs.ctypes.data),
                          config))
            self.extra.setdefault("_params", []).append(ptrs)   # keeps the array alive
        self._bound = (tuple(patches), tuple(calls), self.sources)
        return self._bound

    def execute(self, ptrs: list[int], stream: int) -> None:
        """Patch ``ptrs`` (one per ``sources`` entry) into the records and launch each kernel
        on the raw ``stream`` handle."""
        bound = self._bound or self._bind()
        patches, calls, sources = bound
        with self._lock:
            if self.hooks:  # first: a hook may rewrite a whole record, slots then patch it
                named = dict(zip(sources, ptrs, strict=True))
                for hook in self.hooks:
                    hook(named)
            for view, idx, pos, add in patches:
                view[idx] = ptrs[pos] + add
            dev = self.device
            if self.copies:
                named = dict(zip(sources, ptrs, strict=True))
                for c in self.copies:
                    row_pad.copy_rows(dev, named[c.dst], c.dst_pitch, named[c.src], c.src_pitch,
                                      c.width, c.rows, stream)
            for fn, grid, block, smem, params, config in calls:
                runtime.launch_raw(dev, fn, grid, block, smem, stream, params, config)


class PlanCache:
    """A bounded map from call signatures to plans (or to None: "not cacheable, take the
    validated path"), least recently used out first. A hit is one dict lookup and a stamp
    (no reordering); ``put`` past ``capacity`` scans for the oldest stamp."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._d: dict[Any, list[Any]] = {}   # key -> [value, stamp of its last use]
        self._clock = itertools.count()     # next() is atomic under the GIL
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        slot = self._d.get(key)
        if slot is None:
            return default
        slot[1] = next(self._clock)
        return slot[0]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            d = self._d
            d[key] = [value, next(self._clock)]
            while len(d) > self.capacity:
                del d[min(d, key=lambda k: d[k][1])]

    def values(self) -> list[Any]:
        """The cached values, least recently used first."""
        return [v for v, _ in sorted(list(self._d.values()), key=lambda s: s[1])]

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Any) -> bool:
        return key in self._d
