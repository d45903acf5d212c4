"""Training a few selected entries of a weight in place, with memory that scales with the selection.

`select(param, indices)` makes a parameter train only at the given flat indices. The selection holds those entries
as a float32 parameter of their own, `values`, which is what an optimizer trains. The weight's gradient is reduced
into `values.grad` as soon as autograd has accumulated it (a post-accumulate-grad hook), and the dense gradient is
dropped right there, so at most one dense gradient exists at a time, during backward, never one per parameter.

`adamw(params)` is torch's own AdamW (fused where the device has the kernel, else foreach) over them: state (two
moments) for the selected entries only. Around each step, `trains_selections` hooks read the values from their
weights and write the updated values back in place (the weight stays the truth, whatever its dtype; the update
is computed in float32). Selections can change during training (`reselect`): moments carry over for entries that
stay.

Pruned entries (prunekit's masks) are never selected by the methods; one selected by hand still gets a zero
gradient from the masks' gradient hook, so AdamW leaves it at zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PrunekitError

_ATTR = "_prunekit_selection"  # on a selected weight and on its values: the Selection
_HOOKED = "_prunekit_selections_hooked"  # on an optimizer that reads and writes selections around its steps


@dataclass
class Selection:
    """The trainable entries of one parameter: sorted flat indices, their values as the parameter an optimizer
    trains (its .grad: the accumulated gradient of those entries), and the original values of every entry training
    ever touched (for deltas)."""

    weight: nn.Parameter
    indices: torch.Tensor
    values: nn.Parameter
    touched: torch.Tensor
    original: torch.Tensor
    hook: object = None  # the handle of the gradient-reducing hook

    @property
    def grad(self) -> torch.Tensor | None:
        return self.values.grad


def selection(param: torch.Tensor) -> Selection | None:
    """The selection of a weight (or of its values), None if it has none."""
    return getattr(param, _ATTR, None)


def _reduce_grad(param: torch.Tensor) -> None:
    """Post-accumulate hook: keep the selected entries of the gradient, free the dense one."""
    sel = selection(param)
    picked = param.grad.view(-1)[sel.indices].float()
    if sel.values.grad is None:
        sel.values.grad = picked
    else:
        sel.values.grad += picked  # gradient accumulation over micro-batches
    param.grad = None


def select(param: nn.Parameter, indices: torch.Tensor) -> None:
    """Makes `param` train only at the flat `indices` (through `selection(param).values`); see the module
    docstring."""
    indices = _checked(param, indices)
    if selection(param) is not None:
        raise PrunekitError("this parameter already has a selection; use reselect to change it")
    picked = param.detach().view(-1)[indices]
    # touched is indices itself until a reselect adds entries: neither is ever changed in place
    sel = Selection(param, indices, nn.Parameter(picked.to(torch.float32, copy=True)), indices, picked)
    setattr(param, _ATTR, sel)
    setattr(sel.values, _ATTR, sel)
    param.requires_grad_(True)
    sel.hook = param.register_post_accumulate_grad_hook(_reduce_grad)


def reselect(param: nn.Parameter, indices: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Changes the selection of `param`; the optimizer's moments carry over for entries in both selections."""
    sel, indices = selection(param), _checked(param, indices)
    if optimizer is not None:
        _carry(optimizer.state.get(sel.values), sel.indices, indices)
    new = indices[~_contains(sel.touched, indices)]
    if new.numel():  # untouched entries still hold their original values
        touched = torch.cat([sel.touched, new])
        order = touched.argsort()
        sel.touched = touched[order]
        sel.original = torch.cat([sel.original, param.detach().view(-1)[new]])[order]
    sel.indices = indices
    sel.values.grad = None
    sel.values.data = param.detach().view(-1)[indices].float()  # the same parameter, so optimizers keep it


def _carry(state: dict | None, old: torch.Tensor, new: torch.Tensor) -> None:
    """Moves every per-entry state tensor (the moments) from the old selection to the new one; zeros for entries
    new to it. Scalars (the step count) stay."""
    if not state:
        return
    keep = _contains(old, new)
    where = torch.searchsorted(old, new[keep])
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape:
            moved = value.new_zeros(new.shape)
            moved[keep] = value[where]
            state[key] = moved


def unselect(param: nn.Parameter) -> None:
    """Removes the selection and its gradient hook; the parameter stops training."""
    param.requires_grad_(False)
    sel = selection(param)
    if sel is not None:
        sel.hook.remove()
        delattr(param, _ATTR)


def change(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat indices, value now − value before training) over every entry training touched."""
    sel = selection(param)
    return sel.touched, param.detach().view(-1)[sel.touched] - sel.original


def _checked(param: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    indices = torch.as_tensor(indices, device=param.device).long().view(-1).unique()  # unique sorts
    if indices.numel() and (indices[0] < 0 or indices[-1] >= param.numel()):
        raise PrunekitError(f"selected indices must lie in [0, {param.numel()}) for a parameter of shape "
                            f"{tuple(param.shape)}")
    return indices


def _contains(sorted_values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """For each query, whether it occurs in the sorted 1-D tensor."""
    if not sorted_values.numel():
        return torch.zeros_like(queries, dtype=torch.bool)
    pos = torch.searchsorted(sorted_values, queries).clamp(max=sorted_values.numel() - 1)
    return sorted_values[pos] == queries


# -- the optimizer

def trained(param: torch.Tensor) -> torch.Tensor:
    """What an optimizer trains for `param`: the values of its selection, or the parameter itself."""
    sel = selection(param)
    return param if sel is None else sel.values


def adamw(params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch.optim.AdamW over `params` (a selected weight stands for its selected values; any other parameter
    trains whole, as an adapter beside sparse updates does), fused where torch has the kernel for every
    parameter's device, else foreach; with `trains_selections` hooks."""
    params = list(dict.fromkeys(trained(p) for p in params))
    fused = _fusable(params)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  fused=fused or None, foreach=None if fused else True)
    return trains_selections(optimizer)


def _fusable(params: list[torch.Tensor]) -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # what AdamW checks itself
    except ImportError:
        return False
    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def trains_selections(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Makes any optimizer over selections' values train them in their weights: before every step each value is
    read from its weight, after it written back. Once per optimizer; the hooks run first, before any registered
    later (a method's refresh reads the updated weights)."""
    if getattr(optimizer, _HOOKED, False):
        return optimizer
    setattr(optimizer, _HOOKED, True)
    optimizer.register_step_pre_hook(lambda opt, *_: _gather(opt))
    optimizer.register_step_post_hook(lambda opt, *_: _scatter(opt))
    return optimizer


def _selections(optimizer: torch.optim.Optimizer) -> list[Selection]:
    return [sel for group in optimizer.param_groups for p in group["params"]
            if (sel := selection(p)) is not None and p is sel.values]


@torch.no_grad()
def _gather(optimizer) -> None:
    for sel in _selections(optimizer):
        sel.values.copy_(sel.weight.view(-1)[sel.indices])


@torch.no_grad()
def _scatter(optimizer) -> None:
    for sel in _selections(optimizer):
        sel.weight.view(-1).index_copy_(0, sel.indices, sel.values.to(sel.weight.dtype))


def state_size(optimizer: torch.optim.Optimizer) -> int:
    """How many moment values the optimizer holds (two per trained entry once it has stepped)."""
    return sum(s[k].numel() for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq") if k in s)
