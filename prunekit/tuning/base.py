"""What every fine-tuning method shares: the registry, `prepare`, the optimizer hooks, and deltas on disk.

A method is set up on a model by `prepare(model, method, **options)`, which validates everything before it
changes anything, freezes what does not train and returns the `Method`. A model carries one method: a prepared
model (or its deep copy) is refused, as are peft adapters for the methods that set up their own parameters (all
but IST, which schedules the user's). Training then runs in any loop:

    tuned = prunekit.tuning.prepare(model, "lift", rank=16)
    optimizer = tuned.optimizer(lr=1e-4)          # the right optimizer; its step hooks drive the method
    for batch in loader:
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    prunekit.tuning.save_deltas(tuned, "deltas.safetensors")

or through `transformers.Trainer(model, ..., optimizers=(tuned.optimizer(lr=1e-4), None))`: what a method does
between steps (LIFT's mask refresh, IST's layer sampling) hangs on the optimizer's step hooks, so it runs in
both without a callback.

Data parallel: `prepare(model, method, distributed=True)` on every rank of a torch.distributed job; the optimizer
then averages what trains over the ranks before every step, and the method takes its choices from every rank's data
alike (see prunekit.distributed), so all ranks stay identical.

Deltas are what training changed, in one of two forms per weight, so that one loader serves every method:
sparse (`<param>.indices`, `<param>.values`: flat indices into the weight and the change there) and low-rank
(`<param>.lora_A`, `<param>.lora_B`, `<param>.scale`: the change is scale · B @ A). `load_deltas(model, path)`
adds them to a fresh copy of the base model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import PrunekitError
from ..masks import BUFFER, rezero
from ..registry import Registry
from .sparse import selection


class Method:
    """A fine-tuning method bound to one model. Subclasses implement `attach` (validate, then set up: freeze,
    select, wrap) and `deltas`, and override `before_step` / `after_step` where they act between steps."""

    name: str
    takes_adapters = False  # True: the method schedules peft adapters the user already put on the model (IST)

    def __init__(self):
        self.model: nn.Module | None = None
        self.group = None  # a prunekit.distributed.Group when the ranks of a data-parallel run train together
        self.steps = 0
        self._optimizer: torch.optim.Optimizer | None = None  # the one optimizer() built

    # -- set-up
    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        """The parameters a dense optimizer should train (requires_grad after attach)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_count(self) -> int:
        """How many numbers training changes (for a sparse method, the selected entries, not whole weights)."""
        return sum(p.numel() for p in self.trainable())

    optimizer_class = torch.optim.AdamW  # SparseAdam for methods that train selected entries

    def optimizer(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        """`optimizer_class` (AdamW, or SparseAdam) over `trainable()`, with the method's step hooks on it."""
        params = self.trainable()
        if not params:
            raise PrunekitError(f"{self.name}: nothing to train; was the model prepared with these options?")
        self._optimizer = self.hooked(self.optimizer_class(params, lr=lr, weight_decay=weight_decay, betas=betas,
                                                           eps=eps))
        return self._optimizer

    def hooked(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Registers before_step / after_step on an optimizer (use it for an optimizer of your own); once."""
        if getattr(optimizer, "_prunekit_method", None) is self:
            return optimizer
        optimizer._prunekit_method = self
        if self.group is not None:  # first of the pre-hooks: the method sees the averaged gradients
            optimizer.register_step_pre_hook(lambda opt, *_: average_gradients(opt, self.group))
        optimizer.register_step_pre_hook(lambda *_: self.before_step())
        optimizer.register_step_post_hook(lambda *_: self._after())
        return optimizer

    def _after(self) -> None:
        self.steps += 1
        self.after_step()

    # -- between steps
    def before_step(self) -> None:
        """Runs before every optimizer step, after backward."""

    def after_step(self) -> None:
        """Runs after every optimizer step (self.steps counts them)."""

    # -- results
    def deltas(self) -> dict[str, torch.Tensor]:
        """What training changed, as sparse or low-rank tensors named after the weights (see module docstring)."""
        raise NotImplementedError

    def options(self) -> dict:
        """The options the method was created with (saved beside the deltas)."""
        return {}


TUNERS: Registry[Method] = Registry("tuning method", Method)


def prepare(model: nn.Module, method: str | Method = "lift", *, distributed=False, **options) -> Method:
    """Sets `method` (a registered name with options, or an instance) up on `model` and returns it.

    Validation comes first: a model the method cannot address, or bad options, raise before the model changes.
    distributed: True (torch.distributed's default group) or a process group, on every rank of a data-parallel run:
    the method's optimizer averages gradients over the ranks and its choices agree across them."""
    from ..distributed import group_of

    group = group_of(distributed)
    tuner = TUNERS.create(method, **options)
    _refuse_tuned(model, tuner)
    tuner.model = model
    tuner.group = group
    tuner.attach(model)
    model.__dict__[_PREPARED] = tuner.name
    return tuner


_PREPARED = "_prunekit_tuning"  # on a prepared model (and its deep copies): the name of the method it carries


def _refuse_tuned(model: nn.Module, tuner: Method) -> None:
    """One method per model: a second one would train beside the first's selections, hooks or adapters (and some
    would be half set up before noticing), so a prepared model, or one with adapters or selections the method does
    not take, is refused before anything changes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    name, fresh = type(model).__name__, "prepare it on a fresh copy of the base model (load_deltas puts trained " \
                                        "deltas onto one)"
    if _PREPARED in model.__dict__:
        raise PrunekitError(f"{name} is already prepared for {model.__dict__[_PREPARED]} fine-tuning; to use "
                            f"{tuner.name}, {fresh}")
    if any(selection(p) is not None for p in model.parameters()):
        raise PrunekitError(f"{name} has weights that train at selected entries (prunekit.tuning.sparse.select); to "
                            f"use {tuner.name}, {fresh}")
    adapters = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if adapters and not tuner.takes_adapters:
        raise PrunekitError(f"{name} has peft adapter layers ({adapters[0]} and {len(adapters) - 1} more); "
                            f"{tuner.name} sets up its own trainable parameters on the base weights: pass the model "
                            f"without adapters (PeftModel.merge_and_unload() folds trained ones into the weights)")


def average_gradients(optimizer: torch.optim.Optimizer, group) -> None:
    """Averages over the ranks every gradient the optimizer's next step uses: a sparse selection's reduced gradient
    (never the dense one of its weight), a plain parameter's .grad; one all-reduce per dtype and device."""
    grads = []
    for param_group in optimizer.param_groups:
        for p in param_group["params"]:
            sel = selection(p)
            grads.append(sel.grad if sel is not None else p.grad)
    present = [g is not None for g in grads]
    group.agree("which parameters have gradients this step", present)
    group.mean_([g for g in grads if g is not None])


def save_deltas(method: Method, path: str | Path) -> Path:
    """Writes the method's deltas to a safetensors file (with the method's name and options as metadata)."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in method.deltas().items()}
    save_file(tensors, str(path), metadata={"method": method.name, "options": json.dumps(method.options(),
                                                                                         default=str)})
    return path


def load_deltas(model: nn.Module, path: str | Path) -> dict:
    """Adds the deltas saved at `path` to the model's weights (a fresh copy of the base the method was trained
    on, or a pruned copy of it: entries its prune masks remove stay zero); returns the saved metadata. Every delta
    is checked against its weight before any weight changes."""
    tensors = load_file(str(path))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    changes = {}
    for key in tensors:
        name, _, kind = key.rpartition(".")
        if kind not in ("indices", "lora_A"):
            continue
        if name not in params:
            raise PrunekitError(f"deltas at {path} change {name!r}, which this model does not have; load them onto "
                                f"the base model they were trained on")
        changes[name] = _delta(params[name], name, tensors, path)
    with torch.no_grad():
        for name, change in changes.items():
            change(params[name])
            rezero(modules[name.rpartition(".")[0]])  # deltas trained on a dense model must not fill pruned entries
    with open(path, "rb") as f:  # the safetensors header holds the metadata
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return header.get("__metadata__", {})


def _delta(weight: torch.Tensor, name: str, tensors: dict, path) -> callable:
    """A function adding the saved delta of `name` to its weight, after checking that it fits."""
    if f"{name}.indices" in tensors:
        indices, values = tensors[f"{name}.indices"].long(), tensors[f"{name}.values"]
        if indices.numel() and (indices.min() < 0 or indices.max() >= weight.numel()):
            raise PrunekitError(f"deltas at {path} index {name!r} up to {int(indices.max())}, but its weight here has "
                                f"{weight.numel()} entries (shape {tuple(weight.shape)}); a different base model?")
        return lambda w: w.view(-1).index_add_(0, indices.to(w.device), values.to(w.device, w.dtype))
    a, b = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
    scale = float(tensors[f"{name}.scale"])
    if (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise PrunekitError(f"deltas at {path} change {name!r} by a {b.shape[0]}x{a.shape[1]} matrix, but its weight "
                            f"here is {tuple(weight.shape)}; a different base model?")
    return lambda w: w.add_((scale * (b.float() @ a.float())).to(w.device, w.dtype))


def lowrank_delta(name: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
    """The saved form of a change scale · B @ A to weight `name` ([out, in] = [out, r] @ [r, in])."""
    return {f"{name}.lora_A": a.detach(), f"{name}.lora_B": b.detach(), f"{name}.scale": torch.tensor(float(scale))}


def sparse_delta(name: str, indices: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    """The saved form of a change `values` at flat `indices` of weight `name`."""
    return {f"{name}.indices": indices.detach(), f"{name}.values": values.detach()}


def pruned(module: nn.Module) -> torch.Tensor | None:
    """The module's prune mask (True = kept), or None if prunekit did not prune it."""
    return module._buffers.get(BUFFER)
