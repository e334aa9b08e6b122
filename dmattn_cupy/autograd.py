"""torch integration: ``dmattn_cupy::fwd`` / ``dmattn_cupy::bwd`` custom ops (torch.library)
with fake implementations and autograd, so ``out.backward()`` works and
``torch.compile(fullgraph=True)`` traces a model that calls the public functions.

``api`` routes torch inputs here when a gradient is wanted (grad mode on and an input requires
grad) or while torch.compile traces (a sparse mask's lists then come from the torch form
``mask_tensors`` attached to it when it was built); this module never imports ``api``. torch
is optional: when it is installed it is imported with this module and the ops are registered
then, at package import (torch.compile cannot trace a registration, and a model may be
compiled before its first eager call). Registration needs only torch.library: importing this
module must not import torch._dynamo (seconds of import time; test_import_cost checks it).
Their real implementations run ``dispatch`` / ``bwd_api`` under ``torch.no_grad()`` (CUDA
kernels for GPU tensors, the float64 reference for CPU tensors). Eager calls run the same
implementations through an autograd Function (``_EagerAttention``) rather than the ops: an op's
first call imports torch._dynamo.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any

try:
    import torch
except ImportError:  # torch is optional: without it, no torch tensor ever reaches this module
    torch = None

from . import dispatch, fastpath
from .arrays import array_kind
from .backward import run_backward
from .bwd_api import flash_dmattn_backward, flash_dmattn_varlen_backward
from .forward import run_forward
from .mask_tensors import TRACED_ATTR, lists_to_dense
from .masks import DynamicMask, SparseMask
from .sparse_plan import (
    arrays_from_list,
    arrays_to_list,
    autograd_lists,
    lists_fit,
    split_sparse,
    tighter_window,
)
from .validate import (
    Problem,
    check_dense,
    check_flags,
    check_options,
    check_sparse,
    check_sparse_dims,
    check_varlen,
)

_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? bias, Tensor? cu_q, "
               "Tensor? cu_k, int max_q, int max_k, float scale, int window_left, "
               "int window_right, float softcap, bool deterministic, str backend, "
               "Tensor[] sparse, int sp_block_m, int sp_block_n) -> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
               "Tensor? dlse, Tensor? mask, Tensor? bias, Tensor? cu_q, Tensor? cu_k, "
               "int max_q, int max_k, float scale, int window_left, int window_right, "
               "float softcap, bool deterministic, bool need_dbias, str backend, "
               "Tensor[] sparse, int sp_block_m, int sp_block_n) "
               "-> (Tensor, Tensor, Tensor, Tensor)")
# ``sparse``: a block mask's lists on the query's device (sparse_plan.arrays_to_list order),
# empty without one; the window of parametric masks is already folded into window_*.
_N_FWD_INPUTS = 18
_SNAPSHOT_SCHEMA = "(Tensor[] lists) -> Tensor[]"

# The Problem an eager call validated, handed to the op it calls (so that call is validated
# once); None under torch.compile, where the op validates its real inputs itself.
_validated: contextvars.ContextVar[Problem | None] = contextvars.ContextVar(
    "dmattn_validated", default=None)


def _fwd_impl(q, k, v, mask, bias, cu_q, cu_k, max_q, max_k, scale, window_left, window_right,
              softcap, deterministic, backend, sparse, sp_block_m, sp_block_n):
    window = (window_left, window_right)
    pb = _validated.get()
    with torch.no_grad():
        if not sparse:  # a repeated signature (every call of a compiled graph): its cached plan
            res = fastpath.dense(q, k, v, mask, bias, scale, False, window, softcap, True,
                                 deterministic, backend) if cu_q is None else \
                fastpath.varlen(q, k, v, cu_q, cu_k, max_q, max_k, mask, bias, scale, False,
                                window, softcap, True, deterministic, backend)
            if res is not fastpath.MISS:
                return res
        if pb is None:
            if cu_q is None:
                pb = check_dense(q, k, v, mask, bias, scale, False, window, softcap, backend)
            else:
                pb = check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, mask, bias, scale, False,
                                  window, softcap, backend)
        if sparse:
            return run_forward(pb, q, return_lse=True,
                               sparse=arrays_from_list(sparse, sp_block_m, sp_block_n))
        if cu_q is None:
            return dispatch.dense(q, k, v, mask, bias, scale, False, window, softcap, None, True,
                                  deterministic, backend, pb=pb)
        return dispatch.varlen(q, k, v, cu_q, cu_k, max_q, max_k, mask, bias, scale, False,
                               window, softcap, True, deterministic, backend, pb=pb)


def _lse_shape(q, cu_q):
    return (q.shape[1], q.shape[0]) if cu_q is not None else (q.shape[0], q.shape[2], q.shape[1])


def _fwd_fake(q, k, v, mask, bias, cu_q, cu_k, max_q, max_k, scale, window_left, window_right,
              softcap, deterministic, backend, sparse, sp_block_m, sp_block_n):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_q), dtype=torch.float32)


def _bwd_impl(dout, q, k, v, out, lse, dlse, mask, bias, cu_q, cu_k, max_q, max_k, scale,
              window_left, window_right, softcap, deterministic, need_dbias, backend, sparse,
              sp_block_m, sp_block_n):
    opts = dict(attn_mask=mask, attn_bias=bias, softmax_scale=scale,
                window_size=(window_left, window_right), softcap=softcap,
                deterministic=deterministic, backend=backend, dlse=dlse, bias_grad=need_dbias)
    with torch.no_grad():
        if sparse:
            pb = check_dense(q, k, v, mask, bias, scale, False, (window_left, window_right),
                             softcap, backend)
            dq, dk, dv, db = run_backward(
                pb, dout.to(q.dtype), q, k, v, out, lse, dlse=dlse, deterministic=deterministic,
                need_dbias=need_dbias and bias is not None,
                sparse=arrays_from_list(sparse, sp_block_m, sp_block_n))
        elif cu_q is None:
            dq, dk, dv, db = flash_dmattn_backward(dout, q, k, v, out, lse, **opts)
        else:
            dq, dk, dv, db = flash_dmattn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                                          max_q, max_k, **opts)
    return dq, dk, dv, (db if db is not None else q.new_empty((0,)))


def _bwd_fake(dout, q, k, v, out, lse, dlse, mask, bias, cu_q, cu_k, max_q, max_k, scale,
              window_left, window_right, softcap, deterministic, need_dbias, backend, sparse,
              sp_block_m, sp_block_n):
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


def _snapshot_impl(lists):
    return [x.clone() for x in lists]


def _snapshot_fake(lists):
    return [torch.empty_like(x) for x in lists]


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, cu_q, cu_k = inputs[:7]
    sparse = inputs[15]
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, bias, cu_q, cu_k, out, lse, *sparse)
    ctx.opts = inputs[7:15]
    ctx.sp_block = inputs[16:18]
    # an output the loss never reached gets None, not zeros: an unused lse adds no dlse term
    # to the backward (and a bias constant over keys keeps its exact zero gradient)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse, bwd=None):
    """The fwd op's registered autograd (``bwd``: the bwd op; the eager Function passes its
    implementation)."""
    q, k, v, mask, bias, cu_q, cu_k, out, lse = ctx.saved_tensors[:9]
    sparse = list(ctx.saved_tensors[9:])
    max_q, max_k, scale, wl, wr, softcap, deterministic, backend = ctx.opts
    need_dbias = bias is not None and ctx.needs_input_grad[4]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, db = (bwd or torch.ops.dmattn_cupy.bwd)(
        dout, q, k, v, out, lse, dlse, mask, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr,
        softcap, deterministic, need_dbias, backend, sparse, *ctx.sp_block)
    grads = [dq, dk, dv, None, db if need_dbias else None] + [None] * (_N_FWD_INPUTS - 5)
    grads[15] = [None] * len(sparse)  # the Tensor[] input's gradient keeps its structure
    return tuple(grads)


if torch is not None:
    class _EagerAttention(torch.autograd.Function):
        """The fwd op's autograd in eager mode, without the ops: their implementations, saved
        and differentiated exactly as the registration does (_setup_context, _backward).
        torch.library runs an op's implementation through ``_disable_dynamo``, whose first
        call imports torch._dynamo (~1.5 s of a first call; nothing is traced in eager), and
        its registered autograd cannot run under torch.func transforms (grad, vjp: that
        Function has no setup_context), where this one does. vmap and forward-mode transforms
        are not supported (torch says so)."""

        @staticmethod
        def forward(*args: Any) -> Any:
            return _fwd_impl(*args)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            _setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, dout: Any, dlse: Any) -> tuple[Any, ...]:
            # a torch.func transform's wrapped tensors reach the implementation through the
            # op, which unwraps them (the forward gets them unwrapped)
            wrapped = torch._C._functorch.is_functorch_wrapped_tensor(ctx.saved_tensors[0])
            with torch.no_grad():  # no derivative of the backward
                grads = list(_backward(ctx, dout, dlse, None if wrapped else _bwd_impl))
            grads[15] = None  # the block lists: a list input, not a tensor
            return tuple(grads)


def _register_ops() -> None:
    fwd = torch.library.custom_op("dmattn_cupy::fwd", mutates_args=(),
                                  schema=_FWD_SCHEMA)(_fwd_impl)
    fwd.register_fake(_fwd_fake)
    bwd = torch.library.custom_op("dmattn_cupy::bwd", mutates_args=(),
                                  schema=_BWD_SCHEMA)(_bwd_impl)
    bwd.register_fake(_bwd_fake)
    fwd.register_autograd(_backward, setup_context=_setup_context)
    # A copy inductor cannot see through: its joint-graph passes erase an ``aten.clone`` whose
    # result has its input's metadata (``remove_noop_ops``), and the partitioner then saves
    # the clone's input, a DynamicMask's live buffer, for the backward. A custom op is neither
    # erased nor recomputed in the backward (not in the partitioner's recompute allowlist).
    torch.library.custom_op("dmattn_cupy::snapshot", mutates_args=(),
                            schema=_SNAPSHOT_SCHEMA)(_snapshot_impl).register_fake(_snapshot_fake)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def wants_autograd(query: Any, *others: Any) -> bool:
    """True for torch inputs while torch.compile traces, or when a gradient is wanted."""
    if array_kind(query) != "torch":
        return False
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (query, *others))


def _call_fwd(pb: Problem | None, *args: Any) -> Any:
    """The fwd op while torch.compile traces, else its eager Function (``pb``: the validated
    problem, None while tracing)."""
    op = torch.ops.dmattn_cupy.fwd if _compiling() else _EagerAttention.apply
    if pb is None:  # torch.compile traces this (it cannot trace ContextVar.set)
        return op(*args)
    token = _validated.set(pb)
    try:
        return op(*args)
    finally:
        _validated.reset(token)


def dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal, window_size,
          softcap, sparse_mask, return_lse, deterministic, backend):
    """``flash_dmattn_func`` through the custom op (tracked by autograd, traceable)."""
    pb = None
    if not _compiling():  # full validation on real tensors (eager)
        pb = check_dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                         window_size, softcap, backend)
        check_flags(return_lse, deterministic)
        check_sparse(sparse_mask, pb)
    scale, cap, window = (pb.scale, pb.softcap, pb.window) if pb is not None else \
        check_options(softmax_scale, softcap, window_size, is_causal, query.shape[-1])
    sparse, sp_block = [], (0, 0)
    if query.numel() == 0 or key.shape[1] == 0:
        sparse_mask = None  # nothing to compute: the ops return empty/zero results (edge.py)
    if sparse_mask is not None and _compiling():
        # constants while tracing (dynamo guards on grad mode and on the inputs' requires_grad)
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad
            for x in (query, key, value, attn_bias))
        window, sparse, sp_block, attn_mask = _traced_mask_inputs(
            sparse_mask, attn_mask, query, key, backend, window, needs_grad)
    elif sparse_mask is not None:
        win, block = split_sparse(sparse_mask)
        window = tighter_window(window, win)
        if block is not None:
            sparse, sp_block, dense_mask = _block_mask_inputs(block, attn_mask, query, backend)
            if dense_mask is not attn_mask:  # the op sees another mask: it validates it
                attn_mask, pb = dense_mask, None
    if pb is not None:
        pb = dataclasses.replace(pb, window=window)
    out, lse = _call_fwd(pb, query, key, value, attn_mask, attn_bias, None, None, 0, 0, scale,
                         window[0], window[1], cap, deterministic, backend, sparse, *sp_block)
    return (out, lse) if return_lse else out


def _block_mask_inputs(block, attn_mask, query, backend):
    """(lists, block size, attn_mask) for a block mask: on CUDA, when its blocks tile the
    kernels, its lists on the query's device (a DynamicMask's copied, so updating it before
    ``backward()`` does not change the gradient); otherwise no lists and its dense form ANDed
    into ``attn_mask``."""
    arrs, mask = autograd_lists(block, attn_mask, query, _kernel_device(query, backend),
                                query.shape[-1], str(query.dtype).split(".")[-1])
    if arrs is None:
        return [], (0, 0), mask
    items = [x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)
             for x in arrays_to_list(arrs)]
    if isinstance(block, DynamicMask):
        items = [x.clone() for x in items]
    return items, (arrs.block_m, arrs.block_n), mask


def _lists_fit_constant(block_size: tuple[int, int], dtype: Any, head_dim: int,
                        has_mask: bool) -> bool:
    """``lists_fit`` on constants (torch.compile calls it while tracing)."""
    return lists_fit(block_size, str(dtype).removeprefix("torch."), head_dim, has_mask)


# What ``torch.compiler.assume_constant_result`` sets on a function (the attribute dynamo
# reads): dynamo then calls the function on constants instead of tracing it. Set here by hand
# because the public decorator imports torch._dynamo (1.2 s of a 2.6 s import here, and
# seconds more on the GPU machine); tests/cpu/test_import_cost.py checks that the installed
# torch's decorator sets exactly this attribute.
DYNAMO_CONSTANT_ATTR = "_dynamo_marked_constant"


def _kernel_device(query, backend) -> bool:
    """Whether the CUDA kernels run the call (the CPU tests patch it to trace that route)."""
    return query.is_cuda and backend != "reference"


def _traced_mask_inputs(sparse_mask, attn_mask, query, key, backend, window, needs_grad):
    """(window, lists, block size, attn_mask) of a mask while torch.compile traces, from the
    torch form its constructor attached (``mask_tensors``): its tensors are graph inputs, the
    rest constants. Same routing as eager: lists on CUDA when they tile the kernels, else the
    exact dense form (torch ops) ANDed into attn_mask. With ``needs_grad``, a DynamicMask's
    tensors go through ``dmattn_cupy::snapshot`` first, so the backward graph reads the
    forward's copy, not the live buffers an ``update()`` before ``backward()`` rewrites."""
    traced = getattr(sparse_mask, TRACED_ATTR, None) if isinstance(sparse_mask, SparseMask) \
        else None
    if traced is None:
        raise TypeError(f"sparse_mask must be a dmattn_cupy mask object (CausalMask, "
                        f"BlockBitsetMask, ...), got {type(sparse_mask).__name__}")
    check_sparse_dims(sparse_mask, query.shape[0], query.shape[2], query.shape[1],
                      key.shape[1])
    win, flat, error = traced
    if error is not None:
        raise NotImplementedError(error)
    window = tighter_window(window, win)
    if flat is None:
        return window, [], (0, 0), attn_mask
    tensors, meta = flat
    items = [t.to(query.device) for t in tensors]
    if meta.kind == "DynamicMask" and needs_grad:  # not a clone: see _register_ops
        items = list(torch.ops.dmattn_cupy.snapshot(items))
    if _kernel_device(query, backend) and _lists_fit_constant(
            meta.block_size, query.dtype, query.shape[-1], attn_mask is not None):
        return window, items, meta.block_size, attn_mask
    dense = lists_to_dense(items, meta)
    return window, [], (0, 0), dense if attn_mask is None else dense & attn_mask


def varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
           attn_bias, softmax_scale, is_causal, window_size, softcap, return_lse, deterministic,
           backend):
    """``flash_dmattn_varlen_func`` through the custom op."""
    pb = None
    if not _compiling():
        pb = check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, attn_mask, attn_bias, softmax_scale, is_causal,
                          window_size, softcap, backend)
        check_flags(return_lse, deterministic)
    scale, cap, window = (pb.scale, pb.softcap, pb.window) if pb is not None else \
        check_options(softmax_scale, softcap, window_size, is_causal, query.shape[-1])
    out, lse = _call_fwd(pb, query, key, value, attn_mask, attn_bias, cu_seqlens_q, cu_seqlens_k,
                         int(max_seqlen_q), int(max_seqlen_k), scale, window[0], window[1], cap,
                         deterministic, backend, [], 0, 0)
    return (out, lse) if return_lse else out


if torch is not None:
    _register_ops()
    setattr(_lists_fit_constant, DYNAMO_CONSTANT_ATTR, True)
