"""Kernels: run pruned Linears faster where a sparse path is faster.

    report = prunekit.kernels.convert(model)          # every masked Linear onto its fastest path, measured
    layer = BlockSparseLinear.from_dense(linear, mask) # one layer, by hand
    prunekit.kernels.revert(model)                     # back to masked dense Linears (before save_pruned)

Backends: "cuda_ext" (the compiled CUDA extension, cuda_ext/), "cupy" (the same CUDA sources compiled at run time
by NVRTC), "torch" (PyTorch's sparse BSR tensors, the CPU path), "semi_structured" (2:4 on sparse tensor cores)
and "dense". See cuda_ext/README.md for building the extension.
"""
from . import backends, dispatch
from .convert import Conversion, ConversionReport, convert, revert
from .function import block_sparse_linear
from .layout import KERNEL_BLOCKS, BlockLayout, choose_block
from .linear import BlockSparseLinear
from .semi_structured import SemiStructuredLinear, is_2_4

__all__ = ["convert", "revert", "BlockSparseLinear", "SemiStructuredLinear", "BlockLayout", "block_sparse_linear",
           "choose_block", "is_2_4", "backends", "dispatch", "Conversion", "ConversionReport", "KERNEL_BLOCKS"]
