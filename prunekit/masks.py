"""Masks are the truth: pruned entries stay zero through further training until the masks are removed.

A mask lives on its module as a non-persistent bool buffer `prune_mask` (it moves with .to(), stays out of
state_dict so a pruned Hugging Face model still loads with plain from_pretrained). Two hooks keep it true:
a gradient hook zeroes the gradient of pruned entries, so optimizers see no signal and keep no state there,
and a global optimizer step hook re-applies the mask after every step, which also covers weight decay and
momentum built up before pruning.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import MaskMismatchError

BUFFER = "prune_mask"
_OWNER = "_prunekit_owner"  # attribute on a masked Parameter: weakref to its module
_step_hook = None


def attach(module: nn.Module, keep: torch.Tensor) -> None:
    """Masks module.weight with `keep` (bool, True = keep, the weight's own shape) and zeroes pruned entries."""
    weight = module.weight
    if keep.shape != weight.shape:
        raise MaskMismatchError(f"mask of shape {tuple(keep.shape)} does not fit weight of shape {tuple(weight.shape)}")
    detach(module)
    module.register_buffer(BUFFER, keep.to(device=weight.device, dtype=torch.bool), persistent=False)
    with torch.no_grad():
        weight.mul_(module.prune_mask)
    owner = weakref.ref(module)
    setattr(weight, _OWNER, owner)
    module._prunekit_grad_hook = weight.register_hook(lambda grad: grad * owner().prune_mask)
    _ensure_step_hook()


def detach(module: nn.Module) -> None:
    """Removes the module's mask and hooks; the weights keep their zeros but may train again."""
    handle = module.__dict__.pop("_prunekit_grad_hook", None)
    if handle is not None:
        handle.remove()
    if hasattr(module.weight, _OWNER):
        delattr(module.weight, _OWNER)
    module._buffers.pop(BUFFER, None)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> keep-mask of every masked module."""
    return {name: m.prune_mask for name, m in model.named_modules() if BUFFER in m._buffers}


def remove_masks(model: nn.Module) -> int:
    """Removes every prunekit mask from the model (weights keep their zeros). Returns how many were removed."""
    names = masks(model)
    for name in names:
        detach(model.get_submodule(name))
    return len(names)


def _reapply(optimizer, args, kwargs) -> None:
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                owner = getattr(p, _OWNER, None)
                module = owner() if owner is not None else None
                if module is not None and BUFFER in module._buffers:
                    p.mul_(module.prune_mask)


def _ensure_step_hook() -> None:
    global _step_hook
    if _step_hook is None:
        _step_hook = register_optimizer_step_post_hook(_reapply)
