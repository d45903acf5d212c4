"""Save and load pruned models: compressed weights (compressed.py), or save_pretrained's dense ones and bit-packed
masks; the report beside them."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from . import __version__, masks
from . import compressed as compressed_format
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
                evaluation: dict | None = None, *, compressed: bool = True) -> Path:
    """Writes the model, its masks, the report and, if given, the tokenizer to out_dir.

    compressed (the default): every masked weight is stored as its kept values and a bitmask (compressed-tensors'
    sparse-bitmask layout, prunekit/compressed.py; a 50%-pruned fp32 layer takes 0.53 of its dense bytes), the rest
    dense; load_pruned reads it back into the same modules, converted layers included, without building the dense
    model first. compressed=False: Hugging Face's save_pretrained layout (plain nn.Modules: one safetensors file)
    with dense weights, plus the masks bit-packed in their own file; a plain from_pretrained loads it.

    A structurally pruned model (report of a granularity="structured" prune) has no masks; its widths are recorded
    too, so that load_pruned rebuilds it when its config cannot say them (a head-pruned BERT, per-layer widths).
    An offloaded model (prunekit.load_offloaded) is streamed block by block into a sharded checkpoint.
    evaluation: measurements of the pruned model to keep beside the report ({"perplexity": 31.4, "dense": 13.1}),
    which `prunekit report` plots against sparsity.
    """
    from . import offload

    offloaded = offload.store(model)
    if offloaded is not None:  # its masks stay packed: unpacked, a model's masks take a quarter of its fp32 size
        packed = {name: bits for name, (bits, _) in offloaded.packed_masks(model).items()}
        layers = {name: {"module": "masked"} for name in packed}
    else:
        state, keeps, layers = compressed_format.model_state(model, compressed)
        packed = None
    structured = report is not None and bool(report.structures)
    if not layers and not structured:
        raise PrunekitError("the model carries no prunekit masks; prune it with prunekit.prune first (a structurally "
                            "pruned model is saved with its report: save_pruned(model, dir, report))")
    compressed = compressed and bool(layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained") and clear_gguf_marker(model):
        warnings.warn("cleared the model's GGUF quantization marker: its weights are dequantized float tensors and "
                      "are saved as such", stacklevel=2)
    if offloaded is not None:
        offloaded.save_weights(model, out, compress=compressed)
    elif compressed:
        _save_compressed(model, out, compressed_format.compress_state(state, keeps), list(layers))
    elif hasattr(model, "save_pretrained"):
        model.save_pretrained(out, state_dict=state)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / PLAIN_WEIGHTS))
    if not compressed:
        if packed is None:
            packed = {name: pack_bits(keep.cpu()) for name, keep in keeps.items()}
        save_file(packed, str(out / MASK_FILE))
    manifest = {"prunekit_version": __version__, "model_class": type(model).__name__,
                "format": compressed_format.FORMAT if compressed else "dense",
                "masks": {name: _param_shape(model, name) for name in layers},
                "report": report.to_dict() if report is not None else None}
    if compressed:
        manifest["compressed"] = layers
    if evaluation:
        manifest["evaluation"] = evaluation
    if structured:
        from .structured.shapes import record

        manifest["structured"] = {**record(model), "reload": report.size.get("reload", "")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _param_shape(model: nn.Module, name: str) -> list[int]:
    """The shape of the weight parameter of module `name` in the dense model ([in, out] for a GPT-2 Conv1D)."""
    from .kernels.convert import SPARSE_MODULES

    module = model.get_submodule(name)
    if isinstance(module, SPARSE_MODULES):
        out_features, in_features = module.out_features, module.in_features
        return [out_features, in_features] if module.source == "Linear" else [in_features, out_features]
    return list(module.weight.shape)


def _save_compressed(model: nn.Module, out: Path, tensors: dict[str, torch.Tensor], layers: list[str]) -> None:
    """One shard, its index (with the sentinel that stops a plain from_pretrained), and the model's configs."""
    compressed_format.write_configs(model, out)
    shard = compressed_format.SHARD.format(1, 1)
    save_file(tensors, str(out / shard), metadata=compressed_format.SAFETENSORS_METADATA)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    compressed_format.write_index(out, dict.fromkeys(tensors, shard), size, layers)


def load_pruned(path, model: nn.Module | None = None, *, sparse: bool | None = None,
                **from_pretrained_kwargs) -> nn.Module:
    """Loads a model written by save_pruned and re-attaches its masks, so pruned entries stay zero in training.

    For a Hugging Face model the class comes from the saved config; for a plain nn.Module pass `model`, a
    freshly built instance of the same architecture, whose weights are replaced.
    sparse (a compressed directory): None brings every layer back as it was saved (masked Linears, or the layers
    prunekit.kernels.convert made); True makes every masked layer a BitmaskLinear (a BlockSparseLinear stays one)
    without ever building its dense weight; False makes every layer a masked dense Linear.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise PrunekitError(f"{path} is not a pruned model written by prunekit.save_pruned (missing {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") == compressed_format.FORMAT:
        return _load_compressed(path, manifest, model, sparse, from_pretrained_kwargs)
    if not (path / MASK_FILE).is_file():
        raise PrunekitError(f"{path} is not a pruned model written by prunekit.save_pruned (missing {MASK_FILE})")
    if sparse:
        raise PrunekitError(f"{path} holds dense weights (saved with compressed=False); load it and call "
                            f"prunekit.kernels.convert(model), or save it compressed")
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




def is_compressed(path) -> bool:
    """Whether a directory written by save_pruned holds compressed weights."""
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("format") == compressed_format.FORMAT


def _load_compressed(path: Path, manifest: dict, model: nn.Module | None, sparse: bool | None,
                     kwargs: dict) -> nn.Module:
    """A compressed directory: every entry checked first, then the model built with its parameters on the meta
    device (nothing dense is allocated), the compressed layers put in, and the rest of the weights assigned."""
    from .offload import parameters_on_meta

    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if kwargs:
        raise PrunekitError(f"load_pruned takes no {', '.join(kwargs)} for a compressed directory (only dtype)")
    tensors = compressed_format.read(path)
    layers = manifest["compressed"]
    entries = compressed_format.take_layers(tensors, layers)
    structured = manifest.get("structured")
    if model is None:
        cls, config = hf_class(path, manifest)
        with parameters_on_meta():
            model = cls._from_config(config)
        model.eval()
        if (path / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
    if structured is not None:
        from .structured.shapes import restore

        model = restore(model, structured)
    compressed_format.install(model, layers, entries, tensors, sparse)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [name for name, p in model.named_parameters() if p.is_meta]
    if left or unexpected:
        raise MaskMismatchError(f"the saved weights do not fit the model: missing {left[:5]}, unexpected "
                                f"{list(unexpected)[:5]}")
    return model if dtype is None else model.to(dtype)


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
