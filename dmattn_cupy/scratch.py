"""Reused workspaces of the thin launch path: buffers whose contents never outlive one call.

A call served by a cached plan takes such a workspace (an ``Alloc`` with ``scratch=True``: the
split-KV partials of a decode, the backward's dQ accumulator + dsum) from here instead of
allocating it: one float32 buffer per (library, device, stream, calling thread), replaced by a
larger one when a call needs more, at most ``MAX_BYTES`` (a larger workspace is allocated per
call, as before). Why sharing it is safe:
- every launch that touches the buffer is enqueued by one call on one stream from one thread,
  so the launches of two calls that share it are ordered by that stream;
- a replaced or evicted buffer goes back to its library's stream-ordered allocator (torch's
  caching allocator, CuPy's pool), which hands it out again only to work ordered after it,
  and the caller keeps the buffer it got alive until its launches are enqueued;
- a stream that is capturing a CUDA graph (or whose capture state cannot be read) never gets
  one: the graph would keep its address. It gets a fresh allocation from the graph's pool;
- a buffer torch's allocator placed in a private pool (a graph's or a ``MemPool``'s: inductor's
  CUDA-graph trees route a thread's allocations there while they warm a graph up) serves its
  call only: such a pool must hold only tensors its owner tracks.

Counters (``counter``, an ``Alloc`` with ``counter=True``: the Hopper forward's work-item
counter under DM_SM90_PERSISTENT=2) are int32 words that every launch using them finds zero
and leaves zero (the kernel winds the counter back itself). One kept buffer per (library,
device, size, stream, calling thread), zero-filled once when made, serves every such call on
that stream: launches on one stream run one after another, so none sees another's count. A
capturing stream gets a fresh zero-filled one (the fill is part of the graph: every replay
starts at zero, and a replay never shares a counter with a call on another stream).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from . import runtime
from .arrays import in_private_pool

MAX_BYTES = 8 << 20   # the most one (library, device, stream, thread) keeps
MAX_BUFFERS = 16      # kept buffers; the oldest goes first

_bufs: dict[tuple, tuple[int, Any]] = {}   # key -> (bytes, buffer)
_counters: dict[tuple, Any] = {}           # key -> zero-between-launches int32 buffer
_lock = threading.Lock()
_ident = threading.get_ident


def get(owner: tuple, stream: int, nbytes: int, make: Callable[[int], Any],
        capturing: bool | None = None) -> Any:
    """A buffer of at least ``nbytes`` for launches on the raw ``stream``; ``owner`` is
    (library, device); ``make(n)`` allocates a fresh one of ``n`` bytes (in the library, on the
    device, on its current stream: the one ``stream`` names). ``capturing``: whether
    ``stream`` is capturing, where the caller has asked (None: asked here)."""
    if capturing is None:
        capturing = runtime.stream_capturing(stream)
    if nbytes > MAX_BYTES or capturing:
        return make(nbytes)
    key = (owner, stream, _ident())
    kept = _bufs.get(key)
    if kept is not None and kept[0] >= nbytes:
        return kept[1]
    buf = make(nbytes)
    if not in_private_pool(buf):
        _keep(_bufs, key, (nbytes, buf))
    return buf


def _keep(table: dict, key: tuple, value: Any) -> None:
    """``table[key] = value`` as the newest entry; the oldest go past MAX_BUFFERS."""
    with _lock:
        table.pop(key, None)
        table[key] = value
        while len(table) > MAX_BUFFERS:
            del table[next(iter(table))]


def counter(owner: tuple, stream: int, make_zeroed: Callable[[], Any],
            capturing: bool | None = None) -> Any:
    """The int32 counter buffer for launches on the raw ``stream`` that leave it zero;
    ``owner`` is (library, device, words); ``make_zeroed()`` allocates a zero-filled one of
    that many words (on the library's current stream: the one ``stream`` names);
    ``capturing`` as in ``get``."""
    if capturing is None:
        capturing = runtime.stream_capturing(stream)
    if capturing:
        return make_zeroed()
    key = (owner, stream, _ident())
    kept = _counters.get(key)
    if kept is not None:
        return kept
    buf = make_zeroed()
    if not in_private_pool(buf):
        _keep(_counters, key, buf)
    return buf


def clear() -> None:
    """Drop every kept buffer (tests; freeing memory after a burst of large calls)."""
    with _lock:
        _bufs.clear()
        _counters.clear()
