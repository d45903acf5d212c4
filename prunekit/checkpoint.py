"""The checkpoint directory as prunekit writes and reads it, shared by saving and loading (io.py), offloading
(offload.py) and the compressed format (compressed.py): its file names, the manifest, and the empty model a
directory describes.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .errors import PrunekitError

MANIFEST = "prunekit.json"
INTEGRITY = "integrity"  # manifest key: {"layers": name -> mask record, "files": file name -> sha256}
MASK_FILE = "prunekit_masks.safetensors"  # dense directories: every mask, bit-packed (bits.pack_bits)
WEIGHTS = "model.safetensors"  # one file of weights (save_pretrained's, or save_pruned's for a plain nn.Module)
INDEX = "model.safetensors.index.json"  # sharded weights: tensor name -> file
SAFETENSORS_METADATA = {"format": "pt"}  # from_pretrained refuses safetensors files without it


def read_manifest(path: Path) -> dict:
    """The manifest of a directory written by save_pruned, checked for the fields every loader reads."""
    file = path / MANIFEST
    if not file.is_file():
        raise PrunekitError(f"{path} is not a pruned model written by prunekit.save_pruned (missing {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrunekitError(f"{file} is not valid JSON ({e}); the directory is damaged: save the model again") \
            from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("masks"), dict):
        raise PrunekitError(f"{file} has no 'masks' map of layer names to shapes; it was not written by "
                            f"prunekit.save_pruned, or was edited")
    return manifest


def hf_class(path: Path, manifest: dict):
    """(model class, config) of a saved Hugging Face directory, by its config's architectures."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    names = (config.architectures or []) + [manifest.get("model_class")]
    cls = next((getattr(transformers, n) for n in names if n and hasattr(transformers, n)), None)
    if cls is None:
        raise PrunekitError(f"cannot find the model class {names} in transformers; pass `model=` to load into")
    return cls, config


def empty_model(path: Path, manifest: dict) -> nn.Module:
    """The directory's Hugging Face model in eval mode, its parameters on the meta device (nothing allocated, nothing
    initialised) and its buffers real: non-persistent ones (rotary frequencies) are not in the checkpoint."""
    from accelerate import init_empty_weights

    cls, config = hf_class(path, manifest)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config)
    return model.eval()
