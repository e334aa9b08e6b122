"""The test tree itself: pytest imports test modules by basename (no packages here), so two
test files with one name in tests/cpu and tests/gpu make `pytest tests` fail to collect."""

from collections import Counter
from pathlib import Path


def test_test_file_basenames_are_unique():
    root = Path(__file__).resolve().parents[1]
    names = Counter(p.name for p in root.rglob("test_*.py"))
    dupes = sorted(n for n, c in names.items() if c > 1)
    assert dupes == [], "rename one file of each pair"
