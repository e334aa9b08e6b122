"""dmattn_cupy: flash attention with dynamic masks and biases, compiled at first use by NVRTC."""

from . import mask_pack  # noqa: F401  (registers MixedMask.from_dense_mask's device packer)
from .api import flash_dmattn_func, flash_dmattn_func_auto, flash_dmattn_varlen_func
from .bwd_api import flash_dmattn_backward, flash_dmattn_varlen_backward
from .kvcache import flash_dmattn_with_kvcache
from .masks import (
    BCSRMask,
    BlockBitsetMask,
    CausalMask,
    CausalWindowMask,
    DynamicMask,
    MixedMask,
    SparseMask,
    WindowMask,
    calculate_memory_savings,
    estimate_speedup,
)

__version__ = "0.1.0"

__all__ = [
    "flash_dmattn_func", "flash_dmattn_func_auto", "flash_dmattn_varlen_func",
    "flash_dmattn_backward", "flash_dmattn_varlen_backward", "flash_dmattn_with_kvcache",
    "SparseMask", "CausalMask", "WindowMask", "CausalWindowMask", "BlockBitsetMask", "BCSRMask",
    "MixedMask", "DynamicMask", "estimate_speedup", "calculate_memory_savings", "__version__",
]
