"""Calls from several Python threads at once, each thread on its own stream (a serving process,
a trainer with a thread per model replica): every result equals the result of the same call
made alone, bit for bit. Plans are shared between threads (each patches its pointers and
launches under the plan's lock) and scratch workspaces are kept per (stream, thread); a
workspace or a plan's patched arguments shared by two calls in flight would show here as a
result that differs from the lone call's.

Each thread runs its own values, two threads per shape (so per plan), through a training
step with a mask and a bias and through a split-KV decode step. The step is deterministic:
its gradients are bitwise reproducible. With torch tensors the backward runs on torch's
autograd thread, which serves every thread's graph. With CuPy arrays it is the functional
backward, on the caller's thread and stream."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from dmattn_cupy import flash_dmattn_backward, flash_dmattn_func, flash_dmattn_with_kvcache

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

THREADS = 4
ROUNDS = 3


class Inputs(NamedTuple):
    q: Any
    k: Any
    v: Any
    mask: Any
    bias: Any
    dout: Any
    q_dec: Any
    k_cache: Any
    v_cache: Any
    cache_seqlens: Any


def _inputs(i: int) -> Inputs:
    g = torch.Generator().manual_seed(4000 + i)   # each thread its own values
    j = i % 2   # threads i and i + 2 share shapes, so cached plans; 0 and 1 do not
    b, h, hk, d = 2, 4, 2, (64, 128)[j]
    s = 192 + 61 * j
    cache = 1024 + 256 * j

    def rnd(*shape: int) -> Any:
        return torch.randn(*shape, generator=g).to("cuda", torch.bfloat16)

    return Inputs(
        q=rnd(b, s, h, d), k=rnd(b, s, hk, d), v=rnd(b, s, hk, d),
        mask=(torch.rand(b, 1, s, s, generator=g) < 0.8).cuda(), bias=rnd(b, h, s, s),
        dout=rnd(b, s, h, d), q_dec=rnd(2 * b, 1, h, d), k_cache=rnd(2 * b, cache, hk, d),
        v_cache=rnd(2 * b, cache, hk, d),
        cache_seqlens=torch.randint(1, cache + 1, (2 * b,), generator=g,
                                    dtype=torch.int32).cuda())


def _step(x: Inputs) -> tuple[Any, ...]:
    """A training step's forward and backward, then a decode step over a cache (split-KV
    at these lengths), on the current stream."""
    q, k, v, bias = (t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v, x.bias))
    out, lse = flash_dmattn_func(q, k, v, attn_mask=x.mask, attn_bias=bias, return_lse=True,
                                 deterministic=True)
    grads = torch.autograd.grad(out, (q, k, v, bias), x.dout)
    dec = flash_dmattn_with_kvcache(x.q_dec, x.k_cache, x.v_cache,
                                    cache_seqlens=x.cache_seqlens)
    return (out.detach(), lse, *grads, dec)


NAMES = ("out", "lse", "dq", "dk", "dv", "dbias", "decode out")


def _check_threads(step: Any, inputs: list[Inputs], equal: Any, on_new_stream: Any,
                   sync: Any) -> None:
    """``step`` of each input alone twice (reproducible, else nothing here can tell), then
    ROUNDS times in one thread per input at once, each thread inside ``on_new_stream()`` (a
    context manager that makes a new stream current and synchronizes it on exit): every
    result ``equal`` to the lone call's."""
    alone = [step(x) for x in inputs]   # one at a time, on the default stream
    for i, x in enumerate(inputs):
        for name, a, b in zip(NAMES, alone[i], step(x), strict=True):
            assert equal(a, b), f"thread {i}'s call alone: {name} differs run to run"
    sync()
    start = threading.Barrier(len(inputs))
    got: list[list[tuple[Any, ...]]] = [[] for _ in inputs]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with on_new_stream():
                start.wait(timeout=120)   # if a thread failed before it, the rest give up
                for _ in range(ROUNDS):
                    got[i].append(step(inputs[i]))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    sync()
    for i, results in enumerate(got):
        assert len(results) == ROUNDS
        for r, res in enumerate(results):
            for name, a, b in zip(NAMES, alone[i], res, strict=True):
                assert equal(a, b), f"thread {i}, round {r}: {name} differs from alone"


@contextlib.contextmanager
def _torch_stream() -> Iterator[None]:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def test_threads_on_their_own_streams_get_the_lone_calls_results() -> None:
    _check_threads(_step, [_inputs(i) for i in range(THREADS)], torch.equal, _torch_stream,
                   torch.cuda.synchronize)


def _cupy_step(x: Inputs) -> tuple[Any, ...]:
    """_step on CuPy arrays (float16: views of the inputs' casts), on CuPy's current stream:
    the functional forward and backward, then the decode step."""
    out, lse = flash_dmattn_func(x.q, x.k, x.v, attn_mask=x.mask, attn_bias=x.bias,
                                 return_lse=True, deterministic=True)
    grads = flash_dmattn_backward(x.dout, x.q, x.k, x.v, out, lse, attn_mask=x.mask,
                                  attn_bias=x.bias, deterministic=True)
    dec = flash_dmattn_with_kvcache(x.q_dec, x.k_cache, x.v_cache,
                                    cache_seqlens=x.cache_seqlens)
    return (out, lse, *grads, dec)


def test_cupy_threads_on_their_own_streams_get_the_lone_calls_results() -> None:
    cupy = pytest.importorskip("cupy")
    inputs = [Inputs(*(cupy.from_dlpack(t.half() if t.is_floating_point() else t)
                       for t in _inputs(i))) for i in range(THREADS)]
    torch.cuda.synchronize()

    @contextlib.contextmanager
    def cupy_stream() -> Iterator[None]:
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            yield
        stream.synchronize()

    _check_threads(_cupy_step, inputs, cupy.array_equal, cupy_stream,
                   cupy.cuda.Device().synchronize)
