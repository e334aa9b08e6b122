"""torch integration: ``dmattn_cupy::fwd`` / ``dmattn_cupy::bwd`` custom ops (torch.library)
with fake implementations and autograd, so ``out.backward()`` works and
``torch.compile(fullgraph=True)`` traces a model that calls the public functions.

``api.flash_dmattn_func`` routes torch inputs here when a gradient is wanted (grad mode on and
an input requires grad) or while torch.compile traces. The ops' real implementations call the
public functions under ``torch.no_grad()`` (CUDA kernels for GPU tensors, the float64 reference
for CPU tensors), so validation and dispatch are those of the plain calls.
"""

from typing import Any

import torch

from .validate import check_options

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


@torch.library.custom_op("dmattn_cupy::fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd(q, k, v, mask, bias, cu_q, cu_k, max_q, max_k, scale, window_left, window_right,
         softcap, deterministic, backend, sparse, sp_block_m, sp_block_n):
    from .api import flash_dmattn_func, flash_dmattn_varlen_func

    opts = dict(softmax_scale=scale, window_size=(window_left, window_right), softcap=softcap,
                return_lse=True, backend=backend)
    with torch.no_grad():
        if sparse:
            from .launch import run_forward
            from .sparse_plan import arrays_from_list
            from .validate import check_dense

            pb = check_dense(q, k, v, mask, bias, scale, False, (window_left, window_right),
                             softcap, backend)
            return run_forward(pb, q, return_lse=True,
                               sparse=arrays_from_list(sparse, sp_block_m, sp_block_n))
        if cu_q is None:
            return flash_dmattn_func(q, k, v, mask, bias, **opts)
        return flash_dmattn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, mask, bias, **opts)


def _lse_shape(q, cu_q):
    return (q.shape[1], q.shape[0]) if cu_q is not None else (q.shape[0], q.shape[2], q.shape[1])


@_fwd.register_fake
def _fwd_fake(q, k, v, mask, bias, cu_q, cu_k, max_q, max_k, scale, window_left, window_right,
              softcap, deterministic, backend, sparse, sp_block_m, sp_block_n):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_q), dtype=torch.float32)


@torch.library.custom_op("dmattn_cupy::bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd(dout, q, k, v, out, lse, dlse, mask, bias, cu_q, cu_k, max_q, max_k, scale, window_left,
         window_right, softcap, deterministic, need_dbias, backend, sparse, sp_block_m,
         sp_block_n):
    from .bwd_api import flash_dmattn_backward, flash_dmattn_varlen_backward

    opts = dict(attn_mask=mask, attn_bias=bias, softmax_scale=scale,
                window_size=(window_left, window_right), softcap=softcap,
                deterministic=deterministic, backend=backend, dlse=dlse, bias_grad=need_dbias)
    with torch.no_grad():
        if sparse:
            from .backward import run_backward
            from .sparse_plan import arrays_from_list
            from .validate import check_dense

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


@_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, dlse, mask, bias, cu_q, cu_k, max_q, max_k, scale,
              window_left, window_right, softcap, deterministic, need_dbias, backend, sparse,
              sp_block_m, sp_block_n):
    db = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), db


_N_FWD_INPUTS = 18


def _setup_context(ctx, inputs, output):
    q, k, v, mask, bias, cu_q, cu_k = inputs[:7]
    sparse = inputs[15]
    out, lse = output
    ctx.save_for_backward(q, k, v, mask, bias, cu_q, cu_k, out, lse, *sparse)
    ctx.opts = inputs[7:15]
    ctx.sp_block = inputs[16:18]


def _backward(ctx, dout, dlse):
    q, k, v, mask, bias, cu_q, cu_k, out, lse = ctx.saved_tensors[:9]
    sparse = list(ctx.saved_tensors[9:])
    max_q, max_k, scale, wl, wr, softcap, deterministic, backend = ctx.opts
    need_dbias = bias is not None and ctx.needs_input_grad[4]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, db = torch.ops.dmattn_cupy.bwd(dout, q, k, v, out, lse, dlse, mask, bias, cu_q,
                                               cu_k, max_q, max_k, scale, wl, wr, softcap,
                                               deterministic, need_dbias, backend, sparse,
                                               *ctx.sp_block)
    grads = [dq, dk, dv, None, db if need_dbias else None] + [None] * (_N_FWD_INPUTS - 5)
    grads[15] = [None] * len(sparse)  # the Tensor[] input's gradient keeps its structure
    return tuple(grads)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def wants_autograd(query: Any, *others: Any) -> bool:
    """True for torch inputs while torch.compile traces, or when a gradient is wanted."""
    if not isinstance(query, torch.Tensor):
        return False
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (query, *others))


def dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal, window_size,
          softcap, sparse_mask, return_lse, deterministic, backend):
    """``flash_dmattn_func`` through the custom op (tracked by autograd, traceable)."""
    if not torch.compiler.is_compiling():  # full validation on real tensors (eager)
        from .api import _check_flags, _check_sparse
        from .validate import check_dense

        pb = check_dense(query, key, value, attn_mask, attn_bias, softmax_scale, is_causal,
                         window_size, softcap, backend)
        _check_flags(return_lse, deterministic)
        _check_sparse(sparse_mask, pb)
    scale, cap, window = check_options(softmax_scale, softcap, window_size, is_causal,
                                       query.shape[-1])
    sparse, sp_block = [], (0, 0)
    if query.numel() == 0 or key.shape[1] == 0:
        sparse_mask = None  # nothing to compute: the ops return empty/zero results (edge.py)
    if sparse_mask is not None:
        from .sparse_plan import bound_min, split_sparse

        win, block = split_sparse(sparse_mask)
        window = (bound_min(window[0], win[0]), bound_min(window[1], win[1]))
        if block is not None:
            if torch.compiler.is_compiling():
                raise NotImplementedError("dmattn_cupy: block-sparse masks under torch.compile "
                                          "are not supported; pass sparse_mask.to_dense() as "
                                          "attn_mask")
            sparse, sp_block, attn_mask = _block_mask_inputs(block, attn_mask, query, backend)
    out, lse = torch.ops.dmattn_cupy.fwd(query, key, value, attn_mask, attn_bias, None, None, 0, 0,
                                         scale, window[0], window[1], cap, deterministic, backend,
                                         sparse, *sp_block)
    return (out, lse) if return_lse else out


def _block_mask_inputs(block, attn_mask, query, backend):
    """(lists, block size, attn_mask) for a block mask: on CUDA, when its blocks tile the
    backward kernels too, its lists on the query's device (a DynamicMask's copied, so updating
    it before ``backward()`` does not change the gradient); otherwise no lists and its dense
    form ANDed into ``attn_mask``."""
    from .backward import sparse_fits_backward
    from .bwd_api import _dense_sparse_mask
    from .launch import sparse_buffers, sparse_supported
    from .spec import padded_head_dim

    hd = query.shape[-1]
    lists_ok = (query.is_cuda and backend != "reference"
                and sparse_supported(padded_head_dim(hd), attn_mask is not None, False)
                and sparse_fits_backward(block.block_size, str(query.dtype).split(".")[-1], hd))
    if not lists_ok:
        return [], (0, 0), _dense_sparse_mask(block, attn_mask, query)
    from .masks import DynamicMask
    from .sparse_plan import arrays_to_list

    arrs = sparse_buffers(block, query)
    items = [x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)
             for x in arrays_to_list(arrs)]
    if isinstance(block, DynamicMask):
        items = [x.clone() for x in items]
    return items, (arrs.block_m, arrs.block_n), attn_mask


def varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
           attn_bias, softmax_scale, is_causal, window_size, softcap, return_lse, deterministic,
           backend):
    """``flash_dmattn_varlen_func`` through the custom op."""
    if not torch.compiler.is_compiling():
        from .api import _check_flags
        from .validate import check_varlen

        check_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     attn_mask, attn_bias, softmax_scale, is_causal, window_size, softcap,
                     backend)
        _check_flags(return_lse, deterministic)
    scale, cap, window = check_options(softmax_scale, softcap, window_size, is_causal,
                                       query.shape[-1])
    out, lse = torch.ops.dmattn_cupy.fwd(query, key, value, attn_mask, attn_bias, cu_seqlens_q,
                                         cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                         scale, window[0], window[1], cap, deterministic, backend,
                                         [], 0, 0)
    return (out, lse) if return_lse else out
