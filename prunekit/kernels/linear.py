"""BlockSparseLinear: a Linear whose weight is stored as its kept B x B blocks and multiplied by a block-sparse
kernel, with the backend chosen per batch size by measurement (dispatch.py) unless one is named."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunekitError
from ..masks import BUFFER, attach
from ..targets import Conv1D
from . import backends
from .cpu import workspace
from .function import block_sparse_linear, needs_grad
from .layout import BlockLayout, choose_block
from .sparse_layer import SparseLayer


def dense_view(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight as [out, in], bias) of an nn.Linear or a GPT-2 Conv1D (which stores [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    raise PrunekitError(f"expected an nn.Linear or a GPT-2 Conv1D, got {type(module).__name__}")


def dense_module(weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor, source: str,
                 trainable: bool = True) -> nn.Module:
    """An nn.Linear (or, for source "Conv1D", a GPT-2 Conv1D) holding [out, in] `weight`, masked with `keep`."""
    out_features, in_features = weight.shape
    if source == "Conv1D":
        dense = Conv1D(out_features, in_features).to(weight.device, weight.dtype)
        weight, keep = weight.t(), keep.t()
    else:
        dense = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.weight.requires_grad_(trainable)
    attach(dense, keep.contiguous())
    return dense


def dense_mask(module: nn.Module) -> torch.Tensor | None:
    """The module's prunekit keep-mask as [out, in] (a Conv1D's is stored in its own [in, out] layout), or None."""
    if BUFFER not in module._buffers:
        return None
    return module.prune_mask if isinstance(module, nn.Linear) else module.prune_mask.t()


class BlockSparseLinear(SparseLayer, nn.Module):
    """y = x W^T + b with W stored as `values` [nnzb, B, B], the blocks that hold a kept weight.

    The layout's index tensors are buffers (they move with .to() and live in state_dict). Kept weights of a stored
    block train; pruned ones stay zero: blocks that were never stored get no gradient (the kernels compute dW for
    stored blocks only), and where a stored block is only partly kept its mask is attached to `values` with
    prunekit's mask persistence (gradient masking and re-masking after every optimizer step).

    backend: "auto" measures the usable backends against dense once per batch-size bucket and keeps the fastest
    (dispatch.py); or one of "cuda_ext", "cupy", "torch", "dense".
    keep_dense: where it runs dense, keep the dense weight instead of rebuilding it per call (sparse_layer.py).
    """

    BINDS = ("values", "bias", *BlockLayout.INDEX_FIELDS)
    BACKENDS = ("auto", *backends.NAMES)

    def __init__(self, layout: BlockLayout, values: torch.Tensor, bias: torch.Tensor | None = None,
                 backend: str = "auto", source: str = "Linear", keep_dense: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.block = layout.in_features, layout.out_features, layout.block
        self.values = nn.Parameter(values)
        self.bias = nn.Parameter(bias) if bias is not None else None
        for name, index in layout.indices().items():
            self.register_buffer(name, index)
        self.backend = backend
        self.source = source  # the class to revert to: "Linear" or "Conv1D"
        self.init_fallback(keep_dense)

    @classmethod
    def takes(cls, name: str) -> bool:  # and backends registered since (backends.register)
        return name == "auto" or backends.known(name)

    @classmethod
    def from_dense(cls, linear: nn.Module, mask: torch.Tensor | None = None, block: int | None = None,
                   backend: str = "auto", keep_dense: bool = False) -> "BlockSparseLinear":
        """From an nn.Linear (or GPT-2 Conv1D) and a keep-mask [out, in]: by default its prunekit mask, else its
        nonzero weights. block: 16, 32 or 64 for the kernels (any size for the torch backend); by default the
        largest that stores no more than the smallest does (layout.choose_block)."""
        weight, bias = dense_view(linear)
        if mask is None:
            mask = dense_mask(linear)
            mask = weight != 0 if mask is None else mask
        if tuple(mask.shape) != tuple(weight.shape):
            raise PrunekitError(f"mask of shape {tuple(mask.shape)} does not fit the weight, {tuple(weight.shape)}")
        keep = mask.to(device=weight.device, dtype=torch.bool)
        block = choose_block(keep) if block is None else block
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise PrunekitError(f"block must be a positive int (16, 32 or 64 for the kernels), got {block!r}")
        layout = BlockLayout.from_mask(keep, block)
        with torch.no_grad():
            values = layout.gather(weight.detach() * keep)
            within = layout.gather(keep)
            real = layout.gather(torch.ones_like(keep))  # False only on the padding of ragged edges
        module = cls(layout, values, None if bias is None else bias.detach().clone(), backend,
                     "Linear" if isinstance(linear, nn.Linear) else "Conv1D", keep_dense)
        module.values.requires_grad_(linear.weight.requires_grad)
        if module.bias is not None:
            module.bias.requires_grad_(bias.requires_grad)
        if bool((real & ~within).any()):  # some stored blocks are only partly kept
            attach(module, within, param="values")
        return module

    @property
    def layout(self) -> BlockLayout:
        """The BlockLayout over this module's index buffers, kept between calls (at one row on a GPU a forward is a
        few microseconds, so building it per call showed); dropped when the buffers are moved or replaced."""
        layout = self.__dict__.get("_layout")
        if layout is None:
            layout = self.__dict__["_layout"] = BlockLayout(
                self.out_features, self.in_features, self.block,
                **{name: self._buffers[name] for name in BlockLayout.INDEX_FIELDS})
        return layout

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): new tensors
        self.__dict__.pop("_layout", None)
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        if name in BlockLayout.INDEX_FIELDS:
            self.__dict__.pop("_layout", None)
        super().__setattr__(name, value)

    def dense_weight(self, saved: bool = False) -> torch.Tensor:
        """The dense [out, in] weight: differentiable while training; otherwise what inference runs dense on
        (sparse_layer.py: rebuilt for this call, or the kept copy; saved: not scratch, autograd keeps it)."""
        if torch.is_grad_enabled() and self.values.requires_grad:
            return self.layout.scatter(self.values)
        return self.fallback_weight(saved)

    def build_dense(self, scratch: bool) -> torch.Tensor:
        """The weight scattered from the blocks; scratch on the CPU: into a workspace all layers share (valid until
        the next call); on a GPU into memory the caching allocator takes back after the product."""
        out = workspace(self.layout.padded, self.values.dtype) if scratch and self.values.device.type == "cpu" else None
        return self.layout.scatter(self.values.detach(), out=out)

    def dense_sources(self) -> tuple[torch.Tensor, ...]:
        return self.values, *(self._buffers[name] for name in BlockLayout.INDEX_FIELDS)

    def choose(self, x: torch.Tensor) -> str:
        """The backend "auto" runs `x` on (measured the first time its problem is seen), each candidate timed as
        forward would run it at inference (`runner`; dense on the weight sparse_layer.py gives it)."""
        def candidates(x2):
            def timed(name):  # built on its first call, inside the timing's error handling
                run = functools.cache(lambda: self.runner(name, x2))
                return lambda: run()(x2)

            return {name: timed(name) for name in ("dense", *backends.usable(x.device, x.dtype, self.block))}

        return self.pick(x, "bsr", (self.out_features, self.in_features), self.block, self.layout.density, candidates)

    def product(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """forward's product on backend `name` (or "dense"), differentiable."""
        if name == "dense":
            return lambda x: F.linear(x, self.dense_weight(needs_grad(x)), self.bias)
        backend = backends.get(name)
        return lambda x: block_sparse_linear(x, self.values, self.layout, self.bias, backend)

    def runner(self, name: str, x2: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """What inference runs on backend `name` (or "dense") for the bucket of x2's rows (x2 2-D): the backend's
        product with everything but the input bound (Native.bind, CpuBSR.bind) where it has one, else `product`."""
        bind = getattr(backends.get(name), "bind", None) if name != "dense" else None
        return (bind and bind(x2, self.values, self.layout, self.bias)) or self.product(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trains(x):
            return self.product(self.path(x))(x)
        if x.shape[-1] != self.in_features:  # (kernels take the width from x: a wrong one must not reach them)
            raise PrunekitError(f"input has {x.shape[-1]} features, this layer takes {self.in_features}")
        return self.infer(x)

    def to_dense(self) -> nn.Module:
        """The equivalent nn.Linear (or Conv1D), with the prunekit mask of everything not kept."""
        with torch.no_grad():
            weight = self.layout.scatter(self.values.detach())
            within = self.prune_mask if BUFFER in self._buffers else torch.ones_like(self.values, dtype=torch.bool)
            keep = self.layout.scatter(within)
        return dense_module(weight, None if self.bias is None else self.bias.detach(), keep, self.source,
                            self.values.requires_grad)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"blocks={self.values.shape[0]} ({self.layout.density:.1%} stored), bias={self.bias is not None}, "
                f"backend={self.backend!r}" + (", keep_dense=True" if self.keep_dense else ""))
