"""SASS fingerprints of kernel specs, to check that an A/B switch leaves the default build alone.

    PYTHONPATH=$PWD python tools/sass_hash.py [--arch sm_90] [--only SUBSTR ...]

Compiles every spec ``precompile --arch`` would build whose id contains one of the SUBSTRs
(under the current DMATTN_NVRTC_DEFINES; no disk cache), disassembles each cubin with nvdisasm
and prints ``sha256[:16]  instructions  registers  spills  advisories  spec id`` per kernel.
Run it once without and once with a define: equal hashes mean identical machine code. The hash
covers the instructions' text with mangled symbol names masked, so a kernel whose template
gained an argument still matches when its code did not change.
CuPy's NVRTC returns the ELF one byte short; a zero byte is appended before disassembling.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dmattn_cupy.compile import compile_spec
from dmattn_cupy.precompile import all_specs


def nvdisasm_path() -> str:
    """nvdisasm from PATH or the nvidia cu13/cu12 wheels beside CuPy."""
    found = shutil.which("nvdisasm")
    if found:
        return found
    for p in sys.path:
        for cu in ("cu13", "cu12", "cuda_nvcc"):
            cand = Path(p) / "nvidia" / cu / "bin" / "nvdisasm"
            if cand.exists():
                return str(cand)
    raise FileNotFoundError("nvdisasm not found (PATH or nvidia/cu13/bin)")


def sass(cubin: bytes) -> str:
    """The disassembly of a cubin (text; addresses and encodings included)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin + b"\0")
        path = f.name
    try:
        return subprocess.run([nvdisasm_path(), "-c", path], check=True, capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(path)


def instructions(text: str) -> list[str]:
    """The instruction lines of a disassembly (their text after the address comment), mangled
    names (``_Z...``) masked."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("/*") and "*/" in line:
            ins = line.split("*/", 1)[1].strip().rstrip(";")
            if ins:
                out.append(re.sub(r"_Z[A-Za-z0-9_]+", "_Z", ins))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--only", action="append", default=[], help="spec id substring (repeatable)")
    args = ap.parse_args(argv)
    for spec in all_specs(args.arch):
        if args.only and not any(s in spec.id for s in args.only):
            continue
        ck = compile_spec(spec, use_disk_cache=False)
        ins = instructions(sass(ck.cubin))
        spills = ck.spill_stores + ck.spill_loads + ck.stack_frame
        digest = hashlib.sha256("\n".join(ins).encode()).hexdigest()[:16]
        print(f"{digest}  {len(ins):6d}  regs={ck.registers} "
              f"spills={spills} adv={','.join(ck.advisories) or '-'}  {spec.id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
