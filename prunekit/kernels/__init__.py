"""Kernels: hold pruned Linears as small as their masks and run them faster where a sparse path is faster.

    report = prunekit.kernels.convert(model)           # every masked Linear compressed, onto its fastest path
    layer = BitmaskLinear.from_dense(linear, mask)      # one layer, by hand (kept weights + a bit per weight)
    layer = BlockSparseLinear.from_dense(linear, mask)  # (or its kept B x B blocks)
    prunekit.kernels.revert(model)                      # back to masked dense Linears

Backends: "cpu" (prunekit's CPU kernels, csrc/sparse_cpu.cpp, AVX-512 or AVX2), "cuda_ext" (the compiled CUDA
extension, cuda_ext/), "cupy" (the same CUDA sources compiled at run time by NVRTC), "torch" (PyTorch's sparse BSR
tensors), "semi_structured" (2:4 on sparse tensor cores) and "dense". See cuda_ext/README.md for building the CUDA
extension; the CPU one builds with `pip install` or on first use (cpu_build.py).
"""
from . import backends, dispatch
from .bitmask import BitmaskLinear
from .convert import SPARSE_MODULES, Conversion, ConversionReport, convert, revert
from .function import block_sparse_linear
from .layout import KERNEL_BLOCKS, BlockLayout, choose_block
from .linear import BlockSparseLinear
from .semi_structured import SemiStructuredLinear, is_2_4

__all__ = ["convert", "revert", "BitmaskLinear", "BlockSparseLinear", "SemiStructuredLinear", "BlockLayout",
           "block_sparse_linear", "choose_block", "is_2_4", "backends", "dispatch", "Conversion", "ConversionReport",
           "KERNEL_BLOCKS", "SPARSE_MODULES"]
