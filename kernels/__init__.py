"""Triton kernels and the pure-torch references of the same math.

Kernels know tensors, not models: nothing here imports from `sparta.moe`, `sparta.attention`
or `sparta.platform`.
"""

from .attention_reference import (
    block_mass_reference,
    block_sparse_attention_reference,
    layout_block_mask,
    layout_element_mask,
)
from .block_layout import KernelLayout, build_kernel_layout
from .block_mass import block_mass, block_mass_supports
from .block_sparse_attention import block_sparse_attention
from .grouped_gemm import grouped_mm
from .moe_permute import permute, unpermute, weighted_activation

__all__ = [
    "KernelLayout", "build_kernel_layout", "block_mass", "block_mass_reference", "block_mass_supports",
    "block_sparse_attention", "block_sparse_attention_reference",
    "layout_block_mask", "layout_element_mask", "grouped_mm", "permute", "unpermute", "weighted_activation",
]
