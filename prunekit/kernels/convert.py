"""convert(model): every masked Linear onto the fastest path there is for it, held as small as its mask allows;
revert(model): back to dense Linears with their masks (to prune again)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PrunekitError
from ..masks import BUFFER
from ..targets import PRUNABLE
from . import backends, cpu
from .bitmask import BitmaskLinear
from .layout import KERNEL_BLOCKS, BlockLayout, choose_block
from .linear import BlockSparseLinear, dense_mask, dense_view
from .semi_structured import SemiStructuredLinear, is_2_4
from .semi_structured import unsupported as semi_unsupported
from .sparse_layer import check_keep_dense

CHOICES = ("auto", "dense", "semi_structured") + backends.BSR_BACKENDS
LAYOUTS = ("auto", "bitmask", "block")
SPARSE_MODULES = (BitmaskLinear, BlockSparseLinear, SemiStructuredLinear)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: for a wrapper subclass (2:4 semi-structured), those of the tensors inside it, not its
    dense shape's."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def stored_bytes(module: nn.Module) -> int:
    """Bytes a layer holds in memory: every parameter and buffer (a mask, or a dense copy kept for speed, included)."""
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


@dataclass
class Conversion:
    name: str
    shape: tuple[int, int]  # [out, in]
    pattern: str  # "unstructured, 50.0% kept", "2:4", "block 32x32, 27.5% of blocks stored"
    became: str  # "BitmaskLinear", "BlockSparseLinear", "SemiStructuredLinear" or "dense"
    choices: dict[int, str] = field(default_factory=dict)  # rows measured -> the backend "auto" picked
    note: str = ""  # why a sparse candidate could not be built, if one could not
    dense_bytes: int = 0  # the layer's weight and bias, dense
    stored_bytes: int = 0  # what it holds now (dense_bytes plus its mask, if it stayed dense)
    copy_bytes: int = 0  # of which a dense copy kept where it runs dense (keep_dense; 2:4 layers)


class ConversionReport(list):
    """One Conversion per masked layer; prints as a table with the memory it saved."""

    def __str__(self) -> str:
        head = ["layer", "shape", "pattern", "became", "bytes", "auto picks (rows: backend)"]
        body = [[c.name, f"{c.shape[0]}x{c.shape[1]}", c.pattern, c.became,
                 f"{c.stored_bytes / max(c.dense_bytes, 1):.2f}x",
                 ", ".join(f"{r}: {b}" for r, b in c.choices.items()) or c.note] for c in self]
        widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                 for row in [head, ["-" * w for w in widths]] + body]
        return "\n".join(lines + [self.summary()])

    @property
    def converted(self) -> int:
        return sum(c.became != "dense" for c in self)

    def summary(self) -> str:
        dense, stored = sum(c.dense_bytes for c in self), sum(c.stored_bytes for c in self)
        copies = [c for c in self if c.copy_bytes]
        kept = (f"; {sum(c.copy_bytes for c in copies) / 2**20:.1f} MiB of that is the dense weight {len(copies)} "
                f"layers keep where they run dense") if copies else ""
        return (f"{self.converted} of {len(self)} masked layers converted; they hold {stored / 2**20:.1f} MiB "
                f"against {dense / 2**20:.1f} MiB dense ({stored / max(dense, 1):.2f}x){kept}")


@dataclass
class _Plan:
    name: str
    module: nn.Module
    keep: torch.Tensor  # [out, in]
    block: int
    layout: BlockLayout
    two_four: bool
    storage: str  # "bitmask" or "block": the smaller for this mask, unless one was asked for

    @property
    def pattern(self) -> str:
        if self.two_four:
            return "2:4"
        if self.storage == "block":
            return f"block {self.block}x{self.block}, {self.layout.density:.1%} of blocks stored"
        return f"unstructured, {self.keep.float().mean().item():.1%} kept"


def convert(model: nn.Module, backend: str = "auto", *, layout: str = "auto", block: int | None = None,
            rows=(1, 16, 512), training: bool = False, keep_dense: bool = False) -> ConversionReport:
    """Swaps every Linear (or GPT-2 Conv1D) carrying a prunekit mask for a layer that stores only what the mask
    keeps and runs on the fastest path for it, in place.

    Storage (`layout`): "bitmask", the kept weights plus one bit per weight (BitmaskLinear), or "block", the B x B
    blocks holding a kept weight (BlockSparseLinear); "auto" takes whichever is smaller for each mask (block masks
    get blocks, unstructured and N:M masks the bitmask).
    backend: "auto" measures, per layer shape, sparsity, dtype, device, thread count and batch size in `rows`,
        dense against every usable sparse path (prunekit's CPU kernels; on a GPU its CUDA extension, CuPy, PyTorch's
        BSR and 2:4 semi-structured), and swaps a layer only where some sparse path beats dense; the swapped module
        keeps measuring new batch sizes as they come (dispatch.py) and runs dense where dense is faster.
        Or name one ("cpu", "cuda_ext", "cupy", "torch", "semi_structured", "dense") to use it everywhere.
    block: 16, 32 or 64 for the block layout; by default each layer's from its mask (layout.choose_block).
    training: leave out 2:4 semi-structured, whose compressed weight does not train.
    keep_dense: where a converted layer runs dense (at batch sizes where auto measured dense faster), keep its dense
        weight beside the compressed one: never slower than dense, but holding the dense bytes too. By default it
        is rebuilt for each such call, so that the layer stays small (sparse_layer.py says what that costs); 2:4 layers
        always keep it. The report counts what each layer holds after its measurements at `rows`.

    Every layer is checked (NaN or Inf in kept weights, a backend that cannot run it, a model converted already)
    before any is swapped. Returns a ConversionReport; prunekit.kernels.revert undoes it.
    """
    if backend not in CHOICES and not backends.known(backend):
        raise PrunekitError(f"unknown backend {backend!r}; choose from {', '.join(CHOICES)}")
    if layout not in LAYOUTS:
        raise PrunekitError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    check_keep_dense(keep_dense)
    if block is not None and block not in KERNEL_BLOCKS and backend not in ("torch", "dense"):
        raise PrunekitError(f"block must be one of {KERNEL_BLOCKS} for the kernels, got {block!r}")
    done = [name for name, m in model.named_modules() if isinstance(m, SPARSE_MODULES)]
    if done:
        raise PrunekitError(f"the model is converted already ({len(done)} sparse layers, e.g. {done[0]}); call "
                            f"prunekit.kernels.revert(model) first to convert it again")
    if backend in ("torch", "cuda_ext", "cupy") or (block is not None and layout == "auto"):
        layout = "block"  # the BSR backends read blocks; a block size asks for them
    plans = [_plan(name, module, block, layout) for name, module in model.named_modules()
             if isinstance(module, PRUNABLE) and BUFFER in module._buffers]
    if not plans:
        raise PrunekitError("the model has no masked Linear layers; prune it first (prunekit.prune), or wrap layers "
                            "yourself with BitmaskLinear.from_dense(linear, mask) or BlockSparseLinear.from_dense")
    _check(plans, backend)
    report, swaps = ConversionReport(), []
    for plan in plans:  # every new module is built before the first swap: a failure leaves the model as it was
        new, conversion = _convert_one(plan, backend, rows, training, keep_dense)
        weight, bias = dense_view(plan.module)
        conversion.dense_bytes = sum(t.numel() * t.element_size() for t in (weight, bias) if t is not None)
        conversion.stored_bytes = stored_bytes(new if new is not None else plan.module)
        copy = getattr(new, "dense_copy", None)
        conversion.copy_bytes = 0 if copy is None else tensor_bytes(copy)
        if new is not None:
            swaps.append((plan.name, new))
        report.append(conversion)
    for name, new in swaps:
        _swap(model, name, new)
    return report


def revert(model: nn.Module) -> int:
    """Turns every converted layer back into a dense Linear (or Conv1D) with its prunekit mask, in place. Returns
    how many."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, SPARSE_MODULES)]
    for name, module in found:
        _swap(model, name, module.to_dense())
    return len(found)


def _plan(name: str, module: nn.Module, block: int | None, layout: str) -> _Plan:
    keep = dense_mask(module)
    size = choose_block(keep) if block is None else block
    blocks = BlockLayout.from_mask(keep, size)
    if layout == "auto":  # the smaller in bytes: stored blocks and their indices, or kept weights and their bits
        element, (rows, cols) = dense_view(module)[0].element_size(), keep.shape
        as_blocks = blocks.nnzb * (size * size * element + 16) + (sum(blocks.grid) + 2) * 4
        as_bits = int(keep.sum()) * element + rows * (-(-cols // 8) + 8)
        layout = "block" if as_blocks < as_bits else "bitmask"
    return _Plan(name, module, keep, size, blocks, is_2_4(keep), layout)


def _check(plans: list[_Plan], backend: str) -> None:
    problems = []
    for p in plans:
        weight, _ = dense_view(p.module)
        if not bool(torch.isfinite(weight.detach()[p.keep]).all()):
            reason = "its kept weights hold NaN or Inf (fix or re-prune the model first)"
        elif backend == "cpu":
            reason = (cpu.unsupported(weight.dtype) if weight.device.type == "cpu" else
                      f"cpu runs on the CPU; this layer is on {weight.device.type}")
        elif backend not in ("auto", "dense", "semi_structured"):  # a BSR backend
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


def _sparse(p: _Plan, backend: str, keep_dense: bool, storage: str | None = None) -> nn.Module:
    """The plan's layer in its storage (or `storage`), running on `backend` ("auto", or one the storage takes)."""
    if (storage or p.storage) == "bitmask":
        return BitmaskLinear.from_dense(p.module, p.keep, backend, keep_dense)
    return BlockSparseLinear.from_dense(p.module, p.keep, p.block, backend, keep_dense)


def _convert_one(p: _Plan, backend: str, rows, training: bool, keep_dense: bool):
    weight, bias = dense_view(p.module)
    shape = tuple(weight.shape)
    source = "Linear" if isinstance(p.module, nn.Linear) else "Conv1D"
    if backend == "dense":
        return None, Conversion(p.name, shape, p.pattern, "dense")
    if backend == "semi_structured":
        new = SemiStructuredLinear((weight * p.keep).detach(), bias, "semi_structured", source)
        return new, Conversion(p.name, shape, p.pattern, type(new).__name__)
    if backend != "auto":
        new = _sparse(p, backend, keep_dense)
        return new, Conversion(p.name, shape, p.pattern, type(new).__name__)
    # auto: one candidate module, measured at each batch size; kept only where something beats dense
    try:
        if p.two_four and not training and semi_unsupported(weight.device, weight.dtype) is None:
            candidate = SemiStructuredLinear((weight * p.keep).detach(), bias, "auto", source)
        elif weight.device.type == "cpu" and cpu.unsupported(weight.dtype) is None:
            candidate = _sparse(p, "auto", keep_dense)
        elif p.layout.density < 1 and backends.usable(weight.device, weight.dtype, p.block):
            candidate = _sparse(p, "auto", keep_dense, storage="block")
        else:  # every block stored (an unstructured mask on a GPU, say), or no sparse path here
            return None, Conversion(p.name, shape, p.pattern, "dense", note="no sparse path for it here")
    except (RuntimeError, ValueError) as e:  # e.g. a shape the 2:4 kernels do not take: this layer stays dense
        return None, Conversion(p.name, shape, p.pattern, "dense", note=f"{type(e).__name__}: {e}")
    choices = {}
    with torch.no_grad():
        for n in rows:
            x = torch.randn(n, shape[1], device=weight.device, dtype=weight.dtype)
            choices[n] = candidate.choose(x)
    became = type(candidate).__name__ if any(c != "dense" for c in choices.values()) else "dense"
    return (candidate if became != "dense" else None), Conversion(p.name, shape, p.pattern, became, choices)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
