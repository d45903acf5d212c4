"""convert(model): every masked Linear onto the fastest path there is for it; revert(model): back to dense Linears
with their masks (for save_pruned, or to prune again)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import BUFFER
from ..errors import PrunekitError
from ..targets import PRUNABLE
from . import backends
from .layout import KERNEL_BLOCKS, BlockLayout, choose_block
from .linear import BlockSparseLinear, dense_mask, dense_view
from .semi_structured import SemiStructuredLinear, is_2_4, unsupported as semi_unsupported

CHOICES = ("auto", "dense", "semi_structured") + backends.BSR_BACKENDS


@dataclass
class Conversion:
    name: str
    shape: tuple[int, int]  # [out, in]
    pattern: str  # "block 32x32, 27.5% of blocks stored", "2:4"
    became: str  # "BlockSparseLinear", "SemiStructuredLinear" or "dense"
    choices: dict[int, str] = field(default_factory=dict)  # rows measured -> the backend "auto" picked
    note: str = ""  # why a sparse candidate could not be built, if one could not


class ConversionReport(list):
    """One Conversion per masked layer; prints as a table."""

    def __str__(self) -> str:
        head = ["layer", "shape", "pattern", "became", "auto picks (rows: backend)"]
        body = [[c.name, f"{c.shape[0]}x{c.shape[1]}", c.pattern, c.became,
                 ", ".join(f"{r}: {b}" for r, b in c.choices.items())] for c in self]
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                         for row in [head, ["-" * w for w in widths]] + body)

    @property
    def converted(self) -> int:
        return sum(c.became != "dense" for c in self)


@dataclass
class _Plan:
    name: str
    module: nn.Module
    keep: torch.Tensor  # [out, in]
    block: int
    layout: BlockLayout
    two_four: bool


def convert(model: nn.Module, backend: str = "auto", *, block: int | None = None, rows=(1, 16, 512),
            training: bool = False) -> ConversionReport:
    """Swaps every Linear (or GPT-2 Conv1D) carrying a prunekit mask for the fastest way to run it, in place.

    backend: "auto" measures, per layer shape, sparsity, dtype and device, PyTorch's dense matmul against every
        usable sparse path (the CUDA extension, CuPy, PyTorch's BSR; 2:4 semi-structured for 2:4 masks on a GPU)
        at each batch size in `rows`, and swaps a layer only where some sparse path beats dense; the swapped
        module keeps measuring new batch sizes as they come (dispatch.py) and runs dense where dense is faster.
        Or name one backend ("cuda_ext", "cupy", "torch", "semi_structured", "dense") to use it everywhere.
    block: 16, 32 or 64; by default each layer's from its mask (layout.choose_block).
    training: leave out 2:4 semi-structured, whose compressed weight does not train.

    Every layer is checked before any is swapped. Returns a ConversionReport; prunekit.kernels.revert undoes it.
    """
    if backend not in CHOICES and not backends.known(backend):
        raise PrunekitError(f"unknown backend {backend!r}; choose from {', '.join(CHOICES)}")
    if block is not None and block not in KERNEL_BLOCKS and backend not in ("torch", "dense"):
        raise PrunekitError(f"block must be one of {KERNEL_BLOCKS} for the kernels, got {block!r}")
    plans = [_plan(name, module, block) for name, module in model.named_modules()
             if isinstance(module, PRUNABLE) and BUFFER in module._buffers]
    if not plans:
        raise PrunekitError("the model has no masked Linear layers; prune it first (prunekit.prune), or wrap layers "
                            "yourself with BlockSparseLinear.from_dense(linear, mask)")
    _check(plans, backend)
    report, swaps = ConversionReport(), []
    for plan in plans:  # every new module is built before the first swap: a failure leaves the model as it was
        new, conversion = _convert_one(plan, backend, rows, training)
        if new is not None:
            swaps.append((plan.name, new))
        report.append(conversion)
    for name, new in swaps:
        _swap(model, name, new)
    return report


def revert(model: nn.Module) -> int:
    """Turns every BlockSparseLinear / SemiStructuredLinear back into a dense Linear (or Conv1D) with its prunekit
    mask, in place. Returns how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, (BlockSparseLinear, SemiStructuredLinear))]
    for name, module in found:
        _swap(model, name, module.to_dense())
    return len(found)


def _plan(name: str, module: nn.Module, block: int | None) -> _Plan:
    keep = dense_mask(module)
    size = choose_block(keep) if block is None else block
    return _Plan(name, module, keep, size, BlockLayout.from_mask(keep, size), is_2_4(keep))


def _check(plans: list[_Plan], backend: str) -> None:
    problems = []
    for p in plans:
        weight, _ = dense_view(p.module)
        if backend not in ("auto", "dense", "semi_structured"):  # a BSR backend
            reason = backends.unavailable(backend, weight.device, weight.dtype, p.block)
        elif backend == "semi_structured":
            reason = ("its mask is not 2:4" if not p.two_four else semi_unsupported(weight.device, weight.dtype))
        else:
            reason = None
        if reason:
            problems.append(f"{p.name}: {reason}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PrunekitError(f"cannot convert to backend {backend!r}: " + "; ".join(problems[:5]) + more)


def _convert_one(p: _Plan, backend: str, rows, training: bool):
    weight, bias = dense_view(p.module)
    shape = tuple(weight.shape)
    pattern = "2:4" if p.two_four else f"block {p.block}x{p.block}, {p.layout.density:.1%} of blocks stored"
    source = "Linear" if isinstance(p.module, nn.Linear) else "Conv1D"
    if backend == "dense":
        return None, Conversion(p.name, shape, pattern, "dense")
    if backend == "semi_structured":
        new = SemiStructuredLinear((weight * p.keep).detach(), bias, "semi_structured", source)
        return new, Conversion(p.name, shape, pattern, type(new).__name__)
    if backend != "auto":
        new = BlockSparseLinear.from_dense(p.module, p.keep, p.block, backend)
        return new, Conversion(p.name, shape, pattern, type(new).__name__)
    # auto: one candidate module, measured at each batch size; kept only where something beats dense
    try:
        if p.two_four and not training and semi_unsupported(weight.device, weight.dtype) is None:
            candidate = SemiStructuredLinear((weight * p.keep).detach(), bias, "auto", source)
        elif p.layout.density < 1 and backends.usable(weight.device, weight.dtype, p.block):
            candidate = BlockSparseLinear.from_dense(p.module, p.keep, p.block, "auto")
        else:  # every block stored (unstructured or N:M masks on the CPU, say), or no sparse path here
            return None, Conversion(p.name, shape, pattern, "dense")
    except (RuntimeError, ValueError) as e:  # e.g. a shape the 2:4 kernels do not take: this layer stays dense
        return None, Conversion(p.name, shape, pattern, "dense", note=f"{type(e).__name__}: {e}")
    choices = {}
    with torch.no_grad():
        for n in rows:
            x = torch.randn(n, shape[1], device=weight.device, dtype=weight.dtype)
            choices[n] = candidate.choose(x)
    became = type(candidate).__name__ if any(c != "dense" for c in choices.values()) else "dense"
    return (candidate if became != "dense" else None), Conversion(p.name, shape, pattern, became, choices)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
