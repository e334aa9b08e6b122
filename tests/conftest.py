"""Shared by every test directory: ``tools/`` on ``sys.path``, so tests import the tools they
drive (``host_profile``'s GPU stub, ``call_fuzz``'s random calls) by name."""

from __future__ import annotations

import sys
from pathlib import Path

_TOOLS = str(Path(__file__).resolve().parents[1] / "tools")
if _TOOLS not in sys.path:
    sys.path.insert(0, _TOOLS)
