"""The widths of a structurally pruned model, recorded at save time and put back into a freshly built model of its
class at load time, for the models whose config cannot say them (a head-pruned BERT, per-layer widths, plain
modules). Models whose config holds every width reload with plain from_pretrained and need none of this."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import MaskMismatchError

# Width attributes that attention and MLP modules read in forward (or keep for reference); recorded where present.
WIDTHS = ("num_key_value_groups", "num_heads", "num_attention_heads", "num_key_value_heads", "all_head_size",
          "attn_dim", "intermediate_size", "head_dim", "attention_head_size")
_SIZES = {nn.Linear: ("out_features", "in_features"),
          nn.Conv1d: ("out_channels", "in_channels"), nn.Conv2d: ("out_channels", "in_channels"),
          nn.Conv3d: ("out_channels", "in_channels")}


def record(model: nn.Module) -> dict:
    """{"shapes": {parameter or buffer: shape}, "widths": {module: {attribute: value}}}."""
    shapes = {name: list(t.shape) for name, t in model.state_dict().items()}
    widths = {}
    for name, module in model.named_modules():
        found = {k: getattr(module, k) for k in WIDTHS if isinstance(vars(module).get(k), int)}
        if found:
            widths[name] = found
    return {"shapes": shapes, "widths": widths}


def restore(model: nn.Module, recorded: dict) -> nn.Module:
    """Gives every parameter and buffer of a freshly built model its recorded shape (contents are left to the weights
    loaded next) and sets the recorded width attributes, layer sizes (in/out features, channels, norm sizes) too.

    Only what record() writes is taken: width attributes named in WIDTHS, positive ints, on modules that have them
    as ints already; anything else in a manifest (edited or hostile) raises before the model is touched."""
    shapes = recorded["shapes"]
    modules = dict(model.named_modules())
    for name, found in recorded["widths"].items():
        module = modules.get(name)
        for key, value in (found.items() if isinstance(found, dict) else [("(not a map)", found)]):
            if (module is None or key not in WIDTHS or not isinstance(vars(module).get(key), int)
                    or isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise MaskMismatchError(f"the manifest sets {key}={value!r} on {name or 'the model'!r}, which is not a "
                                        f"width prunekit records (the manifest was edited, or is from another model)")
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        changed = False
        for key, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            shape = shapes.get(prefix + key)
            if tensor is None or shape is None or list(tensor.shape) == shape:
                continue
            if len(shape) != tensor.dim():
                raise MaskMismatchError(f"saved {prefix + key} has shape {shape}, the model's is {list(tensor.shape)}")
            fresh = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
            else:
                module._buffers[key] = fresh
            changed = True
        if changed:
            _resize_attributes(module)
        for key, value in recorded["widths"].get(name, {}).items():
            setattr(module, key, value)
    return model


def _resize_attributes(module: nn.Module) -> None:
    weight = getattr(module, "weight", None)
    if weight is None:
        return
    for cls, (out, inp) in _SIZES.items():
        if isinstance(module, cls):
            setattr(module, out, weight.shape[0])
            setattr(module, inp, weight.shape[1] * (getattr(module, "groups", 1) or 1))
            return
    if isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(weight.shape)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = weight.shape[0]
