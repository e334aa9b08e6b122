"""GPU test helpers: float64 copies, FlashAttention's tolerance rule, a call on a new thread."""

from __future__ import annotations

import threading

import numpy as np

from dmattn_cupy import reference

# assert_fa_close: outputs smaller than this take a second low-precision reference, P rounded
# against the max of each KEY_BLOCK keys
FEW_OUTPUTS = 4096
KEY_BLOCK = 16


def f64(x):
    """float64 (or bool) NumPy copy of a torch tensor / CuPy array / None."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        t = x.detach()
        return (t.double() if t.dtype.is_floating_point else t).cpu().numpy()
    import cupy

    return cupy.asnumpy(x).astype(np.float64) if x.dtype.kind == "f" else cupy.asnumpy(x)


def run_in_a_new_thread(fn):
    """``fn()`` on a new thread (no CUDA context bound to it until its first call): its
    result, or what it raised raised here."""
    got: list = []

    def run() -> None:
        try:
            got.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            got.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(got[0], BaseException):
        raise got[0]
    return got[0]


def assert_fa_close(out, lse, ref_args: dict, dtype: str, varlen: bool = False, cu=None,
                    eps: float = 1e-4, forward=None) -> None:
    """FlashAttention's rule: max|out - ref| <= 2 * max|out_lowprec_ref - ref| + eps, with ref
    in float64 and out_lowprec_ref the same reference computed in the input's precision.
    An output of under FEW_OUTPUTS elements takes the larger error of two such references:
    P rounded against the row's max and against each KEY_BLOCK keys' own max (a split's or a
    decode warp's partial; ``reference.rounded_p``). Over so few elements the max of one
    reference's rounding error is a noisy sample (random call 35001996: 8 outputs, the
    decode kernel's 16-key warps 7.41e-4 off, the row-max reference 3.17e-4, the 16-key one
    7.41e-4 exactly). ``forward``: the reference function (default: the dense or varlen
    one), called with ``ref_args`` and optionally ``lowprec`` and ``key_block``."""
    fn = forward or (reference.varlen_forward if varlen else reference.dense_forward)
    ref, ref_lse = fn(**ref_args)
    o = f64(out)
    assert np.isfinite(o).all(), "output has NaN/inf"
    err = np.abs(o - ref).max() if o.size else 0.0
    orders = (None, KEY_BLOCK) if o.size < FEW_OUTPUTS else (None,)
    low_err = max(np.abs(fn(**ref_args, lowprec=dtype, key_block=kb)[0] - ref).max()
                  if o.size else 0.0 for kb in orders)
    tol = 2 * low_err + eps
    assert err <= tol, f"max|out-ref| = {err:.3e} > {tol:.3e}"
    if lse is not None:
        got = f64(lse)
        both_inf = np.isneginf(got) & np.isneginf(ref_lse)
        assert (np.isneginf(got) == np.isneginf(ref_lse)).all(), "lse -inf rows differ"
        diff = np.abs(np.where(both_inf, 0.0, got - np.where(both_inf, 0.0, ref_lse)))
        assert diff.max(initial=0.0) <= 2e-3 * (1 + np.abs(np.where(both_inf, 0, ref_lse)).max(
            initial=0.0)), f"lse max err {diff.max():.3e}"
