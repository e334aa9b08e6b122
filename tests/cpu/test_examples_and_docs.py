"""The README's promises on a machine without a GPU: the quickstarts run (reference backend,
checked against independent computations), and every docs/ page the README links exists."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _no_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() == 0
    except Exception:
        return True


@pytest.mark.skipif(not _no_gpu(), reason="a GPU is present: tests/gpu covers the kernels")
def test_quickstart_runs_on_reference_backend(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "reference backend" in out and "naive NumPy attention" in out
    assert "quickstart OK" in out


def test_torch_quickstart_runs(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: tests/gpu covers the kernels")
    runpy.run_path(str(ROOT / "examples" / "torch_quickstart.py"), run_name="__main__")
    assert "torch quickstart OK" in capsys.readouterr().out


def test_readme_starts_with_what_it_is_and_links_docs():
    text = (ROOT / "README.md").read_text()
    first_para = text.split("\n\n")[1]
    assert "attention" in first_para and "pip install" not in text.split("```")[0].split(
        "\n\n")[0]
    assert text.index("Flash attention") < text.index("pip install")
    links = re.findall(r"\]\(((?:docs|examples)[^)#]*)", text)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link).exists(), link
    for page in ("install", "api", "masks", "compat", "environment"):
        assert (ROOT / "docs" / f"{page}.md").exists()
    assert "../shared" not in text
