"""The block-sparse Linear as an autograd Function: y = x W^T + b on any BSR backend, with dX through the transposed
block structure and dW for the stored blocks only, so pruned models fine-tune on the kernels."""
from __future__ import annotations

import torch

from .layout import BlockLayout


def needs_grad(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether a product of `x` with `tensors` (a layer's weight and bias; None for none) must build an autograd
    graph: grad mode on and any of them requiring grad. The kernels that inference runs have no backward."""
    return torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in tensors))


class _BlockSparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, layout: BlockLayout, backend):
        ctx.save_for_backward(x, values)
        ctx.layout, ctx.backend, ctx.has_bias = layout, backend, bias is not None
        return backend.forward(x, values, layout, bias)

    @staticmethod
    def backward(ctx, dy):
        x, values = ctx.saved_tensors
        dy = dy.contiguous()
        dx = ctx.backend.grad_input(dy, values, ctx.layout) if ctx.needs_input_grad[0] else None
        dv = ctx.backend.grad_values(dy, x, ctx.layout, values) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dv, db, None, None


def block_sparse_linear(x: torch.Tensor, values: torch.Tensor, layout: BlockLayout, bias: torch.Tensor | None,
                        backend) -> torch.Tensor:
    """x [..., in] -> [..., out] through `backend` (an object from backends.get)."""
    if x.dtype != values.dtype:
        raise TypeError(f"input is {x.dtype} but the weight is {values.dtype}")
    if not (x.device == values.device == layout.row_ptr.device):  # the kernels take raw pointers: check here
        raise ValueError(f"input on {x.device}, blocks on {values.device}, layout on {layout.row_ptr.device}: "
                         f"move them to one device")
    if not values.is_contiguous() or x.shape[-1] != layout.in_features:
        raise ValueError(f"need contiguous blocks and {layout.in_features} input features; got "
                         f"{'non-' if not values.is_contiguous() else ''}contiguous blocks and {x.shape[-1]}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:  # rows may be strided (the kernels take a row stride), elements may not
        x2 = x2.contiguous()
    if needs_grad(x, values, bias):
        y = _BlockSparseLinear.apply(x2, values, bias, layout, backend)
    else:  # inference: no autograd node to build (a few microseconds a call, which decode pays per layer)
        y = backend.forward(x2, values, layout, bias)
    return y.view(*lead, layout.out_features)
