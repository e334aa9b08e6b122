"""NVRTC compilation of kernel specializations, with in-process and on-disk caches.

Compiling needs no GPU: ``compile_spec(spec)`` builds a cubin for ``spec.arch`` (``sm_86``,
``sm_90a``...) on any machine with the NVRTC library. The disk key covers every file under
``cuda_src/`` (headers pulled in with -I are invisible to CuPy's own cache), the options, the
NVRTC version and the arch. Writes go to a
temporary file that is renamed into place, so concurrent processes never see a torn cubin.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import env
from .params import abi_header as params_abi_header
from .spec import KernelSpec

log = logging.getLogger("dmattn_cupy")

_BASE_OPTIONS = ("-std=c++20", "--use_fast_math", "-default-device", "--ptxas-options=-v")


def cuda_src_dir() -> Path:
    """The CUDA sources: inside the package (wheel install) or beside it (source tree)."""
    here = Path(__file__).resolve().parent
    for cand in (here / "cuda_src", here.parent / "cuda_src"):
        if (cand / "common.cuh").is_file():
            return cand
    raise FileNotFoundError(f"dmattn_cupy: cuda_src/ not found next to {here}")


def cache_dir() -> Path:
    return env.cache_dir()


def _source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".cuh", ".cu", ".h"))


@lru_cache(maxsize=8)
def _digest(root: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for p in _source_files(root):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def sources_digest() -> str:
    """sha256 over the name and bytes of every file under cuda_src/; re-read when a file's
    size or modification time changes. A header edited in a running process changes the key
    of kernels compiled after the edit; kernels the process already holds stay as they are."""
    root = cuda_src_dir()
    stamp = []
    for p in _source_files(root):
        st = p.stat()
        stamp.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return _digest(root, tuple(stamp))


def nvrtc_version() -> tuple[int, int]:
    from cupy_backends.cuda.libs import nvrtc

    return tuple(nvrtc.getVersion())  # type: ignore[return-value]


@dataclass(frozen=True)
class CompiledKernel:
    spec: KernelSpec
    arch: str
    cubin: bytes
    lowered_name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    static_smem: int
    log: str
    advisories: tuple[str, ...] = ()   # ptxas codes that mean a slow kernel (SLOW_ADVISORIES)

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack_frame > 0

    @property
    def slow(self) -> bool:
        """ptxas said the kernel works but runs slowly (e.g. wgmma serialized)."""
        return bool(self.advisories)


# ptxas advisories (Hopper) after which a kernel runs, slowly: treated as failures by
# precompile --check-spills. C7515: wgmma serialized (non-wgmma instructions define the
# accumulator); C7517: wgmma.wait_group injected; C7508: setmaxnreg ignored; C7510: another
# wgmma pipeline advisory of ptxas (all four mean a kernel that runs, slowly).
SLOW_ADVISORIES = ("C7515", "C7517", "C7508", "C7510")


def parse_advisories(text: str) -> tuple[str, ...]:
    """The SLOW_ADVISORIES codes a ptxas log mentions, each once, in order of appearance."""
    found = re.findall(r"\b(C\d{4})\b", text)
    return tuple(dict.fromkeys(c for c in found if c in SLOW_ADVISORIES))


def parse_ptxas_log(text: str) -> dict[str, int]:
    """Registers, spills, stack and static smem of the (single) entry in a ptxas -v log."""
    def grab(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
        "static_smem": grab(r"(\d+) bytes smem"),
    }


def abi_header(spec: KernelSpec) -> str:
    """The generated params_check.cuh for the params struct of the spec's family."""
    return params_abi_header(spec.row.params)


def program_source(spec: KernelSpec) -> str:
    return f'#include "params_check.cuh"\n#include "{spec.source_file}"\n'


def compile_options(spec: KernelSpec) -> tuple[str, ...]:
    opts = list(_BASE_OPTIONS)
    opts.append(f"--gpu-architecture={spec.arch}")
    opts.append(f"-I{cuda_src_dir()}")
    opts.extend(f"-D{d}" for d in env.nvrtc_defines())
    return tuple(opts)


def cache_key(spec: KernelSpec) -> str:
    opts = [o for o in compile_options(spec) if not o.startswith("-I")]
    payload = json.dumps(
        {
            "sources": sources_digest(),
            "abi": abi_header(spec),
            "options": opts,
            "nvrtc": list(nvrtc_version()),
            "arch": spec.arch,
            "spec": spec.id,
            "entry": spec.name_expression,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@contextlib.contextmanager
def _program(spec: KernelSpec, options: tuple[str, ...]) -> Iterator[tuple[Any, Any]]:
    """(CuPy's nvrtc module, the program of ``spec``) compiled with ``options``; destroyed on
    exit."""
    from cupy_backends.cuda.libs import nvrtc

    headers = (b"params_check.cuh",)
    header_src = (abi_header(spec).encode(),)
    prog = nvrtc.createProgram(
        program_source(spec), f"{spec.id}.cu", header_src, headers
    )
    try:
        nvrtc.addNameExpression(prog, spec.name_expression)
        try:
            nvrtc.compileProgram(prog, list(options))
        except Exception as e:
            text = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed to compile {spec.id} for {spec.arch}:\n{text}") \
                from e
        yield nvrtc, prog
    finally:
        nvrtc.destroyProgram(prog)


def _nvrtc_compile(spec: KernelSpec) -> tuple[bytes, str, str]:
    with _program(spec, compile_options(spec)) as (nvrtc, prog):
        text = nvrtc.getProgramLog(prog)
        lowered = nvrtc.getLoweredName(prog, spec.name_expression)
        cubin = nvrtc.getCUBIN(prog)
    if isinstance(lowered, bytes):
        lowered = lowered.decode()
    return bytes(cubin), lowered, text


def ptx(spec: KernelSpec) -> str:
    """The PTX of ``spec`` for the virtual architecture of its arch (``sm_90a`` ->
    ``compute_90a``; not cached): which instructions the sources emit, without a
    disassembler."""
    virtual = spec.arch.replace("sm_", "compute_")
    opts = tuple(o.replace(f"={spec.arch}", f"={virtual}") for o in compile_options(spec))
    with _program(spec, opts) as (nvrtc, prog):
        text = nvrtc.getPTX(prog)
    return text.decode() if isinstance(text, bytes) else text


# keyed by the spec and DMATTN_NVRTC_DEFINES (an A/B define changes the cubin, not the spec)
_mem_cache: dict[tuple[KernelSpec, tuple[str, ...]], CompiledKernel] = {}
_lock = threading.Lock()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_disk(path: Path, meta_path: Path) -> tuple[bytes, dict] | None:
    try:
        meta = json.loads(meta_path.read_text())
        cubin = path.read_bytes()
    except (OSError, ValueError):
        return None
    if hashlib.sha256(cubin).hexdigest() != meta.get("sha256"):
        return None
    return cubin, meta


def compile_spec(spec: KernelSpec, use_disk_cache: bool = True) -> CompiledKernel:
    """Compile ``spec`` for ``spec.arch``, using the in-process and disk caches."""
    key, arch = (spec, env.nvrtc_defines()), spec.arch
    with _lock:
        hit = _mem_cache.get(key)
    if hit is not None:
        return hit
    digest = cache_key(spec)
    base = cache_dir() / f"{spec.id}-{arch}-{digest}"
    path, meta_path = base.with_suffix(".cubin"), base.with_suffix(".json")
    loaded = _load_disk(path, meta_path) if use_disk_cache else None
    if loaded is not None:
        cubin, meta = loaded
        lowered, text = meta["lowered_name"], meta["log"]
    else:
        t0 = time.perf_counter()
        cubin, lowered, text = _nvrtc_compile(spec)
        dt = time.perf_counter() - t0
        if env.verbose():
            print(f"[dmattn_cupy] compiled {spec.id} for {arch} in {dt:.2f} s", flush=True)
        log.info("compiled %s for %s in %.2f s", spec.id, arch, dt)
        if use_disk_cache:
            meta = {"lowered_name": lowered, "log": text,
                    "sha256": hashlib.sha256(cubin).hexdigest()}
            try:
                _atomic_write(path, cubin)
                _atomic_write(meta_path, json.dumps(meta).encode())
            except OSError as e:  # a read-only cache must not break compilation
                log.warning("dmattn_cupy: could not write kernel cache %s: %s", path, e)
    stats = parse_ptxas_log(text)
    ck = CompiledKernel(spec=spec, arch=arch, cubin=cubin, lowered_name=lowered, log=text,
                        advisories=parse_advisories(text), **stats)
    with _lock:
        _mem_cache[key] = ck
    return ck


def cached_kernel_count() -> int:
    d = cache_dir()
    return len(list(d.glob("*.cubin"))) if d.is_dir() else 0
