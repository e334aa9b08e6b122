"""tools/fa4_install.sh on the CPU: stage two part dirs, cat the split wheel back, check its
sha256 (pip is skipped with FA4_SKIP_PIP=1: the wheels are for another platform)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "fa4_install.sh"
_BIG = "nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None,
                                reason="needs bash and sha256sum")


def _layout(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """.whl/partA: a small wheel, piece 00 and the sha256; .whl/partB: pieces 01, 02."""
    data = os.urandom(2500)
    a, b = tmp_path / "whl" / "partA", tmp_path / "whl" / "partB"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    (a / "flash_attn_4-4.0.0b36-py3-none-any.whl").write_bytes(b"small")
    (a / f"{_BIG}.part00").write_bytes(data[:1000])
    (b / f"{_BIG}.part01").write_bytes(data[1000:2000])
    (b / f"{_BIG}.part02").write_bytes(data[2000:])
    (a / f"{_BIG}.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {_BIG}\n")
    return a, b, data


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FA4_PARTS=str(tmp_path / "parts"), FA4_SITE=str(tmp_path / "site"),
               FA4_SKIP_PIP="1", TMPDIR=str(tmp_path))
    return subprocess.run(["bash", str(_SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def test_stage_then_install_reassembles(tmp_path):
    a, b, data = _layout(tmp_path)
    assert _run(tmp_path, "stage", str(a)).returncode == 0          # device call 1
    p = _run(tmp_path, "install", str(b))                            # device call 2
    assert p.returncode == 0, p.stderr
    assert "from 3 piece(s), sha256 ok" in p.stdout
    assert "flash_attn_4-4.0.0b36-py3-none-any.whl" in p.stdout
    out = [d for d in tmp_path.glob("fa4whl.*")]
    assert len(out) == 1 and (out[0] / _BIG).read_bytes() == data


def test_both_parts_staged_and_given_twice(tmp_path):
    a, b, data = _layout(tmp_path)
    assert _run(tmp_path, "stage", str(a), str(b)).returncode == 0
    p = _run(tmp_path, "install", str(b))          # same pieces twice: counted once
    assert p.returncode == 0 and "from 3 piece(s), sha256 ok" in p.stdout


def test_corrupt_or_missing_piece_fails(tmp_path):
    a, b, _ = _layout(tmp_path)
    (b / f"{_BIG}.part01").write_bytes(b"x" * 1000)
    assert _run(tmp_path, "stage", str(a)).returncode == 0
    p = _run(tmp_path, "install", str(b))
    assert p.returncode != 0 and "sha256 mismatch" in p.stderr
    assert not list(tmp_path.glob("fa4whl.*"))     # the temp dir is cleaned up
    p = _run(tmp_path, "install")                   # partB never arrived
    assert p.returncode != 0 and "sha256 mismatch" in p.stderr
