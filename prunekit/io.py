"""Save and load pruned models: compressed weights (compressed.py), or save_pretrained's dense ones and bit-packed
masks; the report beside them.

A saved directory is written whole into a temporary directory beside the target and renamed into place, so that an
interruption leaves the old directory or none, never a mix; its manifest records each masked layer's shape, kept
count and mask checksum and every file's sha256, which load_pruned verifies before it changes anything.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from . import compressed as compressed_format
from . import masks, offload
from .bits import count_bits, pack_bits, unpack_bits, unpack_rows
from .checkpoint import (
    INTEGRITY,
    MANIFEST,
    MASK_FILE,
    SAFETENSORS_METADATA,
    WEIGHTS,
    empty_model,
    hf_class,
    read_manifest,
)
from .errors import MaskMismatchError, PrunekitError
from .report import PruneReport
from .version import __version__


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

    The directory is written whole beside out_dir and renamed into place: an existing one (written by save_pruned)
    is replaced only once the new one is complete. A directory holding other files is written into in place, the
    manifest last (without it, nothing loads). The manifest records, per masked layer, its shape, kept count and
    mask checksum, and every file's sha256; load_pruned checks them all.
    """
    offloaded = offload.store(model)
    if offloaded is not None:  # its masks stay packed: unpacked, a model's masks take a quarter of its fp32 size
        packed = {name: bits for name, (bits, _) in offloaded.packed_masks(model).items()}
        layers = {name: {"module": "masked"} for name in packed}
        state = keeps = None
    else:
        state, keeps, layers = compressed_format.model_state(model, compressed)
        packed = None
    structured = report is not None and bool(report.structures)
    if not layers and not structured:
        raise PrunekitError("the model carries no prunekit masks; prune it with prunekit.prune first (a structurally "
                            "pruned model is saved with its report: save_pruned(model, dir, report))")
    compressed = compressed and bool(layers)
    out = Path(out_dir)
    _check_target(out, offloaded)
    # A directory holding files of its own is written in place, its old manifest removed first and the new one
    # written last (the commit record: without it nothing loads); any other is written whole beside the target and
    # renamed into place.
    in_place = not _replaceable(out)
    staging = out if in_place else out.parent / f".{out.name}.prunekit-tmp-{uuid.uuid4().hex[:8]}"
    before = _stamps(staging) if in_place else {}
    if in_place:
        (out / MANIFEST).unlink(missing_ok=True)
    staging.mkdir(parents=True, exist_ok=in_place)
    try:
        records = _write(model, staging, offloaded, packed, state, keeps, layers, compressed)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        manifest = {"prunekit_version": __version__, "model_class": type(model).__name__,
                    "format": compressed_format.FORMAT if compressed else "dense",
                    "masks": {name: record["shape"] for name, record in records.items()},
                    "report": report.to_dict() if report is not None else None}
        if compressed:
            manifest["compressed"] = layers
        if evaluation:
            manifest["evaluation"] = evaluation
        if structured:
            from .structured.shapes import record

            manifest["structured"] = {**record(model), "reload": report.size.get("reload", "")}
        written = [name for name, stamp in _stamps(staging).items() if before.get(name) != stamp]
        manifest[INTEGRITY] = {"layers": records, "files": {name: file_sha256(staging / name) for name in written}}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if not in_place:
            _commit(staging, out)
    except BaseException:
        if not in_place:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _replaceable(out: Path) -> bool:
    """Whether `out` may be replaced whole: absent, empty, or holding nothing but what a save_pruned recorded."""
    if not out.is_dir():
        return True
    names = {f.name for f in out.iterdir()}
    if not names:
        return True
    try:
        ours = set(json.loads((out / MANIFEST).read_text())[INTEGRITY]["files"]) | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return names <= ours


def _stamps(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (modification time, size) of the files in a directory (which of them a save wrote)."""
    return {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(directory.iterdir()) if f.is_file()} \
        if directory.is_dir() else {}


def _check_target(out: Path, offloaded) -> None:
    """Refuses, before anything is written, a target that is a file or the directory an offloaded model reads its
    weights from."""
    if out.is_file():
        raise PrunekitError(f"{out} is a file; save_pruned writes a directory")
    if offloaded is not None and out.exists() and out.resolve() == offloaded.checkpoint.path.resolve():
        raise PrunekitError(f"{out} is the directory this offloaded model reads its weights from; save it to "
                            f"another directory")


def _write(model, out: Path, offloaded, packed, state, keeps, layers, compressed: bool) -> dict:
    """The weights (and, dense, the masks file) into `out`; returns the mask record of every masked layer."""
    if hasattr(model, "save_pretrained") and clear_gguf_marker(model):
        warnings.warn("cleared the model's GGUF quantization marker: its weights are dequantized float tensors and "
                      "are saved as such", stacklevel=3)
    shapes = {name: _param_shape(model, name) for name in layers}
    if offloaded is not None:
        offloaded.save_weights(model, out, compress=compressed)
        records = {name: mask_record(bits, shapes[name]) for name, bits in packed.items()}
    elif compressed:
        tensors = compressed_format.compress_state(state, keeps)
        records = {name: mask_record(pack_bits(unpack_rows(tensors[f"{name}.bitmask"], shapes[name][-1])),
                                     shapes[name]) for name in layers}
        _save_compressed(model, out, tensors, list(layers))
    else:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out, state_dict=state)
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS))
        packed = {name: pack_bits(keep.cpu()) for name, keep in keeps.items()}
        records = {name: mask_record(bits, shapes[name]) for name, bits in packed.items()}
    if not compressed:
        save_file(packed, str(out / MASK_FILE))
    return records


def _commit(tmp: Path, out: Path) -> None:
    """tmp becomes out: the old directory is moved aside first and deleted last, so that an interruption leaves
    the old directory, or none (then the new one is still complete in tmp), never a mix."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.prunekit-old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)  # the old directory back in place
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def mask_record(bits: torch.Tensor, shape) -> dict:
    """What a manifest records of a layer's mask, from its bits packed 8 to a byte (bits.pack_bits, whatever the
    format stored them as): its shape, how many weights it keeps, and the sha256 of the packed bits."""
    bits = bits.cpu()
    return {"shape": list(shape), "kept": count_bits(bits), "sha256": hashlib.sha256(bits.numpy().tobytes()).hexdigest()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    save_file(tensors, str(out / shard), metadata=SAFETENSORS_METADATA)
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
    manifest = read_manifest(path)
    verify_files(path, manifest)
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
    elif (path / WEIGHTS).is_file():
        try:
            missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
        except RuntimeError as e:  # shape mismatches
            raise MaskMismatchError(f"the given model does not match the saved weights: {e}") from None
        if missing or unexpected:
            raise MaskMismatchError(f"the given model does not match the saved weights: missing "
                                    f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    else:
        raise PrunekitError(f"{path} holds a Hugging Face model; call load_pruned without `model`")
    try:
        packed = load_file(str(path / MASK_FILE))
    except Exception as e:  # noqa: BLE001 - safetensors' own errors say little about what to do
        raise MaskMismatchError(f"{path / MASK_FILE} cannot be read ({e}); the directory is damaged: save the model "
                                f"again") from None
    keeps = {}
    for name, shape in manifest["masks"].items():
        if name not in packed or packed[name].dtype != torch.uint8 or packed[name].numel() != -(-math.prod(shape) // 8):
            raise MaskMismatchError(f"the masks file has no packed mask of {math.prod(shape)} bits for {name}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MaskMismatchError(f"saved mask for {name!r} has no module of that name in the model") from None
        weight = getattr(module, "weight", None)
        if weight is None or list(weight.shape) != shape:
            raise MaskMismatchError(f"saved mask for {name} has shape {shape} but the weight is "
                                    f"{None if weight is None else list(weight.shape)}")
        verify_layer(manifest, name, packed[name], shape)
        keep = unpack_bits(packed[name], shape).to(weight.device)
        stray = int((weight.detach()[~keep] != 0).sum())
        if stray:
            raise MaskMismatchError(f"masks do not match the weights: {stray} entries of {name} that the mask "
                                    f"prunes are nonzero; the weights were changed after pruning, or come from "
                                    f"another model")
        keeps[module] = keep
    verify_layer_set(manifest, {name for name in manifest["masks"]})
    for module, keep in keeps.items():  # only after every mask checked out
        masks.attach(module, keep)
    return model


def verify_files(path: Path, manifest: dict) -> None:
    """Every file the manifest lists, present and with its recorded sha256 (MaskMismatchError naming the file); a
    directory from before these records loads with a warning that it could not be verified."""
    record = manifest.get(INTEGRITY)
    if record is None:
        warnings.warn(f"{path} was written by prunekit {manifest.get('prunekit_version', '(unknown)')}, which did not "
                      f"record checksums: its masks and files cannot be verified; save it again to add them",
                      stacklevel=3)
        return
    for name, digest in record.get("files", {}).items():
        if not (path / name).is_file():
            raise MaskMismatchError(f"{path / name} is missing; the directory is incomplete: save the model again")
        if file_sha256(path / name) != digest:
            raise MaskMismatchError(f"{path / name} differs from what save_pruned wrote (its sha256 changed): the "
                                    f"file was modified, truncated or replaced")


def verify_layer(manifest: dict, name: str, bits: torch.Tensor, shape) -> None:
    """A loaded mask (bits packed as bits.pack_bits) against its manifest record: same shape, kept count and
    checksum (MaskMismatchError)."""
    record = manifest.get(INTEGRITY, {}).get("layers")
    if record is None:
        return
    if name not in record:
        raise MaskMismatchError(f"the manifest lists a mask for {name}, but its integrity record has none")
    found = mask_record(bits, shape)
    for key in ("shape", "kept", "sha256"):
        if found[key] != record[name][key]:
            raise MaskMismatchError(f"the mask of {name} is not the one saved: its {key} is {found[key]}, saved "
                                    f"{record[name][key]}")


def verify_layer_set(manifest: dict, loaded: set[str]) -> None:
    """Every layer the integrity record lists was loaded: a manifest whose masks map lost a layer would otherwise
    leave that layer's pruned weights free to train."""
    record = manifest.get(INTEGRITY, {}).get("layers")
    missing = sorted(set(record or ()) - loaded)
    if missing:
        raise MaskMismatchError(f"the manifest's masks map lacks {missing[0]}"
                                f"{f' and {len(missing) - 1} more layers' if len(missing) > 1 else ''}, which were "
                                f"saved pruned; the manifest was edited or damaged")




def is_compressed(path) -> bool:
    """Whether a directory written by save_pruned holds compressed weights."""
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("format") == compressed_format.FORMAT


def _load_compressed(path: Path, manifest: dict, model: nn.Module | None, sparse: bool | None,
                     kwargs: dict) -> nn.Module:
    """A compressed directory: every entry checked first, then the model built with its parameters on the meta
    device (nothing dense is allocated), the compressed layers put in, and the rest of the weights assigned."""
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    if kwargs:
        raise PrunekitError(f"load_pruned takes no {', '.join(kwargs)} for a compressed directory (only dtype)")
    tensors = compressed_format.read(path)
    layers = manifest["compressed"]
    verify_layer_set(manifest, set(layers) & set(manifest["masks"]))
    entries = compressed_format.take_layers(tensors, layers)
    for name, (_, bitmask, _, shape) in entries.items():
        verify_layer(manifest, name, pack_bits(unpack_rows(bitmask, shape[1])), shape)
    structured = manifest.get("structured")
    if model is None:
        model = empty_model(path, manifest)
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
