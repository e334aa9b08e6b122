"""The thin launch path: a call whose signature was seen before reuses its plan.

The signature (the key of ``PlanCache``) is, per array, its dtype, shape, strides, device and
pointer alignment class (``ptr & 15``), plus every option value (flags exactly ``bool`` or
``None``, window a tuple of two ``int``), the library, whether lse is wanted, and the
environment variables that change plans (``env.plan_state``). A call that hits only
allocates its outputs in the caller's library (workspaces that do not outlive the call come
from ``scratch``: no allocation), reads the pointers and the current stream,
patches the pointers into the plan's records and launches them (``Plan.execute``): nothing the
key proves is validated again, no ``describe``, no DLPack. A miss validates in full
(``validate``), runs ``forward_call`` / ``backward_call`` and keeps their plan when it is
cacheable (otherwise a None entry sends later calls with that key straight to the validated
path). Anything else returns ``MISS`` and the caller takes the validated path: NumPy inputs,
torch.compile tracing, unusual option types (``api`` folds parametric sparse masks into the
window before it calls here).

Block masks (``sparse_mask`` of ``dense``, forward without a gradient): the plan's block-list
arrays are inputs like q/k/v (``layout.SPARSE_INPUTS``), their pointers patched per call. A
mask's *sparse token* (cached on the mask per library and device: ``_sparse_token``) holds an
interned signature of everything the plan depends on (the mask's class, seqlens, batch/head
dims, the window of its parametric part, the block mask's class, block size and dims, and
every list array's dtype/shape/strides: list widths derived from contents are in the shapes)
and the arrays' pointers. The arrays are those the validated path reads: an immutable mask's
uploads (cached on the mask, so the pointers hold), an ``&`` of block masks merged once on
the intersection, a DynamicMask's live buffers read in place (the pointers stay, ``update``
rewrites the contents, and a hit reads them as they are at launch). A mask whose lists are
not on the query's device, or a DynamicMask whose lists are host copies (NumPy buffers), has
no token: MISS. A call that wants a gradient gets its own plan (the key's sparse entry is
(id, True)) where the lists tile the forward and backward kernels (``lists_fit``; else the
key goes to the validated path); ``_Call`` carries its lists (a DynamicMask's copied per
forward) into the backward plan, whose lists and block grid (``sp_grid``) are patched too.

The KV-cache API (``kvcache``): its key adds the caches, the appended rows, the block table,
``cache_seqlens`` (an int by value: it is in the records), ``num_splits``; its plan holds the
append, decode and combine launches (inputs ``layout.KV_INPUTS``); inference only.

torch with a gradient wanted runs ``_Attention`` (an ``autograd.Function`` whose one output is
``out``; ``_AttentionLse`` when lse is returned too: in eager mode it costs a fraction of the
custom op's dispatch); torch.compile keeps tracing the custom ops of ``autograd``. Both run
the same plans, so the results are the same bits.

CUDA graphs: a hit allocates only through the caller's library (torch's allocator, so a graph's
private pool during capture) and launches on its current stream; nothing syncs or reads device
memory. A miss may compile and load kernels: warm up before capturing, as with any library.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Callable
from typing import Any

try:
    import torch
except ImportError:  # torch is optional
    torch = None

from . import arrays, edge, env, runtime, scratch
from .arrays import describe
from .backward import backward_call, finisher
from .forward import forward_call
from .launch_plan import Plan, PlanCache
from .layout import SPARSE_INPUTS
from .masks import DynamicMask, SparseMask
from .sparse_plan import (
    SparseArrays,
    device_lists,
    fold_window,
    forward_takes_lists,
    lists_fit,
    lists_kept,
    split_sparse,
)
from .validate import Problem, check_dense, check_flags, check_sparse, check_varlen

MISS = object()       # "take the validated path"
_ABSENT = object()
HITS = [0, 0]         # calls served by a cached forward / backward plan (tools/bench reads it)

# key -> _Entry (a cacheable plan) or None (a signature the thin path leaves to the validated
# path); bounded, least recently used first out. Backward plans hang off their forward entry.
forward_plans = PlanCache(512)


@dataclasses.dataclass(eq=False)
class _Entry:
    plan: Plan = dataclasses.field(repr=False)
    pb: Problem = dataclasses.field(repr=False)  # the first call's problem (stale pointers)
    lse: bool            # the plan allocates lse
    allocs: list[Any] | None = dataclasses.field(default=None, repr=False)  # bound allocators
    finish: Any = dataclasses.field(default=None, repr=False)  # backward.finisher, bound
    run: Any = dataclasses.field(default=None, repr=False)     # _runner, bound at first hit
    # a forward entry's backward plans: (dout, dlse signatures, need_dbias) -> _Entry | None
    bwd: dict[tuple, Any] = dataclasses.field(default_factory=dict, repr=False)


_MAX_BWD_PER_FWD = 16


def clear() -> None:
    """Forget every cached plan (tests that edit the family table call this)."""
    forward_plans.clear()
    backward_plans.clear()


# --- signatures --------------------------------------------------------------------------

if torch is not None:
    _TORCH_TYPES = (torch.Tensor, torch.nn.Parameter)
    _grad_enabled = torch.is_grad_enabled
    _compiling = torch.compiler.is_compiling
else:
    _TORCH_TYPES = ()

_cupy_ndarray: list[type] = []


def _library(x: Any) -> str | None:
    """'torch' / 'cupy' for the exact array types the thin path takes, else None."""
    t = type(x)
    if t in _TORCH_TYPES:
        return "torch"
    if not _cupy_ndarray and "cupy" in sys.modules:
        _cupy_ndarray.append(sys.modules["cupy"].ndarray)
    if _cupy_ndarray and t is _cupy_ndarray[0]:
        return "cupy"
    return None


def _tsig(x: Any) -> tuple | None:
    if x is None:
        return None
    return (x.dtype, x.shape, x.stride(), x.device, x.data_ptr() & 15)


def _csig(x: Any) -> tuple | None:
    if x is None:
        return None
    data = x.data   # its device_id: what x.device.id gives, without a Device object
    return (x.dtype, x.shape, x.strides, data.device_id, data.ptr & 15)


def _tsigs(xs: tuple, ptrs: list[int]) -> tuple:
    """``_tsig`` of each of ``xs`` (None where absent) in one pass; their pointers (0 where
    absent) are appended to ``ptrs``: a hit launches with them. (``_tsig``'s tuple written
    out: on the hit path each pointer is read once, and no call per array.)"""
    sigs = []
    for x in xs:
        if x is None:
            sigs.append(None)
            ptrs.append(0)
        else:
            p = x.data_ptr()
            ptrs.append(p)
            sigs.append((x.dtype, x.shape, x.stride(), x.device, p & 15))
    return tuple(sigs)


def _csigs(xs: tuple, ptrs: list[int]) -> tuple:
    """``_tsigs`` for CuPy arrays (``_csig``'s tuple written out, one pass)."""
    sigs = []
    for x in xs:
        if x is None:
            sigs.append(None)
            ptrs.append(0)
        else:
            data = x.data
            p = data.ptr
            ptrs.append(p)
            sigs.append((x.dtype, x.shape, x.strides, data.device_id, p & 15))
    return tuple(sigs)


_FLAG_TYPES = (bool, type(None))
_NUM_TYPES = (float, int, type(None))


def _options_ok(scale: Any, is_causal: Any, window: Any, softcap: Any, return_lse: Any,
                deterministic: Any) -> bool:
    """Option values whose equality in a key implies equal validation (``1 == True`` and
    ``[-1, -1]`` is unhashable, so such calls take the validated path)."""
    return (type(is_causal) in _FLAG_TYPES and type(return_lse) is bool
            and type(deterministic) in _FLAG_TYPES and type(scale) in _NUM_TYPES
            and type(softcap) in _NUM_TYPES and type(window) is tuple and len(window) == 2
            and type(window[0]) is int and type(window[1]) is int)


def _wants_grad(q: Any, k: Any, v: Any, bias: Any) -> bool:
    return _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                or (bias is not None and bias.requires_grad))


# --- block masks -------------------------------------------------------------------------

_sparse_sigs: dict[tuple, int] = {}   # a sparse signature -> its small id (keys stay short)
_sparse_lock = threading.Lock()
_TOKEN_ATTR = "_dmattn_thin_token"
_LIST_FIELDS = tuple(f[3:] for f in SPARSE_INPUTS)   # SparseArrays fields, pointer order


def _sparse_id(sig: tuple) -> int:
    with _sparse_lock:
        return _sparse_sigs.setdefault(sig, len(_sparse_sigs))


class _Token:
    """A block mask as the thin path serves it to calls of one library on one device: the
    small id of its signature, its lists' pointers in ``SPARSE_INPUTS`` order (0 where
    absent), the lists themselves (None for a parametric mask), whether they are a
    DynamicMask's live buffers, whether it may be kept on the mask (its lists outlive the
    call: live buffers, or the upload the mask keeps), and (made at the first call that wants
    a gradient) the lists as torch tensors."""
    __slots__ = ("id", "ptrs", "arrays", "dynamic", "kept", "tensors")

    def __init__(self, sig_id: int, ptrs: list[int], arrs: SparseArrays | None,
                 dynamic: bool, kept: bool = True) -> None:
        self.id, self.ptrs, self.arrays, self.dynamic = sig_id, ptrs, arrs, dynamic
        self.kept = kept
        self.tensors: SparseArrays | None = None


def _sparse_token(mask: Any, lib: str, dev: Any, query: Any) -> _Token | None:
    """The ``_Token`` of ``mask`` for calls of ``lib`` on device ``dev`` (the key's device
    entry), cached on the mask; None when the thin path cannot serve the mask (see the module
    docstring)."""
    if not isinstance(mask, SparseMask):
        return None
    tokens = mask.__dict__.get(_TOKEN_ATTR)
    if tokens is not None:
        tok = tokens.get((lib, dev), _ABSENT)
        if tok is not _ABSENT:
            return tok
    try:
        tok = _make_token(mask, query)
    except (ValueError, TypeError, NotImplementedError, RuntimeError):
        return None     # not remembered: the validated path reports it on every call
    if tok is not None and not tok.kept:
        return tok      # lists uploaded for this call only (a private pool's): not kept
    mask.__dict__.setdefault(_TOKEN_ATTR, {})[(lib, dev)] = tok
    return tok


def _make_token(mask: SparseMask, query: Any) -> _Token | None:
    win, block = split_sparse(mask)   # merges an `&` of block masks once (cached on it)
    head = (type(mask), mask.seqlen_q, mask.seqlen_k, mask.batch_heads, win)
    if block is None:                 # parametric only (one api did not fold): no lists
        return _Token(_sparse_id(head + (None,)), [], None, False)
    qinfo = describe(query)
    arrs = device_lists(block, query)
    if isinstance(block, DynamicMask) and arrs.full_count is not \
            block.device_lists().full_count:
        return None                   # host buffers: uploaded afresh on every call
    infos = [None if a is None else describe(a) for a in (getattr(arrs, f) for f in _LIST_FIELDS)]
    if qinfo.device < 0 or any(i is not None and (i.kind == "numpy" or i.device != qinfo.device)
                               for i in infos):
        return None
    sig = head + (type(block), tuple(int(n) for n in block.block_size), block.batch_heads,
                  arrs.block_m, arrs.block_n,
                  tuple(None if i is None else (i.dtype, i.shape, i.strides) for i in infos))
    dynamic = isinstance(block, DynamicMask)
    return _Token(_sparse_id(sig), [0 if i is None else i.ptr for i in infos], arrs, dynamic,
                  dynamic or lists_kept(block, query, arrs))


def _grad_lists(tok: _Token | None) -> tuple[SparseArrays | None, list[int]]:
    """(lists, their pointers) for one call of ``tok``'s mask that wants a gradient: its
    forward and backward read them. A DynamicMask's live buffers are copied (torch's current
    stream), so an ``update()`` before ``backward()`` does not change the gradient, as
    ``autograd._block_mask_inputs`` does; other masks' lists are read in place."""
    if tok is None or tok.arrays is None:
        return None, _NO_PTRS
    arrs = tok.tensors
    if arrs is None:  # torch views of the lists (CuPy buffers of a DynamicMask), made once
        arrs = tok.tensors = _as_torch(tok.arrays)
    if not tok.dynamic:
        return arrs, tok.ptrs
    copies = [None if x is None else x.clone() for x in
              (getattr(arrs, f) for f in _LIST_FIELDS)]
    return (SparseArrays(*copies, block_m=arrs.block_m, block_n=arrs.block_n),
            [0 if x is None else x.data_ptr() for x in copies])


def _as_torch(arrs: SparseArrays) -> SparseArrays:
    """``arrs`` with every array a torch tensor (CuPy ones viewed through DLPack, no copy)."""
    return dataclasses.replace(arrs, **{
        f: x if x is None or isinstance(x, torch.Tensor) else torch.from_dlpack(x)
        for f in _LIST_FIELDS for x in (getattr(arrs, f),)})


# --- running a plan ----------------------------------------------------------------------

_FRESH, _COUNTER, _TWIN = 0, -1, -2   # _allocators' kinds (> 0: a scratch workspace's bytes)


def _allocators(entry: _Entry, lib: str, like: Any) -> list[tuple[Any, int, tuple]]:
    """Per plan allocation: (allocator, _FRESH, ()) for a fresh buffer; (None, _TWIN, ()) for
    one ``torch.empty_like`` of the call's query makes (``_twin``); for a scratch workspace
    (allocator of n bytes, its bytes, scratch owner); for a counter (zero-filling allocator,
    _COUNTER, scratch owner and words)."""
    fns = entry.allocs
    if fns is None:
        owner = (lib, entry.plan.device)
        fns = entry.allocs = [
            (_bytes_allocator(like), 4 * a.shape[0], owner) if a.scratch else
            (arrays.allocator(like, a.shape, a.dtype, True), _COUNTER,
             owner + a.shape + (a.name,))
            if a.counter else
            (None, _TWIN, ()) if _twin(lib, like, a) else
            (arrays.allocator(like, a.shape, a.dtype, a.zero), _FRESH, ())
            for a in entry.plan.allocs]
    return fns


def _twin(lib: str, like: Any, a: Any) -> bool:
    """Whether ``torch.empty_like(query)`` makes allocation ``a`` (cheaper than torch.empty of
    a shape): an uninitialized buffer of the query's shape and dtype where the query is
    C-contiguous. The key fixes the query's dtype, shape and strides, so this holds for every
    hit of the plan."""
    if lib != "torch" or a.zero or tuple(a.shape) != tuple(like.shape):
        return False
    if a.dtype is not None and arrays.torch_dtype(a.dtype) != like.dtype:
        return False
    return like.stride() == arrays.c_strides(a.shape)


def _bytes_allocator(like: Any) -> Any:
    make = arrays.sized_allocator(like, "float32")
    return lambda nbytes: make(-(-nbytes // 4))


def _runner(entry: _Entry, lib: str, like: Any) -> Callable[..., list[Any]]:
    """``entry``'s plan bound for calls of library ``lib`` (``like``: an array of such a call;
    the key fixes library, device and dtypes, so the binding holds for every hit): a function
    of the call's input pointers (``plan.inputs`` order, 0 where absent) that allocates the
    plan's buffers (scratch workspaces and counters from ``scratch``), patches every pointer,
    launches on the current stream and returns the buffers (the caller keeps them alive past
    the launches). ``query``: the call's query (twins are made like it); ``extra``: the
    pointers of the plan's further inputs (block lists)."""
    plan = entry.plan
    dev, execute, stream_ptr = plan.device, plan.execute, runtime.stream_ptr
    makers = tuple(_allocators(entry, lib, like))
    pointers = _torch_pointers if lib == "torch" else _cupy_pointers
    empty_like = torch.empty_like if torch is not None else None
    if any(n not in (_FRESH, _TWIN) for _, n, _ in makers):
        get, counter = scratch.get, scratch.counter

        def run(ptrs: list[int], query: Any, extra: list[int] = _NO_PTRS) -> list[Any]:
            stream = stream_ptr(lib, dev)
            cap = runtime.stream_capturing(stream)   # once for every workspace of the call
            bufs = [make() if n == _FRESH else empty_like(query) if n == _TWIN else
                    get(owner, stream, n, make, cap) if n > 0 else
                    counter(owner, stream, make, cap)
                    for make, n, owner in makers]
            execute(ptrs + extra + pointers(bufs), stream)
            return bufs
        return run
    fresh = tuple(make for make, _, _ in makers)

    def run_fresh(ptrs: list[int], query: Any, extra: list[int] = _NO_PTRS) -> list[Any]:
        bufs = [empty_like(query) if make is None else make() for make in fresh]
        execute(ptrs + extra + pointers(bufs), stream_ptr(lib, dev))
        return bufs
    return run_fresh


_NO_PTRS: list[int] = []   # never mutated
_NO_CU = (0, 0)            # dense calls: no cu_seqlens pointers


def _torch_pointers(xs: Any) -> list[int]:
    return [0 if x is None else x.data_ptr() for x in xs]


def _cupy_pointers(xs: Any) -> list[int]:
    return [0 if x is None else x.data.ptr for x in xs]


def _bind(entry: _Entry, lib: str, like: Any) -> Callable[..., list[Any]]:
    entry.run = _runner(entry, lib, like)
    return entry.run


def _validated_kernel_problem(key: tuple, validate: Callable[[], Problem]) -> Problem | None:
    """``validate()``'s Problem where the kernels serve it; None (and ``key`` remembered as not
    cacheable) for another backend or an empty problem (edge.py answers those)."""
    pb = validate()
    if pb.backend != "cuda" or edge.nothing_to_compute(pb):
        forward_plans.put(key, None)
        return None
    return pb


def _build_forward(key: tuple, q: Any, cu_q: Any, cu_k: Any, need_lse: bool,
                   validate: Callable[[], Problem],
                   block_of: Callable[[], Any] | None = None) -> Any:
    """A first call with ``key``: validate (``validate()`` -> Problem, the window of a
    sparse mask's parametric part folded in), run ``forward_call`` (``block_of()`` after
    ``validate()``: the block mask left, or None) and keep its plan; (out, lse), or MISS when
    the validated path must run."""
    pb = _validated_kernel_problem(key, validate)
    if pb is None:
        return MISS
    block = None if block_of is None else block_of()
    if block is not None and not forward_takes_lists(pb.head_dim, pb.mask is not None):
        forward_plans.put(key, None)   # the validated path ANDs its dense form into attn_mask
        return MISS
    out, lse, plan = forward_call(pb, q, cu_q, cu_k, return_lse=need_lse, sparse=block)
    forward_plans.put(key, _Entry(plan, pb, need_lse) if plan is not None and plan.cacheable
                      else None)
    return out, lse


class _Call:
    """One autograd call: the forward entry (None until the forward plan is cached), the
    validated problem, the inputs that get no gradient, the cache key, whether lse is an
    output (else it is only saved for the backward), and a block mask's lists that this call's
    forward and backward read (None without) with their pointers (``SPARSE_INPUTS`` order):
    held here until the backward, as the custom op saves them."""
    __slots__ = ("entry", "pb", "deterministic", "mask", "cu_q", "cu_k", "key", "lse",
                 "sparse", "sp_ptrs")

    def __init__(self, entry: _Entry | None, pb: Problem, deterministic: bool, mask: Any,
                 cu_q: Any, cu_k: Any, key: tuple, lse: bool,
                 sparse: SparseArrays | None = None, sp_ptrs: list[int] = _NO_PTRS) -> None:
        self.entry, self.pb, self.deterministic = entry, pb, deterministic
        self.mask, self.cu_q, self.cu_k, self.key, self.lse = mask, cu_q, cu_k, key, lse
        self.sparse, self.sp_ptrs = sparse, sp_ptrs


def _exec_backward(entry: _Entry, lib: str, dout: Any, dlse: Any, q: Any, k: Any, v: Any,
                   mask: Any, bias: Any, cu_q: Any, cu_k: Any, out: Any, lse: Any,
                   sp_ptrs: list[int] = _NO_PTRS) -> tuple[Any, Any, Any, Any]:
    """A cached backward plan on this call's arrays (``sp_ptrs``: its block lists'
    pointers): allocate, patch, launch, finish."""
    HITS[1] += 1
    finish = entry.finish
    if finish is None:
        finish = entry.finish = finisher(entry.plan, q)
    run = entry.run or _bind(entry, lib, q)
    pointers = _torch_pointers if lib == "torch" else _cupy_pointers
    # dQ is cast out of the workspace here, on the same stream, before another call can
    # reuse it (scratch)
    return finish(run(pointers((q, k, v, mask, bias, cu_q, cu_k, out, lse, dout, dlse)), q,
                      sp_ptrs))


def _run_backward(call: _Call, dout: Any, dlse: Any, q: Any, k: Any, v: Any, mask: Any,
                  bias: Any, cu_q: Any, cu_k: Any, out: Any, lse: Any,
                  need_dbias: bool) -> tuple[Any, Any, Any, Any]:
    if dout.dtype != q.dtype:
        dout = dout.to(q.dtype)
    plans = call.entry.bwd if call.entry is not None else None
    bkey = (_tsig(dout), _tsig(dlse), need_dbias)
    entry = _ABSENT if plans is None else plans.get(bkey, _ABSENT)
    if entry is not None and entry is not _ABSENT:
        return _exec_backward(entry, "torch", dout, dlse, q, k, v, mask, bias, cu_q, cu_k, out,
                              lse, call.sp_ptrs)
    # validated once at the forward; the problem of this call's own arrays
    pb = dataclasses.replace(call.pb, q=describe(q), k=describe(k), v=describe(v),
                             mask=None if mask is None else describe(mask),
                             bias=None if bias is None else describe(bias))
    grads, plan = backward_call(pb, dout, q, k, v, out, lse, cu_q, cu_k, dlse,
                                call.deterministic, need_dbias, call.sparse)
    if entry is _ABSENT and plans is not None:
        if len(plans) >= _MAX_BWD_PER_FWD:
            plans.clear()
        plans[bkey] = _Entry(plan, pb, False) if plan is not None and plan.cacheable else None
    return grads


if torch is not None:
    def _attention_forward(ctx: Any, q: Any, k: Any, v: Any, bias: Any, call: _Call
                           ) -> tuple[Any, Any]:
        entry = call.entry
        if entry is None:
            out, lse, plan = forward_call(call.pb, q, call.cu_q, call.cu_k, return_lse=True,
                                          sparse=call.sparse)
            if plan is not None and plan.cacheable:
                call.entry = _Entry(plan, call.pb, True)
            forward_plans.put(call.key, call.entry)
        else:
            HITS[0] += 1
            bufs = (entry.run or _bind(entry, "torch", q))(
                _torch_pointers((q, k, v, call.mask, bias, call.cu_q, call.cu_k)), q,
                call.sp_ptrs)
            out, lse = bufs[0], bufs[1]
        # saved (not just held) so that an in-place change before backward() raises
        ctx.save_for_backward(q, k, v, bias, out, lse, call.mask, call.cu_q, call.cu_k)
        ctx.call = call
        return out, lse

    def _attention_backward(ctx: Any, dout: Any, dlse: Any) -> tuple[Any, ...]:
        q, k, v, bias, out, lse, mask, cu_q, cu_k = ctx.saved_tensors
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, db = _run_backward(ctx.call, dout, dlse, q, k, v, mask, bias, cu_q, cu_k,
                                       out, lse, need_dbias)
        return dq, dk, dv, (db if need_dbias else None), None

    class _Attention(torch.autograd.Function):
        """Eager autograd over the thin path (the custom ops serve torch.compile); one output,
        ``out`` (lse is saved for the backward, not an output: less autograd work per step)."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, bias: Any, call: _Call) -> Any:
            return _attention_forward(ctx, q, k, v, bias, call)[0]

        @staticmethod
        def backward(ctx: Any, dout: Any) -> tuple[Any, ...]:
            return _attention_backward(ctx, dout, None)

    class _AttentionLse(torch.autograd.Function):
        """``_Attention`` with ``(out, lse)`` as outputs (return_lse=True: lse takes a
        gradient too)."""

        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, v: Any, bias: Any, call: _Call
                    ) -> tuple[Any, Any]:
            ctx.set_materialize_grads(False)
            return _attention_forward(ctx, q, k, v, bias, call)

        @staticmethod
        def backward(ctx: Any, dout: Any, dlse: Any) -> tuple[Any, ...]:
            return _attention_backward(ctx, dout, dlse)

    # ``Function.apply`` minus its Python wrapper (signature binding for setup_context, which
    # neither class defines; dead functorch wrappers unwrapped here the same way); with a
    # functorch transform active the full ``apply`` runs (and refuses, as before).
    _apply_base = (super(torch.autograd.Function, _Attention).apply,
                   super(torch.autograd.Function, _AttentionLse).apply)
    _transforms_active = torch._C._are_functorch_transforms_active
    _unwrap = getattr(torch._C._functorch, "unwrap_if_dead", None)

    def _apply(q: Any, k: Any, v: Any, bias: Any, call: _Call) -> Any:
        if _unwrap is None or _transforms_active():
            return (_AttentionLse if call.lse else _Attention).apply(q, k, v, bias, call)
        return _apply_base[call.lse](_unwrap(q), _unwrap(k), _unwrap(v),
                                     None if bias is None else _unwrap(bias), call)


def _build_autograd(key: tuple, q: Any, k: Any, v: Any, mask: Any, bias: Any, cu_q: Any,
                    cu_k: Any, return_lse: bool, deterministic: Any,
                    validate: Callable[[], Problem], tok: _Token | None = None) -> Any:
    """The first call with ``key`` that wants a gradient: ``out`` or ``(out, lse)`` through
    ``_Attention`` / ``_AttentionLse`` (whose forward builds and keeps the plan), or MISS.
    ``tok``: a block mask's token; its lists serve the call where they tile the forward and
    backward kernels (``lists_fit``, as ``autograd`` decides), else the key is remembered as
    the validated path's (which ANDs the mask's dense form into attn_mask)."""
    pb = _validated_kernel_problem(key, validate)
    if pb is None:
        return MISS
    if tok is not None and tok.arrays is not None and not lists_fit(
            (tok.arrays.block_m, tok.arrays.block_n), pb.dtype, pb.head_dim,
            pb.mask is not None):
        forward_plans.put(key, None)
        return MISS
    return _apply(q, k, v, bias, _Call(None, pb, bool(deterministic), mask, cu_q, cu_k, key,
                                       return_lse, *_grad_lists(tok)))


def _build(k: tuple, grad: bool, q: Any, key: Any, v: Any, mask: Any, bias: Any, cu_q: Any,
           cu_k: Any, return_lse: Any, deterministic: Any,
           validate: Callable[[], Problem]) -> Any:
    """The first call of ``dense``/``varlen`` with key ``k`` (without a sparse mask): through
    autograd when it needs a gradient, else the forward alone; ``out`` or ``(out, lse)``, or
    MISS."""
    if grad:
        return _build_autograd(k, q, key, v, mask, bias, cu_q, cu_k, return_lse,
                               deterministic, validate)
    res = _build_forward(k, q, cu_q, cu_k, return_lse, validate)
    if res is MISS:
        return MISS
    return res if return_lse else res[0]


# --- public entries -------------------------------------------------------------------------

def dense(query: Any, key: Any, value: Any, attn_mask: Any, attn_bias: Any, softmax_scale: Any,
          is_causal: Any, window_size: Any, softcap: Any, return_lse: Any, deterministic: Any,
          backend: Any, sparse_mask: Any = None) -> Any:
    """``flash_dmattn_func`` through the thin path (``sparse_mask``: as the caller got it,
    parametric masks already folded), or MISS."""
    lib = _library(query)
    if lib is None or not _options_ok(softmax_scale, is_causal, window_size, softcap,
                                      return_lse, deterministic):
        return MISS
    if lib == "torch" and _compiling():
        return MISS
    sp_ptrs = _NO_PTRS
    tok = None
    ptrs: list[int] = []
    try:
        grad = lib == "torch" and _wants_grad(query, key, value, attn_bias)
        sigs = (_tsigs if lib == "torch" else _csigs)(
            (query, key, value, attn_mask, attn_bias), ptrs)
        sp_id: Any = None
        if sparse_mask is not None:
            if backend == "reference":
                return MISS
            tok = _sparse_token(sparse_mask, lib, sigs[0][3], query)
            if tok is None:
                return MISS
            sp_ptrs = tok.ptrs
            # with a gradient its own plan: lists only where they tile the backward too
            sp_id = (tok.id, True) if grad else tok.id
        k = (0, lib, sigs, softmax_scale, is_causal, window_size, softcap, return_lse or grad,
             return_lse, deterministic, backend, env.plan_state(), sp_id)
    except (AttributeError, RuntimeError):
        # mixed kinds, or tensors a torch.func transform wraps (their data_ptr raises): the
        # validated path takes the call
        return MISS
    entry = forward_plans.get(k, _ABSENT)
    if entry is None:
        return MISS
    if entry is not _ABSENT:   # a hit: nothing validated
        if grad:
            return _apply(query, key, value, attn_bias, _Call(
                entry, entry.pb, bool(deterministic), attn_mask, None, None, k, return_lse,
                *_grad_lists(tok)))
        HITS[0] += 1
        ptrs += _NO_CU
        bufs = (entry.run or _bind(entry, lib, query))(ptrs, query, sp_ptrs)
        return (bufs[0], bufs[1]) if return_lse else bufs[0]

    block = None

    def validate() -> Problem:
        nonlocal block
        pb = check_dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                         window_size, softcap, backend)
        check_flags(return_lse, bool(deterministic))
        check_sparse(sparse_mask, pb)
        pb, block = fold_window(pb, sparse_mask)   # as dispatch.dense does
        return pb

    if sparse_mask is None:
        return _build(k, grad, query, key, value, attn_mask, attn_bias, None, None, return_lse,
                      deterministic, validate)
    if grad:
        return _build_autograd(k, query, key, value, attn_mask, attn_bias, None, None,
                               return_lse, deterministic, validate, tok)
    res = _build_forward(k, query, None, None, return_lse, validate, lambda: block)
    if res is MISS:
        return MISS
    return res if return_lse else res[0]


def varlen(query: Any, key: Any, value: Any, cu_seqlens_q: Any, cu_seqlens_k: Any,
           max_seqlen_q: Any, max_seqlen_k: Any, attn_mask: Any, attn_bias: Any,
           softmax_scale: Any, is_causal: Any, window_size: Any, softcap: Any, return_lse: Any,
           deterministic: Any, backend: Any) -> Any:
    """``flash_dmattn_varlen_func`` through the thin path, or MISS."""
    lib = _library(query)
    if lib is None or not _options_ok(softmax_scale, is_causal, window_size, softcap,
                                      return_lse, deterministic) \
            or type(max_seqlen_q) is not int or type(max_seqlen_k) is not int:
        return MISS
    if lib == "torch" and _compiling():
        return MISS
    ptrs: list[int] = []
    try:
        grad = lib == "torch" and _wants_grad(query, key, value, attn_bias)
        sigs = (_tsigs if lib == "torch" else _csigs)(
            (query, key, value, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k), ptrs)
        k = (1, lib, sigs, max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, window_size,
             softcap, return_lse or grad, return_lse, deterministic, backend, env.plan_state())
    except (AttributeError, RuntimeError):  # as in dense
        return MISS
    entry = forward_plans.get(k, _ABSENT)
    if entry is None:
        return MISS
    if entry is not _ABSENT:   # as in dense
        if grad:
            return _apply(query, key, value, attn_bias, _Call(
                entry, entry.pb, bool(deterministic), attn_mask, cu_seqlens_q, cu_seqlens_k, k,
                return_lse))
        HITS[0] += 1
        bufs = (entry.run or _bind(entry, lib, query))(ptrs, query)
        return (bufs[0], bufs[1]) if return_lse else bufs[0]

    def validate() -> Problem:
        pb = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, attn_mask, attn_bias, softmax_scale, is_causal,
                          window_size, softcap, backend)
        check_flags(return_lse, bool(deterministic))
        return pb

    return _build(k, grad, query, key, value, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k,
                  return_lse, deterministic, validate)


def kvcache(query: Any, k_cache: Any, v_cache: Any, k: Any, v: Any, cache_seqlens: Any,
            block_table: Any, attn_mask: Any, attn_bias: Any, softmax_scale: Any,
            is_causal: Any, window_size: Any, softcap: Any, num_splits: Any, return_lse: Any,
            backend: Any, call: Callable[..., tuple[Any, Any, Any]]) -> Any:
    """``flash_dmattn_with_kvcache`` through the thin path, or MISS. ``call`` is the validated
    call (``kvcache.kvcache_call``: result, plan or None, Problem), run on these arguments on
    a first call with this key. The key holds an int ``cache_seqlens`` by
    value (it is in the records); the plan's inputs are ``layout.KV_INPUTS``."""
    lib = _library(query)
    if lib is None or not _options_ok(softmax_scale, is_causal, window_size, softcap,
                                      return_lse, None) or type(num_splits) is not int:
        return MISS
    if lib == "torch" and _compiling():
        return MISS
    # an int (or None) cache_seqlens is in the key by value; an array by its signature (in
    # ``sigs``, where an int leaves None)
    seq_int: Any = None
    seqlens_arr = None
    if cache_seqlens is None or type(cache_seqlens) is int:
        seq_int = cache_seqlens
    else:
        seqlens_arr = cache_seqlens
    ptrs: list[int] = []
    try:
        # the plan's inputs in order (layout.KV_INPUTS); cu_seqlens absent
        sigs = (_tsigs if lib == "torch" else _csigs)(
            (query, k_cache, v_cache, attn_mask, attn_bias, None, None, seqlens_arr,
             block_table, k, v), ptrs)
        key = (2, lib, sigs, seq_int, softmax_scale, is_causal, window_size, softcap,
               num_splits, return_lse, backend, env.plan_state())
    except (AttributeError, RuntimeError):  # mixed kinds: the validated path says so
        return MISS
    entry = forward_plans.get(key, _ABSENT)
    if entry is None:
        return MISS
    if entry is not _ABSENT:
        HITS[0] += 1
        bufs = (entry.run or _bind(entry, lib, query))(ptrs, query)
        return (bufs[0], bufs[1]) if return_lse else bufs[0]
    res, plan, pb = call(query, k_cache, v_cache, k, v, cache_seqlens, block_table, attn_mask,
                         attn_bias, softmax_scale, is_causal, window_size, softcap, num_splits,
                         return_lse, backend)
    forward_plans.put(key, _Entry(plan, pb, return_lse) if plan is not None and plan.cacheable
                      else None)
    return res


# --- the functional backward (flash_dmattn_backward / _varlen_backward) --------------------

backward_plans = PlanCache(256)


def functional_backward_key(dout: Any, query: Any, key: Any, value: Any, out: Any, lse: Any,
                            cu_q: Any, cu_k: Any, max_q: Any, max_k: Any, attn_mask: Any,
                            attn_bias: Any, softmax_scale: Any, is_causal: Any, window_size: Any,
                            softcap: Any, deterministic: Any, backend: Any, dlse: Any,
                            bias_grad: Any) -> tuple | None:
    """The plan key of a functional backward call, or None when it takes the validated path
    only (a NumPy or mixed call, unusual option types, torch.compile tracing)."""
    lib = _library(query)
    if lib is None or type(bias_grad) is not bool or not _options_ok(
            softmax_scale, is_causal, window_size, softcap, False, deterministic):
        return None
    if lib == "torch" and _compiling():
        return None
    if max_q is not None and (type(max_q) is not int or type(max_k) is not int):
        return None
    sig = _tsig if lib == "torch" else _csig
    try:
        return (2, lib, sig(dout), sig(query), sig(key), sig(value), sig(out), sig(lse),
                sig(dlse), sig(attn_mask), sig(attn_bias), sig(cu_q), sig(cu_k), max_q, max_k,
                softmax_scale, is_causal, window_size, softcap, deterministic, backend,
                bias_grad, env.plan_state())
    except (AttributeError, RuntimeError):  # as in dense
        return None


def functional_backward(bkey: tuple | None, dout: Any, query: Any, key: Any, value: Any,
                        out: Any, lse: Any, cu_q: Any, cu_k: Any, attn_mask: Any,
                        attn_bias: Any, dlse: Any) -> Any:
    """(dq, dk, dv, dbias) through the cached plan of ``bkey``, or MISS."""
    if bkey is None:
        return MISS
    entry = backward_plans.get(bkey)
    if entry is None:
        return MISS
    return _exec_backward(entry, bkey[1], dout, dlse, query, key, value, attn_mask, attn_bias,
                          cu_q, cu_k, out, lse)


def build_functional_backward(bkey: tuple | None, pb: Problem, dout: Any, query: Any, key: Any,
                              value: Any, out: Any, lse: Any, cu_q: Any, cu_k: Any, dlse: Any,
                              deterministic: bool, need_dbias: bool
                              ) -> tuple[Any, Any, Any, Any]:
    """A validated functional backward (dout and out already in the query dtype): run it and
    keep its plan under ``bkey`` when a later call with that key would build the same one
    (no cast of dout / out was needed, no copies)."""
    dout2, out2 = arrays.cast(dout, pb.dtype), arrays.cast(out, pb.dtype)
    grads, plan = backward_call(pb, dout2, query, key, value, out2, lse, cu_q, cu_k, dlse,
                                deterministic, need_dbias)
    if bkey is not None and dout2 is dout and out2 is out and plan is not None \
            and plan.cacheable:
        backward_plans.put(bkey, _Entry(plan, pb, False))
    return grads
