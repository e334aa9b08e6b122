"""A pytest plugin for device runs: each failure's report (and each test slower than 15 s) is
appended to files under $OUT as it happens, so a run killed by the call's time limit still
says what failed and what was slow. Use: PYTHONPATH=$PWD:$PWD/tools pytest -p failures_at_once
(tools/device_run.sh's tests step does). Files: $OUT/failures.txt, $OUT/slow.txt."""

from __future__ import annotations

import os

SLOW_S = 15.0


def _append(name: str, text: str) -> None:
    with open(os.path.join(os.environ.get("OUT", "/tmp/out"), name), "a") as f:
        f.write(text)


def pytest_runtest_logreport(report) -> None:   # noqa: ANN001  (pytest's TestReport)
    if report.failed:
        _append("failures.txt", f"==== {report.nodeid} [{report.when}]\n"
                                f"{report.longreprtext[-3000:]}\n")
    if report.when == "call" and report.duration > SLOW_S:
        _append("slow.txt", f"{report.duration:7.1f} {report.nodeid}\n")
