"""The README's promises on a machine without a GPU: every example runs and passes its own checks
(the reference backend, against independent computations), and every docs/ page the README
links exists."""

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


# every example with what it prints when its own checks pass, and (the NumPy/CuPy ones) the
# reference backend's mark: on this machine they must run there
EXAMPLES = {
    "quickstart.py": ("quickstart OK", "reference backend", "naive NumPy attention"),
    "torch_quickstart.py": ("torch quickstart OK",),
    "sparse_masks.py": ("sparse_masks OK", "reference backend"),
    "varlen_decode_kbased.py": ("varlen_decode_kbased OK", "reference backend"),
    "kvcache_decode.py": ("kvcache_decode OK", "reference backend"),
    "train_step.py": ("ok: loss", "on cpu"),
}
_NEEDS_TORCH = ("torch_quickstart.py", "train_step.py")


def test_every_example_is_run_here():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.skipif(not _no_gpu(), reason="a GPU is present: tests/gpu covers the kernels")
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_and_checks_itself(name, capsys, monkeypatch):
    """Each example runs to its own checks' success line (runpy as a script, default
    arguments), on the CPU backends."""
    if name in _NEEDS_TORCH:
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            pytest.skip("CUDA present: tests/gpu covers the kernels")
    monkeypatch.setattr("sys.argv", [name])
    runpy.run_path(str(ROOT / "examples" / name), run_name="__main__")
    out = capsys.readouterr().out
    for line in EXAMPLES[name]:
        assert line in out, (name, line)


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
