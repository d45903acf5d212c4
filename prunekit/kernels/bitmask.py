"""The bitmask layout of a pruned weight, and BitmaskLinear, a Linear that holds nothing else.

For a [out, in] weight and its keep-mask (compressed-tensors' "sparse-bitmask" layout, which llm-compressor writes
and prunekit saves; see the README's "Saved models"):

    values       [nnz]                     the kept weights, row by row (a kept weight that is 0 is still stored)
    bitmask      uint8 [out, ceil(in / 8)] one bit per weight, 1 = kept, least significant bit first, rows padded
    row_offsets  int64 [out]               where each row's values start

An fp32 weight at 50% costs 0.5 + 1/32 of its dense bytes, which is also what a product with it reads; that is what
the CPU kernels (cpu.py) turn into speed. Unstructured and N:M masks use it; block masks store less as whole blocks
(layout.py, BlockSparseLinear).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..bits import pack_rows, unpack_rows
from ..errors import MaskMismatchError
from . import cpu
from .function import needs_grad
from .linear import dense_mask, dense_module, dense_view
from .sparse_layer import SparseLayer


def compress(weight: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, bitmask, row_offsets) of a [out, in] weight under a bool keep-mask of its shape."""
    if weight.dim() != 2 or tuple(keep.shape) != tuple(weight.shape):
        raise MaskMismatchError(f"a bitmask layout needs a 2-D weight and a mask of its shape; got weight "
                                f"{tuple(weight.shape)}, mask {tuple(keep.shape)}")
    keep = keep.to(device=weight.device, dtype=torch.bool)
    counts = keep.sum(1)
    return weight[keep].contiguous(), pack_rows(keep), (counts.cumsum(0) - counts).to(torch.int64)


def check(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, shape, what: str = "layout") -> None:
    """Raises MaskMismatchError unless the three tensors describe one [out, in] weight consistently."""
    out_features, in_features = shape
    width = -(-in_features // 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (out_features, width):
        raise MaskMismatchError(f"{what}: the bitmask must be uint8 of shape {(out_features, width)} for a "
                                f"{out_features}x{in_features} weight; got {bitmask.dtype} {tuple(bitmask.shape)}")
    if values.dim() != 1 or row_offsets.dtype != torch.int64 or tuple(row_offsets.shape) != (out_features,):
        raise MaskMismatchError(f"{what}: values must be 1-D and row_offsets int64 of shape ({out_features},); got "
                                f"values {tuple(values.shape)}, row_offsets {row_offsets.dtype} "
                                f"{tuple(row_offsets.shape)}")
    bits = unpack_rows(bitmask, width * 8)
    if bool(bits[:, in_features:].any()):
        raise MaskMismatchError(f"{what}: the bitmask has bits set past column {in_features}")
    counts = bits.sum(1)
    if int(counts.sum()) != values.numel():
        raise MaskMismatchError(f"{what}: the bitmask keeps {int(counts.sum())} weights but there are "
                                f"{values.numel()} values")
    if not torch.equal(row_offsets, counts.cumsum(0) - counts):
        raise MaskMismatchError(f"{what}: row_offsets do not match the bitmask's count of kept weights per row")


def decompress(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, shape) -> torch.Tensor:
    """The dense [out, in] weight (differentiable in `values` where grad is on; the kernel's otherwise)."""
    if values.device.type == "cpu" and not (torch.is_grad_enabled() and values.requires_grad) and cpu.usable(values.dtype):
        return cpu.bitmask_dense(values, bitmask, row_offsets, tuple(shape))
    keep = unpack_rows(bitmask, shape[1])
    return values.new_zeros(shape).masked_scatter(keep, values)


class BitmaskLinear(SparseLayer, nn.Module):
    """y = x W^T + b with W held only as its bitmask layout: `values` (the parameter; it trains, and a pruned weight,
    having no value, stays zero), `bitmask` and `row_offsets` (buffers).

    backend: "auto" times prunekit's CPU kernel against the dense product once per batch-size bucket and keeps the
    faster (dispatch.py); "cpu" or "dense" to choose. Training runs the dense product, differentiable in `values`.
    keep_dense: where it runs dense, keep the dense weight instead of decompressing it per call (sparse_layer.py).
    """

    BACKENDS = ("auto", "cpu", "dense")
    BINDS = ("values", "bitmask", "row_offsets", "bias")

    def __init__(self, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                 shape: tuple[int, int], bias: torch.Tensor | None = None, backend: str = "auto",
                 source: str = "Linear", keep_dense: bool = False):
        super().__init__()
        check(values, bitmask, row_offsets, shape)
        self.out_features, self.in_features = shape
        self.values = nn.Parameter(values)
        self.register_buffer("bitmask", bitmask)
        self.register_buffer("row_offsets", row_offsets)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.backend = backend
        self.source = source  # the class to revert to: "Linear" or "Conv1D"
        self.init_fallback(keep_dense)

    @classmethod
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None, backend: str = "auto",
                   keep_dense: bool = False) -> "BitmaskLinear":
        """From an nn.Linear (or GPT-2 Conv1D) and a keep-mask [out, in]: by default its prunekit mask, else its
        nonzero weights."""
        weight, bias = dense_view(linear)
        if mask is None:
            mask = dense_mask(linear)
            mask = weight != 0 if mask is None else mask
        with torch.no_grad():
            values, bitmask, row_offsets = compress(weight.detach(), mask)
        module = cls(values, bitmask, row_offsets, tuple(weight.shape),
                     None if bias is None else bias.detach().clone(), backend,
                     "Linear" if isinstance(linear, nn.Linear) else "Conv1D", keep_dense)
        module.values.requires_grad_(linear.weight.requires_grad)
        if module.bias is not None:
            module.bias.requires_grad_(bias.requires_grad)
        return module

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def density(self) -> float:
        return self.values.numel() / (self.out_features * self.in_features)

    def keep_mask(self) -> torch.Tensor:
        return unpack_rows(self.bitmask, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        return decompress(self.values, self.bitmask, self.row_offsets, self.shape)

    def build_dense(self, scratch: bool) -> torch.Tensor:
        """The weight decompressed (scratch, on the CPU: into the workspace all layers share)."""
        if scratch and self.values.is_cpu and cpu.usable(self.values.dtype):
            return cpu.bitmask_dense(self.values.detach(), self.bitmask, self.row_offsets, self.shape,
                                     out=cpu.workspace(self.shape, self.values.dtype))
        return decompress(self.values.detach(), self.bitmask, self.row_offsets, self.shape)

    def dense_sources(self) -> tuple[torch.Tensor, ...]:
        return self.values, self.bitmask, self.row_offsets

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """The dense product: differentiable in values while training, else on sparse_layer.py's weight."""
        training = torch.is_grad_enabled() and self.values.requires_grad
        return F.linear(x, self.dense_weight() if training else self.fallback_weight(needs_grad(x)), self.bias)

    def runner(self, name: str, x2: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """What inference runs on path `name` ("cpu" or "dense"; sparse_layer.py): the kernel on this layer's
        tensors, bound, or the dense product."""
        if name == "dense":
            return self._dense
        return cpu.bitmask_product(self.values, self.bitmask, self.row_offsets, self.bias, self.shape)

    def choose(self, x: torch.Tensor) -> str:
        """The backend "auto" runs `x` on (measured the first time its problem is seen, each path as forward runs
        it: `runner`)."""

        def candidates(x2):
            found = {"dense": lambda: self._dense(x2)}
            if x.is_cpu and cpu.usable(x.dtype):
                kernel = self.runner("cpu")
                found["cpu"] = lambda: kernel(x2)
            return found

        return self.pick(x, "bitmask", self.shape, 0, self.density, candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trains(x):
            return self._dense(x)  # the kernel has no backward
        return self.infer(x)

    def to_dense(self) -> nn.Module:
        """The equivalent nn.Linear (or Conv1D), with the prunekit mask of everything not kept."""
        with torch.no_grad():
            weight = decompress(self.values.detach(), self.bitmask, self.row_offsets, self.shape)
        return dense_module(weight, None if self.bias is None else self.bias.detach(), self.keep_mask(), self.source,
                            self.values.requires_grad)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kept={self.values.numel()} ({self.density:.1%}), bias={self.bias is not None}, "
                f"backend={self._backend!r}" + (", keep_dense=True" if self.keep_dense else ""))
