"""What a GPU offers the kernels: compute capability and per-block / per-SM limits.

Pure data: ``runtime.device_props`` reads a ``DeviceProps`` off a real device; ``PRESETS``
stand for device classes where there is none (precompile, CPU tests). Selection and occupancy
math take a ``DeviceProps`` instead of hard-coding sm_80/sm_90 numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProps:
    cc: tuple[int, int]        # compute capability (major, minor)
    sm_count: int
    smem_per_block: int        # opt-in dynamic shared memory a block may ask for (bytes)
    smem_per_sm: int           # shared memory of one SM (bytes)
    threads_per_sm: int        # resident threads per SM
    ctas_per_sm: int           # resident CTAs per SM
    regs_per_sm: int = 65536   # 32-bit registers per SM
    # peak DRAM bandwidth (bytes/s) from the memory clock and bus width; 0: unknown (presets)
    dram_bytes_per_s: float = 0.0

    @property
    def arch(self) -> str:
        """The portable cubin target of this device, e.g. ``sm_86``."""
        return f"sm_{self.cc[0]}{self.cc[1]}"


# Device classes the portable kernels are selected for (precompile covers each class's tiles).
PRESETS: dict[str, DeviceProps] = {
    "sm_80": DeviceProps((8, 0), 108, 163 * 1024, 164 * 1024, 2048, 32),   # A100
    "sm_86": DeviceProps((8, 6), 84, 99 * 1024, 100 * 1024, 1536, 16),     # RTX 30xx, A40
    "sm_89": DeviceProps((8, 9), 128, 99 * 1024, 100 * 1024, 1536, 24),    # RTX 40xx, L40
    "sm_90": DeviceProps((9, 0), 132, 227 * 1024, 228 * 1024, 2048, 32),   # H100, H200
}


def parse_arch(arch: str) -> tuple[tuple[int, int], bool]:
    """``"sm_90a"`` -> ((9, 0), True): the compute capability and whether the target is
    arch-specific (an ``a`` cubin runs on exactly that compute capability)."""
    body = arch.removeprefix("sm_")
    specific = body.endswith("a")
    digits = body.removesuffix("a")
    if not arch.startswith("sm_") or not digits.isdigit() or len(digits) < 2:
        raise ValueError(f"arch must look like 'sm_80' or 'sm_90a', got {arch!r}")
    return (int(digits[:-1]), int(digits[-1])), specific
