"""tools/sm90_timeline.py's analysis on synthetic stamps: idle shares at the start, between
items and at the end, the last items, the 24-bit wrap, and a clear error for stamps that are
not a timeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "tools" / "sm90_timeline.py"
_spec = importlib.util.spec_from_file_location("sm90_timeline", _PATH)
timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(timeline)


def _stamp(cta: int, us: float, base: int) -> int:
    """As the kernel writes it, read back as an int32."""
    v = (cta << 24) | ((base + round(us / timeline.TICK_US)) % timeline.WRAP)
    return v - (1 << 32) if v >= 1 << 31 else v


@pytest.mark.parametrize("base", [1000, timeline.WRAP - 100])   # the second wraps mid-launch
def test_idle_shares_and_last_items(base):
    # CTA 0: items 0 and 1 back to back over the whole launch; CTA 200 (int32 negative):
    # item 2 starts 10 us late, a 20 us gap, item 3 ends 30 us before the end.
    items = [(0, 0.0, 40.0), (0, 40.0, 100.0), (200, 10.0, 30.0), (200, 50.0, 70.0)]
    starts = [_stamp(c, s, base) for c, s, _ in items]
    ends = [_stamp(c, e, base) for c, _, e in items]
    r = timeline.analyze(starts, ends, last=2)
    assert r["ctas"] == 2
    assert r["span_us"] == pytest.approx(100.0, abs=0.05)
    assert r["idle_start"] == pytest.approx(10 / 200, abs=1e-3)
    assert r["idle_between"] == pytest.approx(20 / 200, abs=1e-3)
    assert r["idle_end"] == pytest.approx(30 / 200, abs=1e-3)
    assert [i for i, _, _ in r["last"]] == [1, 3]


def test_mismatched_ctas_are_refused():
    with pytest.raises(ValueError, match="not a timeline"):
        timeline.analyze([_stamp(1, 0.0, 0)], [_stamp(2, 5.0, 0)])
