"""Which layers to prune: every Linear (or GPT-2 Conv1D) inside the model's repeated blocks by default."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TargetError

try:  # GPT-2 style layers store weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a core dependency
    Conv1D = ()

PRUNABLE = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)


@dataclass(eq=False)
class Target:
    """One prunable layer. `weight` is always seen with output channels first: [out_features, in_features] (a GPT-2
    Conv1D is transposed to it), [out, in, kh, kw] for a convolution (structured pruning only)."""

    name: str
    module: nn.Module
    block: int | None  # index into the block list, None if the layer lies outside the blocks

    @property
    def transposed(self) -> bool:
        return bool(Conv1D) and isinstance(self.module, Conv1D)

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight.data
        return w.t() if self.transposed else w

    def to_native(self, matrix: torch.Tensor) -> torch.Tensor:
        """A [out, in] tensor in the module's own weight layout."""
        return matrix.t().contiguous() if self.transposed else matrix

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def find_blocks(model: nn.Module, kinds: tuple = PRUNABLE) -> tuple[str, list[nn.Module]]:
    """The model's trunk: the ModuleList/Sequential of same-class blocks, holding a layer of `kinds`, with the most
    parameters (one block will do: a one-layer decoder's lm_head is no more a target than a deep one's).

    Falls back to the whole model as one block when there is no such container (a plain MLP, say).
    """
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 1:
            continue
        if len({type(child) for child in module}) != 1 or not any(isinstance(m, kinds) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, list(module)), size
    return best if best is not None else ("", [model])


def by_block(targets: list[Target]) -> tuple[dict[int, list[Target]], list[Target]]:
    """Targets grouped by the index of the block they sit in, in order, and those outside every block."""
    groups: dict[int, list[Target]] = {}
    for t in targets:
        if t.block is not None:
            groups.setdefault(t.block, []).append(t)
    return groups, [t for t in targets if t.block is None]


def find_targets(model: nn.Module, include: str | None = None, exclude: str | None = None, *,
                 kinds: tuple = PRUNABLE, default: set | None = None) -> list[Target]:
    """Prunable layers in forward order of their blocks; layers outside the blocks come last with block=None.

    kinds: the layer classes that can be targets. default: the modules chosen when include is None (by default
    those inside the model's repeated blocks)."""
    prefix, blocks = find_blocks(model)  # the runners' blocks: their indices must agree
    block_of = {}
    for i, block in enumerate(blocks):
        for module in block.modules():
            block_of[module] = i
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        chosen = re.search(include, name) if include is not None else module in (block_of if default is None
                                                                                  else default)
        if chosen and not (exclude is not None and re.search(exclude, name)):
            targets.append(Target(name, module, block_of.get(module)))
    if not targets:
        where = f"matching include={include!r}" if include is not None else "inside the model's repeated blocks"
        raise TargetError(
            f"{type(model).__name__} has no Linear or Conv1D layer {where}"
            + (f" after exclude={exclude!r}" if exclude is not None else "")
            + "; pass Budget(include=<regex>) naming the layers to prune")
    _check_unshared(model, targets)
    targets.sort(key=lambda t: (t.block is None, t.block if t.block is not None else 0))
    return targets


def _check_unshared(model: nn.Module, targets: list[Target]) -> None:
    """Refuse to prune a weight shared with another module (tied lm_head/embeddings): it would prune both."""
    owners: dict[int, dict[nn.Module, str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            owners.setdefault(id(weight), {})[module] = name
    for t in targets:
        others = sorted(name for module, name in owners[id(t.module.weight)].items() if module is not t.module)
        if others:
            raise TargetError(
                f"{t.name}.weight is shared with {', '.join(others)} (tied weights); pruning it would prune both. "
                f"Exclude {t.name}, or untie the weights first")
