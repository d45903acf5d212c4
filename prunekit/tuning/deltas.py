"""Deltas on disk: what training changed, saved in a folder that one loader reads for every method.

- `tuning_config.json`: the method's name and config (`Config.to_dict`), and a summary of what trained;
- `sparse_deltas.safetensors`: changes at entries (`<param>.indices`, `<param>.values`: flat indices into the
  weight and the change there), for LIFT, S2FT and SPT's unstructured matrices;
- `adapter_config.json` and `adapter_model.safetensors`: LoRA (or DoRA) adapters in peft's own format, for IST
  and SPT's structured matrices, so that `peft.PeftModel.from_pretrained(base, folder)` loads them too (over a
  pruned base, `prunekit.tuning.lowrank.protect` then keeps its pruned entries zero).

`load_deltas(model, folder)` adds them all to a fresh copy of the base model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import PrunekitError
from ..masks import rezero
from .base import Method
from .config import CONFIGS
from .lowrank import ADAPTER_FILES, check_adapter, merge_adapter, save_adapter

CONFIG_FILE = "tuning_config.json"
SPARSE_FILE = "sparse_deltas.safetensors"


def save_deltas(method: Method, path: str | Path) -> Path:
    """Writes the method's deltas, config and summary into the folder `path` (see the module docstring), replacing
    any deltas saved there before; returns the folder."""
    path = Path(path)
    if path.is_file():
        raise PrunekitError(f"deltas are saved as a folder, and {path} is a file; pass a folder path")
    path.mkdir(parents=True, exist_ok=True)
    for stale in (CONFIG_FILE, SPARSE_FILE, *ADAPTER_FILES):
        (path / stale).unlink(missing_ok=True)
    sparse = {k: v.detach().contiguous().cpu() for k, v in method.deltas().items()}
    if sparse:
        save_file(sparse, str(path / SPARSE_FILE), metadata={"format": "pt", "method": method.name})
    layers = method.lora_layers()
    if layers:
        save_adapter(method.model, layers, method.adapter, path)
    saved = {"method": method.name, "config": method.config.to_dict(), "summary": method.summary()}
    (path / CONFIG_FILE).write_text(json.dumps(saved, indent=1) + "\n")
    return path


def load_deltas(model: nn.Module, path: str | Path) -> dict:
    """Adds the deltas saved in the folder `path` to the model's weights (a fresh copy of the base the method was
    trained on, or a pruned copy of it: entries its prune masks remove stay zero). Every delta is checked against
    its weight before any weight changes. Returns what was saved: {"method": name, "config": the method's Config,
    read back and checked, "summary": {...}}."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise PrunekitError(f"{path} holds no {CONFIG_FILE}; load_deltas reads the folder that save_deltas wrote")
    saved = json.loads((path / CONFIG_FILE).read_text())
    if saved.get("method") not in CONFIGS:
        raise PrunekitError(f"{path / CONFIG_FILE} names the tuning method {saved.get('method')!r}; known: "
                            f"{', '.join(sorted(CONFIGS))}")
    saved["config"] = CONFIGS[saved["method"]].from_dict(saved.get("config", {}))
    adapter = (path / ADAPTER_FILES[0]).is_file()
    changes = _sparse_changes(model, path / SPARSE_FILE) if (path / SPARSE_FILE).is_file() else {}
    if adapter:
        check_adapter(model, path)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, change in changes.items():
            change()
            rezero(modules[name.rpartition(".")[0]])  # deltas trained on a dense model must not fill pruned entries
    if adapter:
        merge_adapter(model, path)
    return saved


def _sparse_changes(model: nn.Module, path: Path) -> dict[str, callable]:
    """weight name -> a function adding its saved sparse delta to it, after checking that every delta fits."""
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    changes = {}
    for key in tensors:
        name, _, kind = key.rpartition(".")
        if kind != "indices":
            continue
        if name not in params:
            raise PrunekitError(f"deltas at {path} change {name!r}, which this model does not have; load them onto "
                                f"the base model they were trained on")
        weight, indices, values = params[name], tensors[key].long(), tensors[f"{name}.values"]
        if indices.numel() and (indices.min() < 0 or indices.max() >= weight.numel()):
            raise PrunekitError(f"deltas at {path} index {name!r} up to {int(indices.max())}, but its weight here has "
                                f"{weight.numel()} entries (shape {tuple(weight.shape)}); a different base model?")
        changes[name] = lambda w=weight, i=indices, v=values: w.view(-1).index_add_(0, i.to(w.device),
                                                                                     v.to(w.device, w.dtype))
    return changes


def sparse_delta(name: str, indices: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The saved form of a change `values` at flat `indices` of weight `name`."""
    return {f"{name}.indices": indices.detach(), f"{name}.values": values.detach()}
