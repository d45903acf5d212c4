"""peft LoRA adapters that keep pruned entries zero, saved and merged in peft's own format.

A LoRA adapter adds scale · B @ A to a weight; over a pruned weight that product is dense, so the adapted layer
would compute with weights where the mask says zero, and merging would undo the pruning. `protect` gives every
adapter over a pruned Linear a peft LoRA variant (peft's own extension point, the one DoRA uses) whose delta is
(scale · B @ A) ⊙ mask in the forward pass, in merge and in unmerge. Its autograd function saves only the input,
the two factors and the bool mask buffer it already has, and rebuilds the masked product in backward, so training
holds no new dense matrix per layer: one exists at a time, while its layer computes (Sun et al.'s masked LoRA
recovery in "A Simple and Effective Pruning Approach for LLMs" trains the adapters and merges them unmasked, losing
the sparsity; this keeps it).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import PrunekitError
from ..masks import rezero
from ..targets import PRUNABLE
from .base import pruned

PEFT_PREFIX = "base_model.model."  # where a PeftModel keeps the user's model
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft's save_pretrained writes


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> every peft LoRA layer (Linear) in the model."""
    from peft.tuners.lora import Linear

    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def base_name(name: str) -> str:
    """The name a module has in the plain model (without a PeftModel's prefix)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def inject(model: nn.Module, names: list[str], rank: int, alpha: float | None = None, dropout: float = 0.0,
           dora: bool = False) -> dict[str, nn.Module]:
    """Injects peft LoRA (adapter "default", alpha = 2 · rank unless given) in place into exactly the named Linear
    (or GPT-2 Conv1D) modules, protects pruned ones (see `protect`) and returns the new layers by name. Freezes
    nothing."""
    import peft

    if not names:
        raise PrunekitError("no layers named to put LoRA on")
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), PRUNABLE)]
    if missing:
        raise PrunekitError(f"LoRA goes on Linear (or GPT-2 Conv1D) layers; {', '.join(missing[:3])} "
                            f"{'is' if len(missing) == 1 else 'are'} not one in {type(model).__name__}")
    if not isinstance(rank, int) or rank < 1:
        raise PrunekitError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if dora:
        over_pruned = [n for n in names if pruned(modules[n]) is not None]
        if over_pruned:
            raise PrunekitError(_DORA_PRUNED.format(over_pruned[0]))
    for transposed in (False, True):  # peft's fan_in_fan_out is per config: Linear and Conv1D go separately
        group = [n for n in names if isinstance(modules[n], nn.Linear) != transposed]
        if group:
            config = peft.LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                                     use_dora=dora, fan_in_fan_out=transposed,
                                     target_modules="^(" + "|".join(map(re.escape, group)) + ")$")
            peft.inject_adapter_in_model(config, model)
    layers = {name: m for name, m in lora_layers(model).items() if name in set(names)}
    protect(layers)
    return layers


_DORA_PRUNED = ("{} is pruned; DoRA normalises each column of W + BA, which the prune mask would change, so it "
                "cannot keep the pruned entries zero: use LoRA (dora=False) on pruned models")


def check_protectable(layers: dict[str, nn.Module]) -> None:
    """Raises if `protect` could not keep some adapter's pruned entries zero (a DoRA or other LoRA variant over a
    pruned layer); changes nothing."""
    for name, layer in layers.items():
        if pruned(layer.get_base_layer()) is None:
            continue
        for adapter in layer.lora_A:
            variant = layer.lora_variant.get(adapter)
            if variant is not None and not isinstance(variant, MaskedLoRA):
                kind = "DoRA" if getattr(layer, "use_dora", {}).get(adapter) else type(variant).__name__
                raise PrunekitError(f"{name} is pruned and its adapter {adapter!r} is {kind}, which cannot keep the "
                                    f"pruned entries zero; use plain LoRA (use_dora=False) on pruned models")


def protect(layers: dict[str, nn.Module]) -> None:
    """Makes every adapter over a pruned base layer compute its delta masked by the prune mask (forward, merge,
    unmerge). Idempotent; checks every layer (`check_protectable`) before it changes any."""
    check_protectable(layers)
    for layer in layers.values():
        if pruned(layer.get_base_layer()) is not None:
            for adapter in layer.lora_A:
                layer.lora_variant.setdefault(adapter, MaskedLoRA())


def _keep(module) -> torch.Tensor:
    """The prune mask in the [out, in] orientation of B @ A."""
    keep = pruned(module.get_base_layer())
    return keep.T if module.fan_in_fan_out else keep


class _MaskedProduct(torch.autograd.Function):
    """y = x @ (scale · (B @ A) ⊙ keep)ᵀ for a bool keep, saving x, A, B and the mask (no new memory) only; the
    masked product is rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, a, b, keep, scale):
        ctx.save_for_backward(x, a, b, keep)
        ctx.scale = scale
        return x @ ((b @ a) * keep).mT * scale

    @staticmethod
    def backward(ctx, grad):
        x, a, b, keep = ctx.saved_tensors
        scale = ctx.scale
        grad_x = grad @ ((b @ a) * keep) * scale if ctx.needs_input_grad[0] else None
        # dL/d(B @ A) = scale · (gradᵀ x) ⊙ keep, then the chain rule through the product
        g = (grad.reshape(-1, grad.shape[-1]).mT @ x.reshape(-1, x.shape[-1])) * keep * scale
        return grad_x, b.mT @ g, g @ a.mT, None, None


class MaskedLoRA:
    """A peft LoRA variant: the adapter's delta is masked by its base layer's prune mask."""

    @staticmethod
    def supports_lora_conversion() -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        pass

    @staticmethod
    def delta(module, adapter: str) -> torch.Tensor:
        """The masked delta in the base weight's orientation."""
        return module.get_delta_weight(adapter) * pruned(module.get_base_layer())

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + MaskedLoRA.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += MaskedLoRA.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - MaskedLoRA.delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        a, b = module.lora_A[active_adapter].weight, module.lora_B[active_adapter].weight
        x = module.lora_dropout[active_adapter](x)
        # The bool mask itself (a view of the buffer): a float copy would be saved for backward in every layer,
        # one dense matrix per layer alive through the whole forward.
        return result + _MaskedProduct.apply(x, a, b, _keep(module), module.scaling[active_adapter])


def save_adapter(model: nn.Module, layers: dict[str, nn.Module], adapter: str, path: Path) -> None:
    """Writes `adapter` of the LoRA `layers` into the folder `path` as peft's save_pretrained does
    (adapter_config.json, adapter_model.safetensors with keys named as in a PeftModel), so that
    peft.PeftModel.from_pretrained(base, path) loads it. The config is the one peft made the layers from, with
    target_modules naming exactly these layers (prunekit injects Linear and Conv1D layers by separate configs)."""
    from peft import get_peft_model_state_dict

    config = copy.deepcopy(model.peft_config[adapter])
    config.target_modules = "^(" + "|".join(re.escape(base_name(n)) for n in layers) + ")$"
    config.fan_in_fan_out = any(layer.fan_in_fan_out for layer in layers.values())  # peft flips it per layer
    config.inference_mode = True
    config.base_model_name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config.save_pretrained(str(path))
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    save_file({PEFT_PREFIX + base_name(k): v.detach().contiguous().cpu() for k, v in state.items()},
              str(path / ADAPTER_FILES[1]), metadata={"format": "pt"})


def check_adapter(model: nn.Module, path: Path) -> None:
    """Raises unless every LoRA factor saved in `path` fits a Linear (or Conv1D) layer of `model`; reads the
    shapes only, changes nothing."""
    modules = dict(model.named_modules())
    with safe_open(str(path / ADAPTER_FILES[1]), framework="pt") as f:
        for key in f.keys():
            name, _, factor = base_name(key).rpartition(".lora_")
            if not factor:
                continue
            module = modules.get(name)
            if not isinstance(module, PRUNABLE):
                raise PrunekitError(f"the adapter at {path} changes {name!r}, which is not a Linear or Conv1D layer "
                                    f"of {type(model).__name__}; load it onto the base model it was trained on")
            out_features, in_features = _out_in(module)
            shape = f.get_slice(key).get_shape()
            fits = {"A.weight": shape[-1] == in_features, "B.weight": shape[0] == out_features}.get(factor, True)
            if not fits:
                raise PrunekitError(f"the adapter at {path} holds {key} of shape {tuple(shape)}, which does not fit "
                                    f"{name!r} ({out_features} outputs, {in_features} inputs) here; a different "
                                    f"base model?")


def merge_adapter(model: nn.Module, path: Path) -> None:
    """Merges the peft LoRA (or DoRA) adapter saved in `path` into the model's weights through peft itself
    (PeftModel.from_pretrained, then merge_and_unload), leaving the model as it was otherwise (same modules, same
    requires_grad); entries that a prune mask removes stay zero."""
    from peft import PeftModel

    check_adapter(model, path)
    requires = [(p, p.requires_grad) for p in model.parameters()]
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()  # the model itself, adapters folded in
    for p, flag in requires:
        p.requires_grad_(flag)
    for module in merged.modules():
        rezero(module)


def _out_in(module: nn.Module) -> tuple[int, int]:
    """(outputs, inputs) of a Linear, or of a GPT-2 Conv1D (whose weight is stored [in, out])."""
    out_features, in_features = module.weight.shape
    return (out_features, in_features) if isinstance(module, nn.Linear) else (in_features, out_features)
