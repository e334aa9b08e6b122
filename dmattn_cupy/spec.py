"""``KernelSpec``: only what changes the generated code (family, cubin target, dtype, head dim,
tile shape, switches).

Sizes, strides (0 included), offsets, scale and softcap are runtime fields of the params
struct, so broadcasting or a new sequence length never needs a new kernel. What a family's
kernel is (source, template, params struct, shared memory) comes from its row in
``families.FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .device import parse_arch
from .families import FAMILIES, HEAD_DIMS, Family, padded_head_dim

DTYPES = ("fp16", "bf16")
SWITCHES = ("has_mask", "has_bias", "bias_key_row", "varlen", "sparse", "deterministic",
            "debug_counters")

__all__ = ["DTYPES", "HEAD_DIMS", "KernelSpec", "padded_head_dim"]


@dataclass(frozen=True)
class KernelSpec:
    family: str = "fwd_mma"    # a row of families.FAMILIES
    dtype: str = "bf16"        # "fp16" | "bf16"
    head_dim: int = 128        # one of HEAD_DIMS
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    stages: int = 1            # pipeline depth, for families whose template takes it
    has_mask: bool = False
    has_bias: bool = False
    bias_key_row: bool = False  # the bias is a key row (B, H, 1, Sk): families that specialize it
    varlen: bool = False
    sparse: bool = False       # block-sparse lists
    deterministic: bool = False
    debug_counters: bool = False
    arch: str = ""             # cubin target; "" = the family's own (sm_80 portable, sm_90a...)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"KernelSpec.family must be one of {tuple(FAMILIES)}, "
                             f"got {self.family!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"KernelSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"KernelSpec.head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")
        fam = self.row
        for name in SWITCHES:
            if getattr(self, name) and name not in fam.template_args:
                raise ValueError(f"KernelSpec.{name}: family {self.family!r} has no such switch")
        if self.bias_key_row and not self.has_bias:
            raise ValueError("KernelSpec.bias_key_row: only with has_bias")
        if self.stages != 1 and "stages" not in fam.template_args:
            raise ValueError(f"KernelSpec.stages: family {self.family!r} takes no stages")
        arch = self.arch or fam.arch
        cc, specific = parse_arch(arch)
        if fam.arch_specific and arch != fam.arch:
            raise ValueError(f"KernelSpec.arch: family {self.family!r} builds for {fam.arch} "
                             f"only, got {arch!r}")
        if not fam.arch_specific and (specific or cc < fam.min_cc):
            raise ValueError(f"KernelSpec.arch: family {self.family!r} builds for sm_XY >= "
                             f"{fam.arch}, got {arch!r}")
        object.__setattr__(self, "arch", arch)

    @property
    def row(self) -> Family:
        return FAMILIES[self.family]

    @property
    def id(self) -> str:
        """Readable and unique across families (cache file names, logs, pytest ids); the
        cubin target is not part of it (cache file names carry it separately)."""
        s = (f"{self.family}_{self.dtype}_d{self.head_dim}_m{self.block_m}n{self.block_n}"
             f"w{self.num_warps}_mask{int(self.has_mask)}_bias{int(self.has_bias)}"
             f"_varlen{int(self.varlen)}")
        s += f"_st{self.stages}" if self.stages != 1 else ""
        s += "_krow" if self.bias_key_row else ""
        s += "_sparse" if self.sparse else ""
        s += "_det" if self.deterministic else ""
        return s + ("_dbg" if self.debug_counters else "")

    @property
    def source_file(self) -> str:
        return self.row.source

    @property
    def name_expression(self) -> str:
        """The templated ``__global__`` this spec instantiates."""
        args = []
        for name in self.row.template_args:
            value = getattr(self, name)
            if name == "dtype":
                args.append("dm::Half" if value == "fp16" else "dm::BFloat16")
            elif isinstance(value, bool):
                args.append(str(value).lower())
            else:
                args.append(str(value))
        return f"{self.row.kernel}<{', '.join(args)}>"

    @property
    def dynamic_smem(self) -> int:
        return self.row.smem(self)

    @property
    def threads(self) -> int:
        return self.row.threads(self)

    def __str__(self) -> str:
        return self.id
