"""Masks are the truth: pruned entries stay zero through further training until the masks are removed.

A mask lives on its module as a non-persistent bool buffer `prune_mask` (it moves with .to(), stays out of
state_dict so a pruned Hugging Face model still loads with plain from_pretrained). Hooks keep it true:
a gradient hook zeroes the gradient of pruned entries, so optimizers see no signal and keep no state there,
and a global optimizer step hook re-applies the mask after every step, which also covers weight decay and
momentum built up before pruning. Both need a link from the weight Parameter to its module: an attribute holding
the module (pickled with the Parameter's state, so an unpickled model is enforced from its first step) and a _Link
in the module that re-creates both on a deep copy (whose Parameters are new objects without attributes). torch
pickles no hooks, so the gradient hook of an unpickled model comes back with a forward pre-hook.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import MaskMismatchError

BUFFER = "prune_mask"
_OWNER = "_prunekit_owner"  # attribute on a masked Parameter: its module
_HANDLE = "_prunekit_grad_hook"  # a _Link in the module's __dict__
_PARAM = "_prunekit_param"  # name of the masked Parameter, when it is not `weight` (a block-sparse layer's values)
_step_hook = None


def attach(module: nn.Module, keep: torch.Tensor, param: str = "weight") -> None:
    """Masks module.<param> (its weight by default) with `keep` (bool, True = keep, the parameter's own shape) and
    zeroes pruned entries."""
    weight = getattr(module, param)
    if keep.shape != weight.shape:
        raise MaskMismatchError(f"mask of shape {tuple(keep.shape)} does not fit {param} of shape {tuple(weight.shape)}")
    detach(module)
    if param != "weight":
        module.__dict__[_PARAM] = param
    module.register_buffer(BUFFER, keep.to(device=weight.device, dtype=torch.bool), persistent=False)
    with torch.no_grad():
        _zero_pruned(weight, module.prune_mask)
    _link(module)
    module.register_forward_pre_hook(_relink)
    _ensure_step_hook()


def detach(module: nn.Module) -> None:
    """Removes the module's mask and hooks; the weights keep their zeros but may train again."""
    link = module.__dict__.pop(_HANDLE, None)
    if _linked(module):
        if link is not None:
            link.remove()
        delattr(_masked(module), _OWNER)
    module.__dict__.pop(_PARAM, None)
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _relink:
            del module._forward_pre_hooks[key]
    module._buffers.pop(BUFFER, None)


def _masked(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, module.__dict__.get(_PARAM, "weight"), None)


def _linked(module: nn.Module) -> bool:
    return getattr(_masked(module), _OWNER, None) is module


class _Link:
    """The gradient hook of a masked module's Parameter. A deep copy of the module links the copy's new Parameter
    (to the copied module, with its own gradient hook) as it is made; pickled, it keeps no hook (torch pickles none)."""

    def __init__(self, module: nn.Module, param: torch.Tensor | None = None):
        self.module = module
        param = _masked(module) if param is None else param
        setattr(param, _OWNER, module)
        # A frozen weight gets no gradient (and register_hook refuses it): its hook comes with the first forward in
        # which it trains (_relink).
        self.handle = param.register_hook(functools.partial(_mask_grad, module)) if param.requires_grad else None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __deepcopy__(self, memo):
        # The copy's __dict__ is filled only after all of it is copied; its Parameters are in the memo already
        # (_parameters comes first in a module's __dict__), and so is the copy itself.
        twin, param = memo.get(id(self.module)), memo.get(id(_masked(self.module)))
        return _Link(twin, param) if twin is not None and param is not None else _Unlinked()

    def __reduce__(self):
        return _Unlinked, ()


class _Unlinked:
    """A _Link without its hook, as unpickled or copied before the Parameter exists; the next forward links."""

    handle = None

    def remove(self) -> None:
        pass


def _link(module: nn.Module) -> None:
    old = module.__dict__.get(_HANDLE)
    if old is not None and _linked(module):
        old.remove()
    module.__dict__[_HANDLE] = _Link(module)


def _relink(module: nn.Module, args) -> None:
    hookless = getattr(module.__dict__.get(_HANDLE), "handle", None) is None
    if not _linked(module) or (hookless and _masked(module).requires_grad):
        _link(module)


def _mask_grad(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(~module.prune_mask, 0) if BUFFER in module._buffers else grad


def _zero_pruned(tensor: torch.Tensor, keep: torch.Tensor) -> None:
    # masked_fill, not a product with the mask: NaN * 0 is NaN, and an optimizer can put NaN or Inf in pruned entries
    # (fp16 Adam's eps underflows where the gradient is zero)
    tensor.masked_fill_(~keep, 0)


def rezero(module: nn.Module) -> None:
    """Zeroes the module's pruned entries again, after a write that did not go through an optimizer step (adding
    saved deltas); nothing for a module without a mask."""
    if BUFFER in module._buffers:
        with torch.no_grad():
            _zero_pruned(_masked(module), module.prune_mask)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> keep-mask of every masked module."""
    return {name: m.prune_mask for name, m in model.named_modules() if BUFFER in m._buffers}


def pruned_nonzero(model: nn.Module) -> int:
    """How many entries that a mask prunes hold a nonzero value (0 while the masks hold, as they should)."""
    return sum(int((_masked(m).detach()[~m.prune_mask] != 0).sum()) for m in model.modules() if BUFFER in m._buffers)


def remove_masks(model: nn.Module) -> int:
    """Removes every prunekit mask from the model (weights keep their zeros). Returns how many were removed."""
    names = masks(model)
    for name in names:
        detach(model.get_submodule(name))
    return len(names)


def _reapply(optimizer, args, kwargs) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            module = getattr(p, _OWNER, None)
            if module is not None:
                rezero(module)


def _ensure_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_reapply)
