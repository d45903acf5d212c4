"""Save and load pruned models: Hugging Face save_pretrained plus bit-packed masks and the report."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from . import __version__, masks
from .bits import pack_bits, unpack_bits
from .errors import MaskMismatchError, PrunekitError
from .report import PruneReport

MANIFEST = "prunekit.json"
MASK_FILE = "prunekit_masks.safetensors"
PLAIN_WEIGHTS = "model.safetensors"


def clear_gguf_marker(model: nn.Module) -> bool:
    """Models loaded from GGUF hold dequantized weights but keep a quantization marker that makes
    save_pretrained refuse; drop it. Returns True if there was one."""
    config = getattr(model, "config", None)
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return False
    del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return True


def save_pruned(model: nn.Module, out_dir, report: PruneReport | None = None, tokenizer=None,
                evaluation: dict | None = None) -> Path:
    """Writes the model (save_pretrained for Hugging Face models, safetensors otherwise), its masks, the report
    and, if given, the tokenizer to out_dir.

    A structurally pruned model (report of a granularity="structured" prune) has no masks; its widths are recorded
    too, so that load_pruned rebuilds it when its config cannot say them (a head-pruned BERT, per-layer widths).
    An offloaded model (prunekit.load_offloaded) is streamed block by block into a sharded checkpoint.
    evaluation: measurements of the pruned model to keep beside the report ({"perplexity": 31.4, "dense": 13.1}),
    which `prunekit report` plots against sparsity.
    """
    from . import offload

    offloaded = offload.store(model)
    found = offloaded.packed_masks(model) if offloaded is not None else {
        name: (pack_bits(m.cpu()), list(m.shape)) for name, m in masks.masks(model).items()}
    structured = report is not None and bool(report.structures)
    if not found and not structured:
        raise PrunekitError("the model carries no prunekit masks; prune it with prunekit.prune first (a structurally "
                            "pruned model is saved with its report: save_pruned(model, dir, report))")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if offloaded is not None:
        offloaded.save_weights(model, out)
    elif hasattr(model, "save_pretrained"):
        if clear_gguf_marker(model):
            warnings.warn("cleared the model's GGUF quantization marker: its weights are dequantized float tensors "
                          "and are saved as such", stacklevel=2)
        model.save_pretrained(out)
    else:
        save_model(model, str(out / PLAIN_WEIGHTS))
    save_file({name: packed for name, (packed, _) in found.items()}, str(out / MASK_FILE))
    manifest = {"prunekit_version": __version__, "model_class": type(model).__name__,
                "masks": {name: shape for name, (_, shape) in found.items()},
                "report": report.to_dict() if report is not None else None}
    if evaluation:
        manifest["evaluation"] = evaluation
    if structured:
        from .structured.shapes import record

        manifest["structured"] = {**record(model), "reload": report.size.get("reload", "")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_pruned(path, model: nn.Module | None = None, **from_pretrained_kwargs) -> nn.Module:
    """Loads a model written by save_pruned and re-attaches its masks, so pruned entries stay zero in training.

    For a Hugging Face model the class comes from the saved config; for a plain nn.Module pass `model`, a
    freshly built instance of the same architecture, whose weights are replaced.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file() or not (path / MASK_FILE).is_file():
        raise PrunekitError(f"{path} is not a pruned model written by prunekit.save_pruned "
                            f"(missing {MANIFEST} or {MASK_FILE})")
    manifest = json.loads((path / MANIFEST).read_text())
    structured = manifest.get("structured")
    if structured is not None and (model is not None or structured["reload"] != "from_pretrained"):
        from .structured.shapes import restore

        model = restore(model if model is not None else _build_hf(path, manifest), structured)
        _load_weights(model, path)
    elif model is None:
        model = _load_hf(path, manifest, from_pretrained_kwargs)
    elif (path / PLAIN_WEIGHTS).is_file():
        try:
            missing, unexpected = load_model(model, str(path / PLAIN_WEIGHTS), strict=False)
        except RuntimeError as e:  # shape mismatches
            raise MaskMismatchError(f"the given model does not match the saved weights: {e}") from None
        if missing or unexpected:
            raise MaskMismatchError(f"the given model does not match the saved weights: missing "
                                    f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    else:
        raise PrunekitError(f"{path} holds a Hugging Face model; call load_pruned without `model`")
    packed = load_file(str(path / MASK_FILE))
    keeps = {}
    for name, shape in manifest["masks"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MaskMismatchError(f"saved mask for {name!r} has no module of that name in the model") from None
        weight = getattr(module, "weight", None)
        if weight is None or list(weight.shape) != shape:
            raise MaskMismatchError(f"saved mask for {name} has shape {shape} but the weight is "
                                    f"{None if weight is None else list(weight.shape)}")
        keep = unpack_bits(packed[name], shape).to(weight.device)
        stray = int((weight.detach()[~keep] != 0).sum())
        if stray:
            raise MaskMismatchError(f"masks do not match the weights: {stray} entries of {name} that the mask "
                                    f"prunes are nonzero; the weights were changed after pruning, or come from "
                                    f"another model")
        keeps[module] = keep
    for module, keep in keeps.items():  # only after every mask checked out
        masks.attach(module, keep)
    return model


def hf_class(path: Path, manifest: dict):
    """(model class, config) of a saved Hugging Face directory, by its config's architectures."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    names = (config.architectures or []) + [manifest.get("model_class")]
    cls = next((getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None)
    if cls is None:
        raise PrunekitError(f"cannot find the model class {names} in transformers; pass `model=` to load into")
    return cls, config


def _load_hf(path: Path, manifest: dict, kwargs: dict) -> nn.Module:
    cls, _ = hf_class(path, manifest)
    return cls.from_pretrained(path, **kwargs)


def _build_hf(path: Path, manifest: dict) -> nn.Module:
    """A fresh model of the saved class and config (random weights, replaced next), in eval mode as from_pretrained
    returns it."""
    cls, config = hf_class(path, manifest)
    return cls._from_config(config).eval()


def _load_weights(model: nn.Module, path: Path) -> None:
    """The saved weights into a model whose shapes already match them; keys the files leave out must be tied to
    one they hold (lm_head to the embeddings)."""
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.name != MASK_FILE:
            state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise MaskMismatchError(f"the saved weights do not fit the rebuilt model: missing {untied[:5]}, "
                                f"unexpected {list(unexpected)[:5]}")
