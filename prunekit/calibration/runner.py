"""Block-by-block sequential calibration, as in SparseGPT (Frantar & Alistarh, 2023).

The model runs once with every block replaced by a recorder, which captures the first block's input and
the other arguments (attention masks, rotary embeddings...) each block receives. After that, blocks run one
at a time on the captured activations: a consumer gathers statistics from a block and prunes it, either after
a statistics pass (`BlockStep.run`, then an output pass) or layer by layer inside one pass
(`BlockStep.run_layerwise`, see lockstep.py), and the runner feeds the pruned block's outputs to the next one.
Only one block's activations are held at a time, and for a model that keeps its blocks elsewhere (residency.py:
prunekit.load_offloaded's, on disk) only one block's weights: each comes in when its step begins and leaves when
it ends.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import CalibrationError
from .hooks import Stop, hooked
from .inputs import token_mask
from .lockstep import lockstep
from .residency import residency_of
from .stats import LayerStats

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


def call_model(model: nn.Module, batch: dict[str, torch.Tensor], labels: bool = False):
    """model(**batch) for Hugging Face models (without a KV cache; without the batch's labels unless `labels`,
    since only a loss needs them), model(x) for plain modules fed {"input": x}."""
    batch = {k: v.to(model_device(model)) for k, v in batch.items() if labels or k != "labels"}
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


def capture(model: nn.Module, blocks: list[nn.Module], batches: list[dict], device: torch.device):
    """Per batch, the first block's hidden-state input and, per block, the (args, kwargs, slot) it is called with
    (the hidden-state argument set to None). Everything moved to `device`."""
    calls: list[list] = [[None] * len(blocks) for _ in batches]
    current = 0

    def recorder(i):
        def forward(*args, **kwargs):
            calls[current][i] = (args, kwargs)
            if i == len(blocks) - 1:
                raise Stop
            slot = _hidden_slot(args, kwargs)
            return args[0] if slot == 0 else kwargs[slot]

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        with residency_of(model).capturing():  # recorders need no weights: blocks kept elsewhere stay there
            for current, batch in enumerate(batches):  # noqa: B007 - the recorders read `current`
                try:
                    call_model(model, batch)
                except Stop:
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

    def run(self, stats: dict[nn.Module, LayerStats] | None = None, keep_outputs: bool = False) -> None:
        """Forward all batches, feeding hooked modules' inputs to their LayerStats (see `hooked`).

        keep_outputs=True promises the block's weights will not change afterwards, so these outputs feed the next
        block without another pass. Without it, each forward stops once every hooked module has its input."""
        outputs = []
        with hooked(stats or {}, lambda: self._masks[self._batch], stop_after_all=not keep_outputs) as new_forward:
            for self._batch, (args, kwargs) in enumerate(self.inputs()):  # noqa: B020 - the hooks read _batch
                new_forward()
                try:
                    out = self.block(*args, **kwargs)
                    outputs.append(out[0] if isinstance(out, tuple) else out)
                except Stop:
                    continue
        if keep_outputs:
            self.outputs = outputs

    def run_layerwise(self, stats: dict[nn.Module, LayerStats], ready: Callable[[nn.Module], None]) -> bool:
        """One pass in which every hooked module is calibrated on the inputs it gets with the modules before it
        already pruned: all batches wait at a module's input until `ready(module)` (the consumer prunes it) has
        run. The outputs are then those of the pruned block. Returns False, with some modules perhaps already
        handed to `ready`, if the batches do not reach the modules in one common order (data-dependent routing);
        the caller then finishes with `run`."""
        outputs = lockstep(self.block, list(self.inputs()), stats, self._masks, ready)
        if outputs is not None:
            self.outputs = outputs
        return outputs is not None

    def forward(self, batches: int | None = None) -> list[torch.Tensor]:
        """The block's outputs on the first `batches` batches (all by default), as its weights are now."""
        outputs = []
        for _, (args, kwargs) in zip(range(len(self._hidden) if batches is None else batches), self.inputs()):
            out = self.block(*args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    @property
    def hidden(self) -> list:
        """The block's hidden-state input, per batch."""
        return self._hidden

    @property
    def masks(self) -> list:
        """Per batch, a [B, L] bool of real (non-padding) tokens, or None."""
        return self._masks

    def inputs(self):
        """(args, kwargs) of the block's call for each batch."""
        for x, (args, kwargs, slot) in zip(self._hidden, self._calls):
            if slot == 0:
                args = (x,) + args[1:]
            elif slot is not None:
                kwargs = {**kwargs, slot: x}
            yield args, kwargs


def sequential(model: nn.Module, blocks: list[nn.Module], batches: list[dict], *, device=None,
               desc: str = "blocks", progress: bool = True) -> Iterator[BlockStep]:
    """Yields a BlockStep per block in order. Whatever the consumer does to a block's weights before asking for
    the next step, the next block sees the outputs of the block as the consumer left it."""
    device = torch.device(device) if device is not None else model_device(model)
    with evaluating(model):
        hidden, calls = capture(model, blocks, batches, device)
        residency = residency_of(model)
        masks = [None if (m := token_mask(b)) is None else m.to(device) for b in batches]
        for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress, unit="block")):
            last = i + 1 == len(blocks)
            with residency.resident(block), on_device(block, device):  # a block kept elsewhere comes in here
                step = BlockStep(i, block, hidden, [per_batch[i] for per_batch in calls], masks)
                yield step
                if step.outputs is None and not last:  # nothing consumes the last block's outputs
                    step.run(keep_outputs=True)
            if not last:
                for out in step.outputs:  # any NaN/Inf entry makes the float32 sum non-finite: one read, no mask
                    if out.is_floating_point() and not torch.isfinite(out.sum(dtype=torch.float32)):
                        raise CalibrationError(f"block {i} produced NaN/Inf activations; the model is unstable in "
                                               f"this dtype on this data (try float32)")
            hidden = step.outputs


def full_pass(model: nn.Module, batches: list[dict], stats: dict[nn.Module, LayerStats]) -> None:
    """Runs the whole model over the batches gathering stats (for layers outside the blocks, such as lm_head)."""
    with evaluating(model):
        current = {"mask": None}
        with hooked(stats, lambda: current["mask"], stop_after_all=True) as new_forward:
            for batch in batches:
                mask = token_mask(batch)
                current["mask"] = None if mask is None else mask.to(model_device(model))
                new_forward()
                try:
                    call_model(model, batch)
                except Stop:
                    pass


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

