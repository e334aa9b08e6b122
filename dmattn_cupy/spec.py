"""``KernelSpec``: only what changes the generated code (dtype, head dim, tile shape, switches).

Sizes, strides (0 included), offsets, scale and softcap are runtime fields of the params
struct, so broadcasting or a new sequence length never needs a new kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("fp16", "bf16")
KERNEL_NAMES = {"fwd_mma": "flash_fwd_mma_kernel",
                "fwd_decode": "flash_fwd_decode_kernel", "fwd_combine": "flash_fwd_combine_kernel"}
HEAD_DIMS = (32, 64, 96, 128, 192, 256)


def decode_stages(head_dim: int) -> int:
    """K/V pipeline depth of the decode kernel (cuda_src/sm80/fwd_decode.cu, ``decode_stages``)."""
    return 2 if head_dim > 128 else 3


def padded_head_dim(d: int) -> int:
    """Smallest specialized head dim >= ``d`` (the kernel zero-fills the padding)."""
    for hd in HEAD_DIMS:
        if d <= hd:
            return hd
    raise ValueError(f"head dim must be <= {HEAD_DIMS[-1]}, got {d}")


@dataclass(frozen=True)
class KernelSpec:
    kind: str = "fwd_mma"      # the kernel family: cuda_src/<kind>.cu
    dtype: str = "bf16"        # "fp16" | "bf16"
    head_dim: int = 128        # one of HEAD_DIMS
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    has_mask: bool = False
    has_bias: bool = False
    varlen: bool = False
    sparse: bool = False       # block-sparse lists (fwd_mma only)
    debug_counters: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"KernelSpec.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kind not in KERNEL_NAMES:
            raise ValueError(f"KernelSpec.kind must be one of {tuple(KERNEL_NAMES)}, "
                             f"got {self.kind!r}")
        if self.sparse and self.kind != "fwd_mma":
            raise ValueError("KernelSpec.sparse needs kind='fwd_mma'")
        if self.head_dim not in HEAD_DIMS:
            raise ValueError(f"KernelSpec.head_dim must be one of {HEAD_DIMS}, got {self.head_dim}")

    @property
    def id(self) -> str:
        s = (
            f"{self.kind}_{self.dtype}_d{self.head_dim}_m{self.block_m}n{self.block_n}"
            f"w{self.num_warps}_mask{int(self.has_mask)}_bias{int(self.has_bias)}"
            f"_varlen{int(self.varlen)}"
        ) + ("_sparse" if self.sparse else "")
        return s + ("_dbg" if self.debug_counters else "")

    @property
    def source_file(self) -> str:
        return f"{self.kind}.cu" if self.kind == "fwd_combine" else f"sm80/{self.kind}.cu"

    @property
    def name_expression(self) -> str:
        """The templated ``__global__`` this spec instantiates (see cuda_src/<kind>.cu)."""
        elem = "dm::Half" if self.dtype == "fp16" else "dm::BFloat16"
        flags = [self.has_mask, self.has_bias, self.varlen, self.sparse, self.debug_counters]
        args = ", ".join([elem, str(self.head_dim), str(self.block_m), str(self.block_n),
                          str(self.num_warps)] + [str(f).lower() for f in flags])
        return f"dm::{KERNEL_NAMES[self.kind]}<{args}>"

    @property
    def dynamic_smem(self) -> int:
        """Dynamic shared memory bytes. fwd_mma.cu's layout: Q | K x2 | V x2 | bias x2 | mask;
        Q/K/V and bias rows padded by 8 elements, mask rows by 16 bytes."""
        if self.kind == "fwd_decode":  # Q slab + kStages K and V tiles, rows padded by 8
            return (self.block_m + 2 * decode_stages(self.head_dim) * self.block_n) * \
                (self.head_dim + 8) * 2
        if self.kind != "fwd_mma":
            return 0
        stride = self.head_dim + 8
        elems = self.block_m * stride + 4 * self.block_n * stride
        if self.has_bias:
            elems += 2 * self.block_m * (self.block_n + 8)
        return 2 * elems + (self.block_m * (self.block_n + 16) if self.has_mask else 0)

    @property
    def threads(self) -> int:
        return 32 * self.num_warps

    def __str__(self) -> str:
        return self.id
