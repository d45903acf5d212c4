"""Offloaded models: each block's weights stay on disk until the block-by-block runner reaches it.

`load_offloaded(path)` builds a Hugging Face model from a directory of safetensors weights with the parameters of its
blocks (decoder layers, ViT blocks) on the meta device, which holds no memory, and everything else (embeddings,
final norm, head) loaded. A block's weights are read from the memory-mapped safetensors only while it is resident:

- during the runner's step for it (`Offload.resident`: the model's Residency, calibration/residency.py, which
  `calibration.runner.sequential` enters for every block), and
- during one forward of it (forward hooks), so whole-model passes (perplexity, an allocator's measurement) hold one
  block at a time too.

A block whose weights or masks changed while resident (it was pruned) is written to a scratch directory when it
leaves, and read from there afterwards; `save_pruned` then streams the blocks into the output directory one by one.
Peak memory is about one block's weights plus the activations the runner holds, whatever the model's size. The
checkpoint itself is never written to, so a failure part way through pruning is undone by forgetting the scratch
files (`rollback`).

Memory freed when a block leaves must go back to the operating system, or the process still grows by a block per
block: glibc's malloc raises its mmap threshold after large frees and then keeps later buffers on its heap, which it
rarely returns. So loading an offloaded model fixes that threshold (at 1 MiB, as if it were never raised), and
releasing a block trims the heap (`_return_freed_memory`; nothing happens where the C library is not glibc).
Measured on a 0.93 GB Llama of 16 blocks pruned with Wanda: peak 1.0 GB with glibc's defaults, 0.63 GB with these
(0.49 GB of it torch and transformers themselves).

Forward only: a backward pass needs every block's weights at once, so estimators that take gradients, relevance or
a training phase refuse offloaded models, as do allocators that perturb weights inside whole-model passes.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import compressed, masks
from .bits import pack_bits, unpack_bits, unpack_rows
from .calibration.residency import Residency, install, residency_of
from .checkpoint import INDEX, MANIFEST, MASK_FILE, SAFETENSORS_METADATA, WEIGHTS, empty_model, read_manifest
from .errors import PrunekitError, TargetError
from .targets import find_blocks

ATTR = "_prunekit_offload"


class Checkpoint:
    """Which safetensors file holds each tensor of a checkpoint directory (one file, or shards and their index), and
    in a compressed one (compressed.py) which weights are stored as bitmask entries."""

    def __init__(self, path: Path):
        self.path = path
        if (path / INDEX).is_file():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            self.files = {key: path / name for key, name in weight_map.items() if name != compressed.SENTINEL}
        elif (path / WEIGHTS).is_file():
            with safe_open(str(path / WEIGHTS), "pt") as f:
                self.files = dict.fromkeys(f.keys(), path / WEIGHTS)
        else:
            found = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.iterdir())[:5]
            raise PrunekitError(f"{path} holds no safetensors weights ({WEIGHTS} or {INDEX}; found {found}), which "
                                f"offloading memory-maps; re-save the model with save_pretrained(dir)")
        # modules whose weight is stored compressed
        self.compressed = {key[: -len(".compressed")] for key in self.files if key.endswith(".compressed")}

    def __contains__(self, key: str) -> bool:
        return key in self.files or (key.endswith(".weight") and key[: -len(".weight")] in self.compressed)

    def read(self, keys) -> dict[str, torch.Tensor]:
        """The tensors, memory-mapped (copy-on-write: pages are read when touched, and writes stay in memory); a
        compressed weight decompressed."""
        from .kernels.bitmask import decompress  # the kernels load on first use

        keys = list(keys)
        packed = {key: key[: -len(".weight")] for key in keys if key not in self.files and key in self}
        wanted = [key for key in keys if key not in packed] + [f"{m}.{s}" for m in packed.values()
                                                               for s in compressed.SUFFIXES]
        by_file: dict[Path, list[str]] = {}
        for key in wanted:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for file, names in by_file.items():
            with safe_open(str(file), "pt") as f:
                out.update((key, f.get_tensor(key)) for key in names)
        for key, module in packed.items():
            shape, values, bitmask, row_offsets = (out.pop(f"{module}.{s}") for s in compressed.SUFFIXES)
            out[key] = decompress(values, bitmask, row_offsets, tuple(shape.tolist()))
        return out

    def packed_masks(self, shapes: dict[str, list[int]]) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """The saved masks of these modules as (packed bits, shape): from the masks file of a dense directory, from
        the bitmasks of a compressed one."""
        if not shapes:
            return {}
        if all(name in self.compressed for name in shapes):
            bits = self.read([f"{name}.bitmask" for name in shapes])
            return {name: (pack_bits(unpack_rows(bits[f"{name}.bitmask"], shape[1])), shape)
                    for name, shape in shapes.items()}
        with safe_open(str(self.path / MASK_FILE), "pt") as f:
            return {name: (f.get_tensor(name), shape) for name, shape in shapes.items()}


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, or None (another C library, or none found)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def _keep_large_buffers_mapped() -> None:
    """Buffers of 1 MiB and more get their own mapping, returned to the system when freed (see module docstring)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _return_freed_memory() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _set_param(root: nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Parameter `name` of `root` becomes `tensor`, cast to `dtype` if it is floating point; None keeps the tensor's
    own dtype (accelerate would cast it to the placeholder's)."""
    set_module_tensor_to_device(root, name, tensor.device, value=tensor, dtype=tensor.dtype if dtype is None else dtype,
                                clear_cache=False)


class Offload(Residency):
    """The blocks of one offloaded model: where their weights are, which are resident, what changed. As the model's
    Residency, it reads each block for the runner's step on it."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, prefix: str, blocks: list[nn.Module], dtype,
                 saved_masks: dict[str, list[int]], scratch: Path | None):
        self.checkpoint, self.prefix, self.blocks, self.dtype = checkpoint, prefix, blocks, dtype
        self.names = [f"{prefix}.{i}." for i in range(len(blocks))]
        self.saved_masks = saved_masks  # module name -> shape, of a pruned directory's masks (read per block)
        self.changed: set[int] = set()  # blocks whose current weights live in the scratch directory
        self._count = [0] * len(blocks)
        self._snapshot: dict[int, tuple] = {}
        self._generation = 0  # bumped by rollback: a block resident across it is dropped, not written
        self._lock = threading.RLock()
        self.paused = False
        if scratch is None:
            scratch = Path(tempfile.mkdtemp(prefix="prunekit-offload-"))
            weakref.finalize(self, shutil.rmtree, str(scratch), True)
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        for i, block in enumerate(blocks):
            block.__dict__[ATTR] = (self, i)
            block.register_forward_pre_hook(lambda m, args, i=i: None if self.paused else self.acquire(i))
            block.register_forward_hook(lambda m, args, out, i=i: None if self.paused else self.release(i),
                                        always_call=True)

    # -- files
    def _params_file(self, i: int) -> Path:
        return self.scratch / f"block-{i:05d}.safetensors"

    def _masks_file(self, i: int) -> Path:
        return self.scratch / f"block-{i:05d}.masks.safetensors"

    def block_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's parameters by full name, as they are now (memory-mapped from the scratch file or checkpoint)."""
        names = [self.names[i] + n for n, _ in self.blocks[i].named_parameters()]
        if i in self.changed:
            with safe_open(str(self._params_file(i)), "pt") as f:
                return {name: f.get_tensor(name) for name in names}
        missing = [n for n in names if n not in self.checkpoint]
        if missing:
            raise PrunekitError(f"the checkpoint at {self.checkpoint.path} lacks {missing[0]} (and {len(missing) - 1} "
                                f"more of block {i}); is it a checkpoint of this architecture?")
        return self.checkpoint.read(names)

    def block_masks(self, i: int) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """Block i's masks as (packed bits, shape) by module name."""
        if i in self.changed:
            with safe_open(str(self._masks_file(i)), "pt") as f:
                shapes = json.loads(f.metadata()["shapes"])
                return {name: (f.get_tensor(name), shape) for name, shape in shapes.items()}
        return self.checkpoint.packed_masks({n: s for n, s in self.saved_masks.items() if n.startswith(self.names[i])})

    # -- residency
    def acquire(self, i: int) -> None:
        """Makes block i resident (reads its weights and re-attaches its masks on the first of nested calls)."""

        with self._lock:
            self._count[i] += 1
            if self._count[i] > 1:
                return
            try:
                block, prefix = self.blocks[i], self.names[i]
                for name, tensor in self.block_tensors(i).items():
                    _set_param(block, name[len(prefix):], tensor, self.dtype)
                for name, (packed, shape) in self.block_masks(i).items():
                    masks.attach(block.get_submodule(name[len(prefix):]), unpack_bits(packed, shape))
                bad = [n for n, p in block.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
                if bad:
                    raise TargetError(f"{prefix}{bad[0]} holds NaN or Inf; the model is broken before pruning")
            except BaseException:
                self._count[i] = 1
                self._drop(i)
                raise
            self._snapshot[i] = self._state(i)

    def release(self, i: int) -> None:
        """Ends one residency of block i; the last one writes it to scratch if it changed, then frees it."""
        with self._lock:
            self._count[i] -= 1
            if self._count[i] > 0:
                return
            generation, before = self._snapshot.pop(i, (None, None))
            state = self._state(i)
            if generation == self._generation and state[1] != before:
                self._write(i)
            self._drop(i)

    def _state(self, i: int) -> tuple:
        """(generation, what a change would alter): parameter version counters (in-place updates, masks zeroing
        pruned entries) and the identity of every mask buffer."""
        block = self.blocks[i]
        return self._generation, (tuple(p._version for p in block.parameters()),
                                  tuple(id(m._buffers[masks.BUFFER]) for m in block.modules()
                                        if masks.BUFFER in m._buffers))

    def _write(self, i: int) -> None:

        block, prefix = self.blocks[i], self.names[i]
        found = {prefix + name: m.prune_mask for name, m in block.named_modules() if masks.BUFFER in m._buffers}
        save_file({prefix + n: p.detach().cpu().contiguous() for n, p in block.named_parameters()},
                  str(self._params_file(i)), metadata=SAFETENSORS_METADATA)
        save_file({n: pack_bits(k.cpu()) for n, k in found.items()}, str(self._masks_file(i)),
                  metadata={"shapes": json.dumps({n: list(k.shape) for n, k in found.items()})})
        self.changed.add(i)

    def _drop(self, i: int) -> None:
        self._count[i] = 0
        block = self.blocks[i]
        for module in block.modules():
            if masks.BUFFER in module._buffers:
                masks.detach(module)
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta", clear_cache=False)
        _return_freed_memory()

    def rollback(self) -> None:
        """Forgets every change since loading: blocks read from the checkpoint again, resident ones are dropped
        unwritten when they leave."""
        with self._lock:
            self._generation += 1
            for i in self.changed:
                self._params_file(i).unlink(missing_ok=True)
                self._masks_file(i).unlink(missing_ok=True)
            self.changed.clear()

    def is_resident(self, i: int) -> bool:
        return self._count[i] > 0

    @contextlib.contextmanager
    def capturing(self):
        """The blocks' forward hooks load nothing inside: the runner's recorders replace their forwards."""
        was, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = was

    @contextlib.contextmanager
    def resident(self, block: nn.Module):
        """Block's weights in memory inside; nested entries share one read."""
        i = block.__dict__[ATTR][1]
        self.acquire(i)
        try:
            yield
        finally:
            self.release(i)

    # -- saving
    def packed_masks(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, list[int]]]:
        """Every mask of the model, packed, block by block (and those of resident layers outside the blocks)."""

        found = {}
        for i in range(len(self.blocks)):
            found.update(self.block_masks(i))
        inside = tuple(self.names)
        for name, keep in masks.masks(model).items():
            if not name.startswith(inside):
                found[name] = (pack_bits(keep.cpu()), list(keep.shape))
        return found

    def save_weights(self, model: nn.Module, out: Path, compress: bool = False) -> None:
        """The model as a sharded Hugging Face checkpoint: one shard per block, copied from scratch or streamed from
        the checkpoint, and one for everything else; with its index and config. compress: each masked weight as
        its bitmask entries (compressed.py), block by block."""
        if out.resolve() == self.checkpoint.path.resolve():
            raise PrunekitError(f"cannot save an offloaded model into the directory it is read from ({out}); "
                                f"choose another output directory")
        if any(self.is_resident(i) for i in range(len(self.blocks))):
            raise PrunekitError("a block is still resident (inside a forward or a runner step); save afterwards")
        compressed.write_configs(model, out)
        total = len(self.blocks) + 1
        shard = lambda k: compressed.SHARD.format(k, total)  # noqa: E731
        weight_map, size, layers = {}, 0, []

        def write(tensors: dict, keeps: dict, name: str, copy_from: Path | None = None) -> None:
            nonlocal size
            if compress and keeps:
                tensors, copy_from = compressed.compress_state(tensors, keeps), None
                layers.extend(keeps)
            if copy_from is not None:  # a changed block's scratch file is already its shard
                shutil.copyfile(copy_from, out / name)
            else:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / name), metadata=SAFETENSORS_METADATA)
            weight_map.update(dict.fromkeys(tensors, name))
            size += sum(t.numel() * t.element_size() for t in tensors.values())

        rest, seen = {}, set()
        for name, tensor in model.state_dict().items():
            if name.startswith(tuple(self.names)) or tensor.is_meta or tensor.data_ptr() in seen:
                continue  # blocks go in their own shards; a tied copy (lm_head = embeddings) is re-tied on load
            seen.add(tensor.data_ptr())
            rest[name] = tensor.detach().cpu().contiguous()
        inside = tuple(self.names)
        write(rest, {n: k.cpu() for n, k in masks.masks(model).items() if not n.startswith(inside)}, shard(total))
        from tqdm.auto import tqdm

        for i in tqdm(range(len(self.blocks)), desc="saving blocks", unit="block", leave=False):
            keeps = {n: unpack_bits(packed, shape) for n, (packed, shape) in self.block_masks(i).items()}
            write(self.block_tensors(i), keeps, shard(i + 1), self._params_file(i) if i in self.changed else None)
        if compress:
            compressed.write_index(out, weight_map, size, layers)
        else:
            (out / INDEX).write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                                indent=1))


def store(model: nn.Module) -> Offload | None:
    """The model's Offload, if it was loaded with load_offloaded."""
    found = residency_of(model)
    return found if isinstance(found, Offload) else None


def resident(block: nn.Module):
    """Context: the block's weights are in memory inside (a no-op for a block that is not offloaded)."""
    found = block.__dict__.get(ATTR)
    return found[0].resident(block) if found is not None else contextlib.nullcontext()


def rollback(model: nn.Module) -> None:
    offload = store(model)
    if offload is not None:
        offload.rollback()


def check_prunable(model: nn.Module, allocator) -> None:
    """Refuses, before anything changes, an allocator that cannot measure one block at a time, or pruning a model that
    is pruned already (prune() refuses structured budgets and whole-model estimators for offloaded models itself)."""
    offload = store(model)
    if offload is None:
        return
    if not getattr(allocator, "offloadable", True):
        raise PrunekitError(f"allocator {allocator.name!r} perturbs weights inside whole-model passes, which an "
                            f"offloaded model cannot hold; use uniform, owl or dp, or load the model in memory")
    if offload.saved_masks:
        raise TargetError(f"{offload.checkpoint.path} is already pruned; prune the dense model")


def load_offloaded(path, dtype: torch.dtype | None = None, scratch=None) -> nn.Module:
    """A Hugging Face model whose blocks stay on disk until used (see the module docstring), in eval mode.

    path: a local directory with config.json and safetensors weights (save_pretrained's output, sharded or not),
        or one written by save_pruned (its masks come back with each block).
    dtype: cast floating-point weights to it as they are read; None keeps the stored dtypes.
    scratch: directory for the blocks that change (default: a temporary one, removed with the model). It needs
        room for the changed blocks, up to the model's size.

    Then `prunekit.prune(model, ...)` prunes it block by block and `prunekit.save_pruned(model, out, report)`
    streams the result into a sharded checkpoint that from_pretrained and load_pruned read as usual.
    """
    path = Path(path)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise PrunekitError(f"load_offloaded reads a local model directory with config.json and safetensors weights; "
                            f"{str(path)!r} is not one (download the model first, e.g. with huggingface-cli)")
    manifest = read_manifest(path) if (path / MANIFEST).is_file() else {}  # a pruned directory, or a plain one
    if manifest.get("structured"):
        raise PrunekitError(f"{path} was pruned structurally; load it in memory with prunekit.load_pruned")
    checkpoint = Checkpoint(path)
    _keep_large_buffers_mapped()
    model = empty_model(path, manifest)
    prefix, blocks = find_blocks(model)
    if not prefix:
        raise PrunekitError(f"{type(model).__name__} has no repeated blocks (a ModuleList of same-class layers) to "
                            f"offload one at a time; load it in memory")
    inside = tuple(f"{prefix}.{i}." for i in range(len(blocks)))
    outside = [n for n, _ in model.named_parameters(remove_duplicate=False) if not n.startswith(inside)]
    stored = [n for n in outside if n in checkpoint]
    for name, tensor in checkpoint.read(stored).items():
        _set_param(model, name, tensor.clone(), dtype)  # resident for good: a private copy, not a mapping
    buffers = [n for n, _ in model.named_buffers() if n in checkpoint.files and not n.startswith(inside)]
    for name, tensor in checkpoint.read(buffers).items():
        model.get_buffer(name).copy_(tensor)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(inside)]
    if missing:
        raise PrunekitError(f"the checkpoint at {path} lacks {', '.join(missing[:3])}; is it a checkpoint of "
                            f"{type(model).__name__}?")
    saved = manifest.get("masks", {}) if (path / MASK_FILE).is_file() or checkpoint.compressed else {}
    install(model, Offload(model, checkpoint, prefix, blocks, dtype, saved, scratch))
    return model
