"""The thin launch path against the validated path over random valid calls
(tools/call_fuzz.good_case), the GPU stubbed and launches captured as in test_fastpath.py.

Each case is first launched alone from an empty plan cache (the validated path's launches);
then all cases run twice each in a shuffled order through one cache: forwards, forwards with
their backward through autograd, functional backwards. Every call must launch what the
validated path launched for it: a signature key that failed to tell two calls apart would
hand one call another's plan, which on a GPU is a silently wrong answer. Pointers are
compared by role (``_comparable``): the buffers a call allocates have new addresses on every
call."""

from __future__ import annotations

import contextlib
import random
import threading

import numpy as np
import pytest
from test_fastpath import Capture, cap, params_dtype  # noqa: F401  (cap: the fixture)

torch = pytest.importorskip("torch")

import call_fuzz  # noqa: E402  (tools/, on the path by tests/conftest.py)
import host_profile  # noqa: E402

from dmattn_cupy import (  # noqa: E402
    autograd,
    backward_sm90,
    fastpath,
    forward_sm90,
    row_pad,
    runtime,
)
from dmattn_cupy.params import ROW_PAD_DTYPE  # noqa: E402

_ARGS = {"fwd_sm90": forward_sm90.ARGS_DTYPE, "fwd_order": forward_sm90.ARGS_DTYPE,
         "bwd_sm90": backward_sm90.ARGS_DTYPE}

GROUP = 60   # cases per test: they share one plan cache


def _tokens(rec: np.ndarray, token: dict[int, int]) -> None:
    """``rec``'s pointer fields (u8) replaced by their tokens, new ones numbered in order."""
    for f in rec.dtype.names:
        if rec.dtype.fields[f][0].str == "<u8":
            rec[f] = token.setdefault(int(rec[f][0]), len(token))


def _comparable(launches: list, inputs: list[int]) -> list:
    """Launches with every pointer replaced by a token: a known array's (its index in
    ``inputs``: the call's inputs and returned arrays) or, for any other buffer (workspaces,
    copies, autograd's), its rank of first appearance in the launch (per launch: a buffer
    freed by one launch's caller may return at the same address for the next one's).
    Pointers are the u8 fields of the params record and of the family's argument record;
    8-byte words of the tensor maps equal to one of them get its token. Two calls then compare
    equal when they launch the same kernels with the same arguments on buffers in the same
    roles, whichever addresses those buffers have."""
    out = []
    for _path, fam, grid, raws, smem in launches:
        token: dict[int, int] = {0: 0}
        for i, p in enumerate(inputs):
            token.setdefault(p, 1000 + i)
        dtype = ROW_PAD_DTYPE if fam == "row_copy" else params_dtype(fam)
        rec = np.frombuffer(raws[0], dtype=dtype).copy()
        if "dlse" in rec.dtype.names:   # lse's gradient: None on the thin path, zeros
            rec["dlse"] = 0             # materialized by the custom op's (the same result)
        _tokens(rec, token)
        extra = list(raws[1:])
        args_dtype = _ARGS.get(fam)
        if args_dtype is not None and extra:
            args = np.frombuffer(extra[0], dtype=args_dtype).copy()
            _tokens(args, token)
            extra[0] = _with_fields(extra[0], args)
        keys = np.array(sorted(token), dtype=np.uint64)
        vals = np.array([token[k] for k in sorted(token)], dtype=np.uint64)
        words = []
        for raw in extra:
            n = len(raw) // 8 * 8
            w = np.frombuffer(raw[:n], dtype=np.uint64).copy()
            hit = np.isin(w, keys)
            w[hit] = vals[np.searchsorted(keys, w[hit])]
            words.append(w.tobytes() + raw[n:])
        out.append((fam, grid, smem, _with_fields(raws[0], rec), tuple(words)))
    return out


def _with_fields(raw: bytes, rec: np.ndarray) -> bytes:
    """``raw`` with ``rec``'s fields written over it (a structured copy's padding bytes are
    undefined, so the bytes between fields stay ``raw``'s)."""
    buf = bytearray(raw)
    for name in rec.dtype.names:
        dt, at = rec.dtype.fields[name][:2]
        buf[at:at + dt.itemsize] = rec[name][0].tobytes()
    return bytes(buf)


def _backward_operands(case) -> dict:
    """dout, out and lse arrays for a functional backward of ``case`` (values do not matter
    here: the kernels never run)."""
    q = case.kwargs["query"]
    if case.api == "varlen":
        lse_shape = (q.shape[1], q.shape[0])
    else:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    return {"dout": torch.randn(q.shape).to(q.dtype), "out": torch.randn(q.shape).to(q.dtype),
            "lse": torch.randn(lse_shape)}


def _pointers(res) -> list[int]:
    """The addresses of the arrays in ``res`` (nested tuples/lists; None skipped)."""
    if isinstance(res, torch.Tensor):
        return [res.data_ptr()]
    if isinstance(res, (tuple, list)):
        return [p for x in res for p in _pointers(x)]
    return []


def _run(case, mode: str) -> tuple[list, list[int]]:
    """One call of ``case``: "fwd" the forward, "grad" the forward and its backward through
    autograd, "fbwd" the functional backward (``case.kwargs`` then hold dout/out/lse too).
    Returns what it returned (to keep its buffers alive) and the addresses of its inputs,
    then of the arrays the library returned (the forward's out/lse, the functional
    backward's gradients): the pointers whose role ``_comparable`` names."""
    kw = dict(case.kwargs)
    inputs = [v.data_ptr() for v in kw.values() if isinstance(v, torch.Tensor)]
    dm = call_fuzz.dm
    if mode == "fbwd":
        kw.pop("return_lse", None)
        lead = [kw.pop(n) for n in ("dout", "query", "key", "value", "out", "lse")]
        fn = dm.flash_dmattn_varlen_backward if case.api == "varlen" else \
            dm.flash_dmattn_backward
        res = fn(*lead, **kw)
        return [res], inputs + _pointers(res)
    if mode == "grad":
        for n in ("query", "key", "value", "attn_bias"):
            if kw.get(n) is not None:
                kw[n] = kw[n].detach().requires_grad_(True)
        fn = dm.flash_dmattn_varlen_func if case.api == "varlen" else dm.flash_dmattn_func
        res = fn(**kw)
        out = res[0] if isinstance(res, tuple) else res
        grads = torch.autograd.grad(out.float().sum(), [kw[n] for n in (
            "query", "key", "value", "attn_bias") if kw.get(n) is not None])
        return [res, grads], inputs + _pointers(res)
    fn = {"dense": dm.flash_dmattn_func, "varlen": dm.flash_dmattn_varlen_func,
          "kv": dm.flash_dmattn_with_kvcache}[case.api]
    res = fn(**kw)
    return [res], inputs + _pointers(res)


def _fresh_arrays(case):
    """``case`` on new arrays of the same shapes, strides, dtypes and alignment (the values do
    not matter: the kernels never run)."""
    kw = {}
    for k, v in case.kwargs.items():
        if isinstance(v, torch.Tensor):
            base = torch.empty(v.untyped_storage().nbytes() // v.element_size() + 1,
                               dtype=v.dtype)
            v = base.as_strided(v.size(), v.stride(), v.storage_offset())
        kw[k] = v
    return call_fuzz.Case(case.api, kw, case.steps)


@contextlib.contextmanager
def _as_on_a_gpu(capture):
    """Inside ``stub_gpu``: the custom ops route block masks as on a GPU (the stub's CPU
    tensors are not ``is_cuda``), and row copies (``row_pad.copy_rows``, a GPU launch) are
    captured with the launches, as family "row_copy" with their record. Restores both on exit
    (whatever order the fixtures around it are torn down in)."""
    def copy_rows(device, dst, dst_pitch, src, src_pitch, width, rows, stream):
        rec = np.zeros(1, dtype=ROW_PAD_DTYPE)
        rec["src"], rec["dst"] = src, dst
        rec["src_pitch"], rec["dst_pitch"], rec["rows"], rec["width"] = (src_pitch, dst_pitch,
                                                                         rows, width)
        capture.launches.append(("copy", "row_copy", (), [rec.tobytes()], 0))

    saved = autograd._kernel_device, row_pad.copy_rows
    autograd._kernel_device = lambda query, backend: backend != "reference"
    row_pad.copy_rows = copy_rows
    try:
        yield
    finally:
        autograd._kernel_device, row_pad.copy_rows = saved


@pytest.fixture
def stubbed(request):
    """test_fastpath's ``cap``, inside ``_as_on_a_gpu``."""
    capture = request.getfixturevalue("cap")
    with _as_on_a_gpu(capture):
        yield capture


def _variants(case, r: random.Random, mode: str) -> list:
    """Calls on ``case``'s very arrays that differ from it in one option or operand (so their
    signature keys differ only there): a key that dropped that part would collide."""
    kw = case.kwargs
    changes = [{"is_causal": not kw.get("is_causal", False)},
               {"return_lse": not kw.get("return_lse", False)} if mode != "fbwd" else
               {"bias_grad": False} if kw.get("attn_bias") is not None else
               {"dlse": torch.zeros(kw["lse"].shape)},
               {"softcap": 0.0 if kw.get("softcap") else 20.0},
               {"softmax_scale": None if kw.get("softmax_scale") else 0.2},
               {"window_size": (3, 0) if kw.get("window_size", (-1, -1)) == (-1, -1)
                else (-1, -1)}]
    if case.api != "kv":
        changes.append({"deterministic": not kw.get("deterministic", False)})
    else:
        changes.append({"num_splits": 1 if kw.get("num_splits", 0) != 1 else 3})
    for name in ("attn_mask", "attn_bias"):
        if kw.get(name) is not None:
            changes.append({name: None})
    if case.api == "dense" and kw.get("sparse_mask") is not None:
        changes.append({"sparse_mask": None})
    if case.api == "varlen":
        changes.append({"max_seqlen_q": kw["max_seqlen_q"] + 2})
    if case.api == "kv" and isinstance(kw["cache_seqlens"], int) and kw["cache_seqlens"] > 0:
        changes.append({"cache_seqlens": kw["cache_seqlens"] - 1})
    out = []
    for change in r.sample(changes, min(4, len(changes))):
        out.append(call_fuzz.Case(case.api, {**kw, **change}, [repr(change)]))
    return out


def _calls(first: int, count: int, r: random.Random) -> list:
    """(case, mode, label) for random cases ``first ..`` and their variants."""
    calls = []
    for s in range(first, first + count):
        base = call_fuzz.good_case(2_000_000 + s, "cpu", call_fuzz.CPU_SIZES)
        mode = "fwd" if base.api == "kv" else ("fwd", "grad", "fbwd")[s % 3]
        if mode == "fbwd":
            base.kwargs.update(_backward_operands(base))
        for case in [base, *_variants(base, r, mode)]:
            calls.append((case, mode, f"seed {2_000_000 + s} {case.api} {mode} {case.steps}"))
    return calls


def _validated(capture, calls: list, alive: list) -> list:
    """Each call's launches from an empty plan cache, comparable (``_comparable``)."""
    want = []
    for case, mode, _ in calls:
        fastpath.clear()
        res, inputs = _run(case, mode)
        alive.append(res)
        want.append(_comparable(capture.take(), inputs))
    fastpath.clear()
    return want


@pytest.mark.parametrize("group", range(4))
def test_cached_plans_launch_what_the_validated_path_builds(stubbed, group, monkeypatch):
    # odd groups with the attn_mask route on (its packing and lists launches)
    monkeypatch.setenv("DMATTN_MASK_ROUTE", str(group % 2))
    r = random.Random(group)
    calls = _calls(group * GROUP, GROUP, r)
    alive: list = []
    want = _validated(stubbed, calls, alive)
    order = [i for i in range(len(calls)) for _ in range(2)]
    r.shuffle(order)
    thin = 0
    for i in order:
        case, mode, label = calls[i]
        res, inputs = _run(case, mode)
        alive.append(res)
        got = stubbed.take()
        thin += sum(p == "thin" for p, *_ in got)
        assert _comparable(got, inputs) == want[i], label
    assert thin >= len(calls) // 2, "the thin path served too few calls for this to test it"


class _ThreadCapture(Capture):
    """``Capture`` with each thread's launches apart."""

    def __init__(self) -> None:
        self._local = threading.local()
        super().__init__()

    @property
    def launches(self) -> list:
        return self._local.__dict__.setdefault("launches", [])

    @launches.setter
    def launches(self, value: list) -> None:
        self._local.launches = value


@pytest.fixture
def threaded(monkeypatch):
    capture = _ThreadCapture()
    with host_profile.stub_gpu():
        for name in ("get_kernel", "launch", "launch_ex", "launch_raw"):
            monkeypatch.setattr(runtime, name, getattr(capture, name))
        with _as_on_a_gpu(capture):
            fastpath.clear()
            yield capture
        monkeypatch.undo()
        fastpath.clear()


def test_threads_sharing_plans_launch_their_own_calls(threaded):
    """Four threads run the cases of one group in random orders through one plan cache (the
    plans' patch-and-launch is locked, scratch is per thread), each call on arrays of its own:
    each call launches on its own inputs and outputs."""
    calls = _calls(4 * GROUP, GROUP // 2, random.Random(7))
    alive: list = []
    want = _validated(threaded, calls, alive)
    errors: list[str] = []

    def worker(seed: int) -> None:
        r, mine = random.Random(seed), []
        try:
            for _ in range(3 * len(calls)):
                i = r.randrange(len(calls))
                case, mode, label = calls[i]
                res, inputs = _run(_fresh_arrays(case), mode)
                mine.append(res)
                if _comparable(threaded.take(), inputs) != want[i]:
                    errors.append(label)
        except Exception as e:  # noqa: BLE001  (reported below, not lost in the thread)
            errors.append(f"{type(e).__name__}: {e}")
        alive.append(mine)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
