"""The compressed checkpoint: each masked weight stored as compressed-tensors' "sparse-bitmask" entries, the rest of
the model dense; written by save_pruned, read back by load_pruned straight into sparse layers.

For a masked module `M` ("model.layers.0.mlp.up_proj"), whose weight parameter is [rows, cols] as stored (a GPT-2
Conv1D's is [in, out]), the weights files hold, as compressed-tensors' BitmaskCompressor writes them and its
decompress reads them back into `M.weight`:

    M.shape        int64 [2]                    the dense shape [rows, cols]
    M.compressed   [kept]                       the kept weights, row by row, in the model's dtype
    M.bitmask      uint8 [rows, ceil(cols / 8)] one bit per weight, 1 = kept, least significant bit first
    M.row_offsets  int64 [rows]                 where each row's weights start in M.compressed

The bitmask is the prunekit mask itself (a kept weight that happens to be 0 is stored), so no masks file is needed.
The shards are listed in model.safetensors.index.json, which also maps every compressed `M.weight` to a file that is
deliberately absent (SENTINEL): transformers' from_pretrained, which cannot decompress these entries, stops on it
with an error naming prunekit.load_pruned instead of loading the model with random weights where `M.weight` should
be.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .bits import unpack_rows
from .checkpoint import INDEX
from .errors import MaskMismatchError, PrunekitError

FORMAT = "sparse-bitmask"
SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
SENTINEL = "prunekit-compressed--load-with-prunekit.load_pruned.safetensors"
SHARD = "model-{:05d}-of-{:05d}.safetensors"


def entries(name: str, shape, values: torch.Tensor, bitmask: torch.Tensor,
            row_offsets: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four entries of module `name`'s compressed weight."""
    tensors = (torch.tensor(list(shape), dtype=torch.int64), values.detach(), bitmask, row_offsets)
    return {f"{name}.{s}": t.cpu().contiguous() for s, t in zip(SUFFIXES, tensors)}


def compress_state(state: dict[str, torch.Tensor], keeps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with the weight of every module named in `keeps` (module name -> keep-mask of its weight parameter)
    replaced by its four bitmask entries."""
    from .kernels.bitmask import compress

    out = dict(state)
    for name, keep in keeps.items():
        weight = out.pop(f"{name}.weight").detach()
        out.update(entries(name, weight.shape, *compress(weight, keep.to(weight.device))))
    return out


def model_state(model: nn.Module, compressed: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                              dict[str, dict]]:
    """(state, keeps, layers) of a pruned model, converted or not: its state dict as the dense model's keys (with
    `compressed`, a BitmaskLinear's weight already as its entries; every other weight dense), the keep-mask of
    every other masked weight, and name -> {"module": what each masked layer is, "block": its block size}. Tied
    copies (lm_head of the embeddings) are left out, as save_pretrained does."""
    from .kernels.bitmask import BitmaskLinear
    from .kernels.convert import SPARSE_MODULES
    from .kernels.linear import BlockSparseLinear
    from .masks import masks

    sparse = {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_MODULES)}
    inside = tuple(f"{name}." for name in sparse)
    state, seen = {}, set()
    for key, tensor in model.state_dict().items():
        if (inside and key.startswith(inside)) or (tensor.numel() and tensor.data_ptr() in seen):
            continue
        seen.add(tensor.data_ptr())
        state[key] = tensor
    keeps = {name: keep for name, keep in masks(model).items() if name not in sparse}
    layers = {name: {"module": "masked"} for name in keeps}
    for name, module in sparse.items():
        layers[name] = {"module": type(module).__name__}
        if isinstance(module, BlockSparseLinear):
            layers[name]["block"] = module.block
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
        if compressed and isinstance(module, BitmaskLinear) and module.source == "Linear":
            state.update(entries(name, module.shape, module.values, module.bitmask, module.row_offsets))
            continue
        dense = module.to_dense()
        state[f"{name}.weight"], keeps[name] = dense.weight.detach(), dense.prune_mask
    return state, keeps, layers


def write_configs(model: nn.Module, out: Path) -> None:
    """The model's config and generation config (what from_pretrained reads besides the weights), if it has them."""
    if getattr(model, "config", None) is not None:
        model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        with contextlib.suppress(ValueError):  # an invalid generation config is not the weights' business
            model.generation_config.save_pretrained(out)


def write_index(out: Path, weight_map: dict[str, str], size: int, compressed: list[str]) -> None:
    """The shards' index, with each compressed layer's dense weight mapped to the absent SENTINEL file."""
    weight_map = {**weight_map, **{f"{name}.weight": SENTINEL for name in compressed}}
    index = {"metadata": {"total_size": size, "format": f"prunekit {FORMAT}"}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=1))


def read(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed directory's shards."""
    index = json.loads((path / INDEX).read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(index.values()) - {SENTINEL}):
        with safe_open(str(path / file), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def take_layers(tensors: dict[str, torch.Tensor], layers: dict[str, dict]) -> dict[str, tuple]:
    """Pops each compressed layer's entries from `tensors` and checks them: name -> (values, bitmask, row_offsets,
    shape). Raises MaskMismatchError on entries that are missing or disagree, before anything is built."""
    from .kernels.bitmask import check

    found = {}
    for name in layers:
        keys = [f"{name}.{s}" for s in SUFFIXES]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise MaskMismatchError(f"the checkpoint lacks {missing[0]}, an entry of compressed layer {name}")
        shape_t, values, bitmask, row_offsets = (tensors.pop(k) for k in keys)
        shape = tuple(int(v) for v in shape_t.tolist())
        check(values, bitmask, row_offsets, shape, what=name)
        found[name] = (values, bitmask, row_offsets, shape)
    return found


def install(model: nn.Module, layers: dict[str, dict], entries: dict[str, tuple], tensors: dict[str, torch.Tensor],
            sparse: bool | None) -> None:
    """Puts each compressed layer into `model` (whose modules may still be on the meta device) as the module it was
    saved from, or (sparse=True) as a sparse layer, or (sparse=False) as a masked dense one; biases come from
    `tensors`. Every layer is built before the first is swapped in."""
    from .kernels.bitmask import BitmaskLinear, decompress
    from .kernels.linear import BlockSparseLinear, dense_module
    from .targets import PRUNABLE

    built = []
    for name, (values, bitmask, row_offsets, shape) in entries.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MaskMismatchError(f"compressed layer {name!r} has no module of that name in the model") from None
        if not isinstance(module, PRUNABLE) or tuple(module.weight.shape) != shape:
            found = f"weight {list(module.weight.shape)}" if isinstance(module, PRUNABLE) else "no Linear weight"
            raise MaskMismatchError(f"compressed layer {name} holds a {list(shape)} weight but the model's "
                                    f"{type(module).__name__} there has {found}")
        source = "Linear" if isinstance(module, nn.Linear) else "Conv1D"
        bias = tensors.pop(f"{name}.bias", None)
        kind = layers[name].get("module", "masked")
        if sparse is True and kind == "masked":
            kind = "BitmaskLinear"
        elif sparse is False:
            kind = "masked"
        if kind == "BitmaskLinear" and source == "Linear":  # straight from the entries: nothing dense, ever
            built.append((name, BitmaskLinear(values, bitmask, row_offsets, shape, bias, source=source)))
            continue
        weight, keep = decompress(values, bitmask, row_offsets, shape), unpack_rows(bitmask, shape[1])
        if source == "Conv1D":  # the modules below take [out, in]
            weight, keep = weight.t(), keep.t()
        dense = dense_module(weight, bias, keep, source)
        if kind == "BitmaskLinear":
            dense = BitmaskLinear.from_dense(dense)
        elif kind == "BlockSparseLinear":
            dense = BlockSparseLinear.from_dense(dense, block=layers[name]["block"])
        elif kind != "masked":
            raise PrunekitError(f"compressed layer {name} was saved from a {kind}, which this prunekit does not know")
        built.append((name, dense))
    for name, new in built:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
