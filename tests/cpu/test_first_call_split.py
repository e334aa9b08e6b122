"""tools/first_call_split.py on the CPU: each implementation runs in a new process and reports
every phase; the profile's top functions follow its timings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import first_call_split as fcs  # noqa: E402

pytest.importorskip("torch")


def test_phases_of_a_new_process():
    ph, rest = fcs.run_child("dmattn", "cpu")
    assert set(ph) == set(fcs.PHASES)
    assert all(v > 0 for v in ph.values()), ph
    assert rest == ""
    row = fcs.format_row("dmattn", ph)
    assert row.startswith("dmattn  import torch") and "first bwd" in row


def test_profile_lists_the_first_call():
    ph, text = fcs.run_child("sdpa", "cpu", top=5)
    assert ph["first_bwd_s"] > 0
    assert "cumulative" in text and "function calls" in text


def test_a_failing_child_names_itself():
    with pytest.raises(RuntimeError, match="dmattn on nodevice: exit"):
        fcs.run_child("dmattn", "nodevice")
