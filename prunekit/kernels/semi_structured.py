"""2:4 semi-structured sparsity on sparse tensor cores, through PyTorch's to_sparse_semi_structured (CUTLASS or
cuSPARSELt): every group of 4 input weights keeps at most 2, which Ampere and later GPUs multiply at up to twice the
dense rate (Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021). CUDA, fp16/bf16 only, inference only
(the compressed weight does not train); the dispatch keeps dense where it is faster."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunekitError
from .sparse_layer import SparseLayer


def is_2_4(keep: torch.Tensor) -> bool:
    """At most 2 kept in every group of 4 consecutive inputs of a [out, in] mask."""
    return keep.dim() == 2 and keep.shape[1] % 4 == 0 and bool((keep.reshape(keep.shape[0], -1, 4).sum(-1) <= 2).all())


def unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"2:4 semi-structured sparsity runs on CUDA devices, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 semi-structured sparsity takes float16 or bfloat16, not {dtype}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "2:4 semi-structured sparsity needs sparse tensor cores (compute capability 8.0 or later)"
    return None


class SemiStructuredLinear(SparseLayer, nn.Module):
    """y = x W^T + b with W (2:4-pruned) compressed for sparse tensor cores. backend: "auto" (measured against
    dense per batch-size bucket), "semi_structured" or "dense". Where it runs dense it keeps a dense copy
    (sparse_layer.py: decompressing costs a product of its own)."""

    REBUILDS = False
    BACKENDS = ("auto", "semi_structured", "dense")
    BINDS = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, backend: str = "auto", source: str = "Linear"):
        super().__init__()
        self.backend = backend  # checked before any work
        from torch.sparse import to_sparse_semi_structured

        reason = unsupported(weight.device, weight.dtype)
        if reason:
            raise PrunekitError(reason)
        if not is_2_4(weight != 0):
            raise PrunekitError("the weight is not 2:4 sparse (more than 2 nonzeros in a group of 4 inputs)")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(to_sparse_semi_structured(weight.detach()), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.source = source
        self.init_fallback(keep_dense=True)

    def build_dense(self, scratch: bool) -> torch.Tensor:
        return self.weight.to_dense()

    def dense_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fallback_weight(), self.bias)

    def runner(self, name: str, x2: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """What inference runs on path `name` ("semi_structured" or "dense"; sparse_layer.py)."""
        if name == "dense":
            return self._dense
        weight, bias = self.weight, self.bias
        return lambda x: F.linear(x, weight, bias)

    def choose(self, x: torch.Tensor) -> str:
        """The path "auto" runs `x` on. The dense copy stays once any batch size has run dense."""
        def candidates(x2):
            sparse = self.runner("semi_structured")
            return {"dense": lambda: self._dense(x2), "semi_structured": lambda: sparse(x2)}

        return self.pick(x, "2:4", (self.out_features, self.in_features), 4, 0.5, candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.infer(x)

    def to_dense(self) -> nn.Module:
        """The equivalent nn.Linear (or Conv1D), masked where the compressed weight is zero."""
        from .linear import dense_module

        weight = self.weight.to_dense()
        return dense_module(weight, self.bias, weight != 0, self.source, trainable=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, backend={self.backend!r}"
