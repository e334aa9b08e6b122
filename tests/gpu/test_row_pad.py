"""The row padding copy (row_pad.cu) against a byte-for-byte host model: rows of any start
alignment, pitch and width land 16 bytes apart with each row's tail past its width zeroed;
bytes outside the destination rows are never written."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import run_in_a_new_thread

from dmattn_cupy import row_pad

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("offset,width,src_pitch,rows", [
    (0, 16, 16, 3),          # already aligned
    (1, 1, 1, 5),            # one byte per row, rows adjacent
    (3, 17, 19, 7),          # every alignment of the 4-byte words
    (2, 5054, 5054, 9),      # a bf16 bias row of 2527 keys
    (1, 2527, 2527, 11),     # a bool mask row of 2527 keys
    (2, 30, 64, 4),          # a view into wider rows
    (1, 333, 333, 70000),    # more rows than a grid's y dimension
])
def test_rows_copied_and_padded(offset, width, src_pitch, rows):
    g = torch.Generator().manual_seed(width + rows)
    src_bytes = offset + (rows - 1) * src_pitch + width
    src = torch.randint(0, 256, (src_bytes,), generator=g, dtype=torch.uint8).cuda()
    dst_pitch = -(-width // 16) * 16
    guard = 64  # bytes past the last row that must stay as they were
    dst = torch.full((rows * dst_pitch + guard,), 0xAB, dtype=torch.uint8, device="cuda")
    row_pad.copy_rows(src.device.index, dst.data_ptr(), dst_pitch, src.data_ptr() + offset,
                      src_pitch, width, rows, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    s, d = src.cpu().numpy(), dst.cpu().numpy()
    want = np.zeros((rows, dst_pitch), dtype=np.uint8)
    starts = offset + src_pitch * np.arange(rows)
    want[:, :width] = s[starts[:, None] + np.arange(width)[None, :]]
    np.testing.assert_array_equal(d[:rows * dst_pitch].reshape(rows, dst_pitch), want)
    assert (d[rows * dst_pitch:] == 0xAB).all()


_W, _ROWS, _PITCH = 6, 4, 16   # the thread tests' copy: 4 rows of 6 bytes into 16-byte rows


def _thread_copy_buffers():
    """The source (bytes 0, 1, ...) and a destination filled with 0xAB, synchronized."""
    src = torch.arange(_W * _ROWS, dtype=torch.uint8, device="cuda")
    dst = torch.full((_ROWS * _PITCH,), 0xAB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    return src, dst


def _assert_thread_copy(dst) -> None:
    torch.cuda.synchronize()
    want = np.zeros((_ROWS, _PITCH), dtype=np.uint8)
    want[:, :_W] = np.arange(_W * _ROWS, dtype=np.uint8).reshape(_ROWS, _W)
    np.testing.assert_array_equal(dst.cpu().numpy().reshape(_ROWS, _PITCH), want)


def test_copy_from_a_thread_without_a_current_context(monkeypatch):
    """A new thread has no CUDA context bound to it (torch's autograd thread neither, until a
    runtime call of its own): a launch of an already loaded kernel there (a backward's first
    launch, row_pad's copy of an odd-Sk bias tile) binds the device's primary context first
    (runtime.launch_raw): no launch fails with CUDA_ERROR_INVALID_CONTEXT, not even once
    before a retry (compute-sanitizer reports each failed API call)."""
    from dmattn_cupy import runtime

    raw = runtime._raw or runtime._bind_raw()
    launch_kernel, driver_error = raw[0], raw[3]
    failed: list[int] = []

    def counted(*a):
        try:
            return launch_kernel(*a)
        except driver_error as e:
            failed.append(e.status)
            raise

    monkeypatch.setattr(runtime, "_raw", [counted, *raw[1:]])
    src, dst = _thread_copy_buffers()
    args = (src.device.index, dst.data_ptr(), _PITCH, src.data_ptr(), _W, _W, _ROWS, 0)
    row_pad.copy_rows(*args)   # loads the kernel in this thread
    torch.cuda.synchronize()
    dst.fill_(0xAB)
    torch.cuda.synchronize()
    run_in_a_new_thread(lambda: row_pad.copy_rows(*args))
    assert failed == []
    _assert_thread_copy(dst)


def test_launch_through_cupy_from_a_thread_without_a_current_context():
    """runtime.launch (a kernel launched by CuPy: the validated path's launches) as a new
    thread's first CUDA call: it binds the device's primary context first, as launch_raw
    does, instead of failing with CUDA_ERROR_INVALID_CONTEXT (it has no retry)."""
    from dmattn_cupy import runtime
    from dmattn_cupy.params import ROW_PAD_DTYPE

    src, dst = _thread_copy_buffers()
    dev = src.device.index
    kernel = runtime.get_kernel(row_pad.pad_spec(runtime.device_props(dev).arch), dev)
    rec = np.zeros(1, dtype=ROW_PAD_DTYPE)
    rec["src"], rec["dst"] = src.data_ptr(), dst.data_ptr()
    rec["src_pitch"], rec["dst_pitch"], rec["rows"], rec["width"] = _W, _PITCH, _ROWS, _W
    run_in_a_new_thread(lambda: runtime.launch(kernel, row_pad.grid(_PITCH, _ROWS), (rec[0],),
                                               None, 0))
    _assert_thread_copy(dst)
