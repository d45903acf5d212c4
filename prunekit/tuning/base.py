"""What every fine-tuning method shares: its config, the registry, `prepare` and the optimizer hooks.

A method is set up on a model by `prepare(model, method, **options)` (or `prepare(model, config)` with the
method's config, e.g. `LIFTConfig(rank=16)`: the keywords build the same config), which validates everything
before it changes anything, freezes what does not train and returns the `Method`. A model carries one method: a
prepared model (or its deep copy) is refused, as are peft adapters for the methods that set up their own
parameters (all but IST, which schedules the user's). Training then runs in any loop:

    tuned = prunekit.tuning.prepare(model, "lift", rank=16)
    optimizer = tuned.optimizer(lr=1e-4)          # torch's AdamW over what trains; its step hooks drive the method
    for batch in loader:
        model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()
    prunekit.tuning.save_deltas(tuned, "deltas")  # a folder (prunekit.tuning.deltas)

or through `transformers.Trainer(model, ..., optimizers=(tuned.optimizer(lr=1e-4), None))`: what a method does
between steps (LIFT's mask refresh, IST's layer sampling) hangs on the optimizer's step hooks, so it runs in
both without a callback.

Data parallel: `prepare(model, method, distributed=True)` on every rank of a torch.distributed job; the optimizer
then averages what trains over the ranks before every step, and the method takes its choices from every rank's data
alike (see prunekit.distributed), so all ranks stay identical.

Deltas (what training changed) go to disk and back through prunekit.tuning.deltas.
"""
from __future__ import annotations

from dataclasses import fields

import torch
from torch import nn

from ..errors import PrunekitError
from ..masks import BUFFER
from ..registry import Registry
from .config import Config
from .sparse import adamw, selection, trains_selections


class Method:
    """A fine-tuning method bound to one model, built from its config (`config_class`) or the keywords of one.
    Subclasses implement `attach` (validate against the model, then set up: freeze, select, wrap) and `deltas`,
    and override `before_step` / `after_step` where they act between steps. The config's options read as
    attributes too (tuned.rank is tuned.config.rank)."""

    name: str
    config_class: type[Config] = Config
    takes_adapters = False  # True: the method schedules peft adapters the user already put on the model (IST)
    adapter = "default"  # the peft adapter whose LoRA layers `lora_layers` returns

    def __init__(self, config: Config | None = None, **options):
        if config is None:
            config = self.config_class(**options)
        elif options:
            raise PrunekitError(f"{self.config_class.label()} takes a config or keyword options, not both; got a "
                                f"config and {sorted(options)}")
        elif not isinstance(config, self.config_class):
            raise PrunekitError(f"{self.config_class.label()} takes a {self.config_class.__name__}, got "
                                f"{type(config).__name__}")
        self.config = config
        self.model: nn.Module | None = None
        self.group = None  # a prunekit.distributed.Group when the ranks of a data-parallel run train together
        self.steps = 0
        self._optimizer: torch.optim.Optimizer | None = None  # the one optimizer() built

    def __getattr__(self, name: str):
        config = self.__dict__.get("config")  # not there while copy or pickle rebuild the object
        if config is not None and name in {f.name for f in fields(config)}:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    # -- set-up
    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError

    def trainable(self) -> list[torch.Tensor]:
        """What an optimizer trains: the parameters that require grad after attach, a selected weight's values in
        its place (prunekit.tuning.sparse)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_count(self) -> int:
        """How many numbers training changes (for a sparse method, the selected entries, not whole weights)."""
        return sum(p.numel() for p in self.trainable())

    def optimizer(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        """torch's AdamW over `trainable()` (fused where the device has it; `prunekit.tuning.sparse.adamw`), with
        the method's step hooks on it."""
        params = self.trainable()
        if not params:
            raise PrunekitError(f"{self.name}: nothing to train; was the model prepared with these options?")
        self._optimizer = self.hooked(adamw(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))
        return self._optimizer

    def hooked(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Registers before_step / after_step on an optimizer (use it for an optimizer of your own over
        `trainable()`), and the reads and writes of sparse selections around its steps; once."""
        if getattr(optimizer, "_prunekit_method", None) is self:
            return optimizer
        trains_selections(optimizer)
        optimizer._prunekit_method = self
        if self.group is not None:  # first of the method's pre-hooks: the method sees the averaged gradients
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
        """What training changed at entries, as sparse deltas named after the weights (see module docstring)."""
        return {}

    def lora_layers(self) -> dict[str, nn.Module]:
        """The peft LoRA layers (by module name) whose adapter `self.adapter` training changed; saved in peft's
        format."""
        return {}

    def summary(self) -> dict:
        """What came of the options (saved beside them): the numbers trained, and the method's own facts."""
        return {"trainable": self.trainable_count(), "steps": self.steps}

    def options(self) -> dict:
        """The config's saved options and the summary, in one dict."""
        return {**self.config.to_dict(), **self.summary()}


TUNERS: Registry[Method] = Registry("tuning method", Method)


def prepare(model: nn.Module, method: str | Method | Config = "lift", *, distributed=False, **options) -> Method:
    """Sets `method` (a registered name with options, a method's config, or a Method) up on `model` and returns it.

    Validation comes first: a model the method cannot address, or bad options, raise before the model changes.
    distributed: True (torch.distributed's default group) or a process group, on every rank of a data-parallel run:
    the method's optimizer averages gradients over the ranks and its choices agree across them."""
    from ..distributed import group_of

    group = group_of(distributed)
    if isinstance(method, Config):
        tuner = TUNERS.create(method.method, config=method, **options)
    else:
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
    """Averages over the ranks every gradient the optimizer's next step uses (a sparse selection's is its values'
    reduced gradient, never the dense one of its weight); one all-reduce per dtype and device."""
    grads = [p.grad for param_group in optimizer.param_groups for p in param_group["params"]]
    present = [g is not None for g in grads]
    group.agree("which parameters have gradients this step", present)
    group.mean_([g for g in grads if g is not None])


def pruned(module: nn.Module) -> torch.Tensor | None:
    """The module's prune mask (True = kept), or None if prunekit did not prune it."""
    return module._buffers.get(BUFFER)
