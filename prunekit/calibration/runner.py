"""Block-by-block sequential calibration, as in SparseGPT (Frantar & Alistarh, 2023).

The model runs once with every block replaced by a recorder, which captures the first block's input and
the other arguments (attention masks, rotary embeddings...) each block receives. After that, blocks run one
at a time on the captured activations: a consumer gathers statistics from a block, prunes it, and the
runner feeds the pruned block's outputs to the next one. Only one block's activations are held at a time.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError
from .inputs import token_mask

Hook = Callable[[torch.Tensor], None]


class _Stop(Exception):
    """Raised by the last block's recorder: nothing after the blocks needs to run."""


_HIDDEN_NAMES = ("hidden_states", "x", "input", "inputs_embeds")


def _hidden_slot(args: tuple, kwargs: dict):
    if args:
        return 0
    return next((k for k in _HIDDEN_NAMES if k in kwargs), None)


def _move(obj, device, memo: dict):
    """Moves tensors nested in tuples/lists/dicts to device, keeping shared tensors shared."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_move(o, device, memo) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_move(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def call_model(model: nn.Module, batch: dict[str, torch.Tensor]):
    """model(**batch) for Hugging Face models (without a KV cache), model(x) for plain modules fed {"input": x}."""
    batch = {k: v.to(model_device(model)) for k, v in batch.items()}
    if set(batch) == {"input"}:
        return model(batch["input"])
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        batch["use_cache"] = False
    return model(**batch)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """eval() and no_grad for the duration, restoring the training flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def hooked(hooks: dict[nn.Module, Hook], mask_of: Callable[[], torch.Tensor | None]):
    """Calls hooks[module](x) with each hooked module's input x, padding tokens removed."""

    def make(fn):
        def pre_hook(module, args):
            x = args[0]
            mask = mask_of()
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask]
            fn(x.detach())

        return pre_hook

    handles = [module.register_forward_pre_hook(make(fn)) for module, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def capture(model: nn.Module, blocks: list[nn.Module], batches: list[dict], device: torch.device):
    """Per batch, the first block's hidden-state input and, per block, the (args, kwargs, slot) it is called with
    (the hidden-state argument set to None). Everything moved to `device`."""
    calls: list[list] = [[None] * len(blocks) for _ in batches]
    current = 0

    def recorder(i):
        def forward(*args, **kwargs):
            calls[current][i] = (args, kwargs)
            if i == len(blocks) - 1:
                raise _Stop
            slot = _hidden_slot(args, kwargs)
            return args[0] if slot == 0 else kwargs[slot]

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for current, batch in enumerate(batches):
            try:
                call_model(model, batch)
            except _Stop:
                pass
    finally:
        for block in blocks:
            del block.forward
    hidden, per_block, memo = [], [], {}
    for b, row in enumerate(calls):
        missing = [i for i, call in enumerate(row) if call is None]
        if missing:
            raise CalibrationError(f"calibration batch {b} never reached block(s) {missing}; the model's forward "
                                   f"skips them, so they cannot be calibrated")
        first_slot = _hidden_slot(*row[0])
        if first_slot is None and len(blocks) > 1:
            raise CalibrationError("cannot tell which argument of the first block is its hidden state")
        stripped = []
        for args, kwargs in row:
            slot = _hidden_slot(args, kwargs)
            if slot == 0:
                args = (None,) + args[1:]
            elif slot is not None:
                kwargs = {**kwargs, slot: None}
            stripped.append((_move(args, device, memo), _move(kwargs, device, memo), slot))
        first_args, first_kwargs = row[0]
        x = first_args[0] if first_slot == 0 else first_kwargs.get(first_slot)
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise CalibrationError(f"calibration batch {b} gives NaN/Inf activations before the first block")
            x = x.to(device)
        hidden.append(x)
        per_block.append(stripped)
    return hidden, per_block


class BlockStep:
    """One block of the sequential pass. `run` sends every calibration batch through the block."""

    def __init__(self, index: int, block: nn.Module, hidden: list, calls: list, masks: list):
        self.index, self.block = index, block
        self._hidden, self._calls, self._masks = hidden, calls, masks
        self._batch = 0
        self.outputs: list | None = None

    def run(self, hooks: dict[nn.Module, Hook] | None = None, keep_outputs: bool = False) -> None:
        """Forward all batches; hooked modules' inputs go to their hooks. keep_outputs=True promises the block's
        weights will not change afterwards, so these outputs feed the next block without another pass."""
        outputs = []
        with hooked(hooks or {}, lambda: self._masks[self._batch]):
            for self._batch, (x, (args, kwargs, slot)) in enumerate(zip(self._hidden, self._calls)):
                if slot == 0:
                    args = (x,) + args[1:]
                elif slot is not None:
                    kwargs = {**kwargs, slot: x}
                out = self.block(*args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        if keep_outputs:
            self.outputs = outputs


def sequential(model: nn.Module, blocks: list[nn.Module], batches: list[dict], *, device=None,
               desc: str = "blocks", progress: bool = True) -> Iterator[BlockStep]:
    """Yields a BlockStep per block in order. Whatever the consumer does to a block's weights before asking for
    the next step, the next block sees the outputs of the block as the consumer left it."""
    device = torch.device(device) if device is not None else model_device(model)
    with evaluating(model):
        hidden, calls = capture(model, blocks, batches, device)
        masks = [None if (m := token_mask(b)) is None else m.to(device) for b in batches]
        for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress, unit="block")):
            with on_device(block, device):
                step = BlockStep(i, block, hidden, [per_batch[i] for per_batch in calls], masks)
                yield step
                if step.outputs is None:
                    step.run(keep_outputs=True)
            if i + 1 < len(blocks):
                for out in step.outputs:
                    if out.is_floating_point() and not torch.isfinite(out).all():
                        raise CalibrationError(f"block {i} produced NaN/Inf activations; the model is unstable in "
                                               f"this dtype on this data (try float32)")
            hidden = step.outputs


def full_pass(model: nn.Module, batches: list[dict], hooks: dict[nn.Module, Hook]) -> None:
    """Runs the whole model over the batches with hooks (for layers outside the blocks, such as lm_head)."""
    with evaluating(model):
        current = {"mask": None}
        with hooked(hooks, lambda: current["mask"]):
            for batch in batches:
                mask = token_mask(batch)
                current["mask"] = None if mask is None else mask.to(model_device(model))
                call_model(model, batch)


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device):
    """Moves a block to the compute device for the duration, and back to where it was."""
    home = model_device(module)
    if home == device:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(home)
