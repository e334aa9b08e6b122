"""``python3 tools/bench [flags]``: run the benchmark (see __init__.py)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a folder: sys.path[0] is tools/bench itself; import the package from tools/
    _tools = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]
    sys.path.insert(0, _tools)
    from bench.cli import main
else:
    from .cli import main

if __name__ == "__main__":
    sys.exit(main())
