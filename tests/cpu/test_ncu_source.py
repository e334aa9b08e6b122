"""tools/ncu_source.py on a small synthetic source page: ranking, reasons, execution groups,
plain and gzipped input, and a clear error for other CSV files."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "tools" / "ncu_source.py"
_spec = importlib.util.spec_from_file_location("ncu_source", _PATH)
ncu_source = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ncu_source)

_HEADER = ['"Address"', '"Source"', '"Warp Stall Sampling (All Samples)"',
           '"Instructions Executed"', '"stall_barrier"', '"stall_wait"',
           '"stall_barrier (Not Issued)"']


def _page(rows: list[tuple[str, int, int, int, int]]) -> str:
    lines = ['"Kernel Name","void k()"', ",".join(_HEADER)]
    for i, (src, samples, ex, bar, wait) in enumerate(rows):
        lines.append(f'"0x{i:x}","{src}","{samples}","{ex}","{bar}","{wait}","{bar}"')
    return "\n".join(lines) + "\n"


_ROWS = [("HGMMA.64x64x16", 10, 100, 0, 9), ("BAR.SYNC 0x1, 0x100", 2, 100, 2, 0),
         ("STS [R1], R2", 60, 100, 58, 2), ("@!P0 BRA 0x10", 28, 7, 0, 28)]


@pytest.mark.parametrize("zipped", [False, True])
def test_ranks_instructions_and_groups_by_execution_count(tmp_path, capsys, zipped):
    path = tmp_path / ("src.csv.gz" if zipped else "src.csv")
    data = _page(_ROWS).encode()
    path.write_bytes(gzip.compress(data) if zipped else data)
    assert ncu_source.main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "samples 100 over 4 instructions"
    # the two instructions with most samples, most first, with their main reasons
    assert "STS [R1], R2" in out[1] and "60.0%" in out[1] and "barrier 58, wait 2" in out[1]
    assert "BRA" in out[2] and "x7" in out[2] and "wait 28" in out[2]
    groups = out[out.index("by execution count (instructions executed equally often):") + 1:]
    # the x100 group (3 instructions, 72 samples; by reason barrier 60, wait 11) first, then x7
    assert groups[0] == "  x100: 3 instructions, 72.0% of the samples: barrier 85%, wait 15%"
    assert groups[1].startswith("  x7: 1 instructions, 28.0%")


def test_other_csv_is_refused(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text('"a","b"\n"c","d"\n')
    with pytest.raises(ValueError, match="not an ncu source page"):
        ncu_source.main([str(path)])


def test_against_compares_groups_and_opcodes(tmp_path, capsys):
    """--against: per execution-count group, both kernels' instruction and sample counts and
    the opcodes whose static counts differ (predicates and modifiers stripped)."""
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text(_page(_ROWS))
    extra = [("LDS.64 R90, [R108]", 5, 100, 0, 5),
             ("@P1 IMAD.MOV.U32 R1, RZ, RZ, R2", 3, 100, 0, 3)]
    b.write_text(_page(_ROWS + extra))
    assert ncu_source.main([str(a), "--against", str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "A: 307 instructions executed, 100 samples; B: 507, 108"
    assert out[2] == "  x100: 3 vs 5 instructions, 72 vs 80 samples; IMAD 0->1, LDS 0->1"
    assert out[3] == "  x7: 1 vs 1 instructions, 28 vs 28 samples"
    assert ncu_source.opcode("@!P0 BRA 0x10") == "BRA" and ncu_source.opcode("") == ""
