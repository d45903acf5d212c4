"""MaskSparsity: an L1 penalty on the scales of only the channels a pruning mask selects, then pruning them.

Jiang, Zhao, Zhao, An, Tang, Wang, "Pruning-aware Sparse Regularization for Network Pruning", Machine Intelligence
Research 20 (2023), arXiv:2201.06776. Network slimming (Liu et al., ICCV 2017) trains with an L1 penalty on the
scale of every channel and prunes the channels whose scales end near zero. MaskSparsity observes that penalising
the channels that will be kept only costs capacity, and penalises only those a pruning mask M selects:

    min_{W, γ}  L(W, γ) + λ Σ_l Σ_k M_lk |γ_lk|

with γ_lk the scale of output channel k of layer l. The selected scales are driven to zero while the rest of the
network, free of the penalty, learns to do without those channels; removing them then costs little. The mask may
come from any criterion (the paper suggests a global sparse regularisation; its code also ships a uniform
per-layer mask).

As implemented here:
- Scales: where a BatchNorm's input is exactly the layer's output (Conv -> BN, Linear -> BatchNorm1d) its γ is the
  scale, as in the paper. Elsewhere (every transformer Linear) a gate per output channel is added: a parameter
  initialised to 1 that a forward hook multiplies into the layer's output. After training each gate is folded
  into its weight row and bias (g_k W_k, g_k b_k): the trained function is kept and no hook remains. LayerNorm
  scales are not used: LayerNorm normalises across channels, so zeroing its scale on one channel does not switch
  off that channel of the layer before it, and pruning the layer's row would still change the normalisation.
- Mask: per layer, the `fraction` of output channels that the `base` estimator scores lowest (its group_scores,
  dim=0), measured on the dense model before any training. The default 0.5 is the uniform per-layer ratio of the
  reference code's ImageNet ResNet-50 mask (paper/imagenet_uniform/prune_ratio_0.5/0.5_uniform.mask); it does not
  depend on the pruning budget.
- Training: `steps` steps of SGD with momentum 0.9 (Nesterov) and the paper's step schedule, lr x 0.1 after 30%,
  60% and 90% of the steps (epochs 30, 60, 90 of 100 in its configs), on loss(model, batch), in train mode, over
  the batches `train` gives (again and again as needed) or the calibration batches. Every model parameter with
  requires_grad trains, as in the paper; set requires_grad=False on those to freeze. After each step the penalty
  takes its proximal step on the selected scales, γ ← sign(γ) max(|γ| − lr_t λ, 0), and leaves the others
  untouched. The reference code (update_bn_by_names_dict) instead adds s sign(γ) mask to the gradients:
  subgradient descent on the same objective, under which momentum makes the scales overshoot and oscillate about
  zero, reaching it only approximately (its 100 epochs of decaying lr damp that, a short phase does not). The
  proximal step sets them to exactly zero, so that pruning them afterwards changes nothing. The reference's weight
  decay (1e-4 on every parameter) belongs to its training recipe rather than to the method, and is left out.
- λ (`l1`): the reference scripts use λ = 5e-4 over 100 epochs at lr 0.1, where the L1 term alone could move a
  scale by far more than its size. For a short phase the default puts it in that regime: λ = 2 / Σ_t lr_t, with
  which the proximal steps alone would move a selected scale by 2 over the phase (gates start at 1; 90% of Σ lr_t
  falls before the first lr drop, so they reach zero early and the rest of the network trains without them). Give
  l1 (and lr, steps) explicitly to use other values, e.g. the paper's with a long phase.
- Importance: |γ| at the end of training. Channels are pruned in increasing |γ| until the budget is met; the
  reference code prunes the scales below a threshold instead, which leaves the budget to chance.

The model after gather keeps what the training changed (the regularised training is the method: pruning follows
it), with the gates folded away and every hook removed. If anything raises during training, every parameter and
buffer is restored from a CPU copy taken at the start (memory: one copy of the model's state), so the model is
exactly as it was.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import masking
from ..calibration.dense import DenseModel
from ..calibration.hooks import removing
from ..calibration.loss import Loss, model_loss
from ..calibration.runner import call_model, evaluating
from ..calibration.stats import Needs
from ..errors import CalibrationError, PrunekitError, TargetError
from ..targets import Conv1D
from .base import ESTIMATORS, Estimator, group_sum

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

_MILESTONES = (0.3, 0.6, 0.9)  # fractions of the phase after which lr drops (epochs 30, 60, 90 of 100 in the paper)
_DECAY = 0.1


@dataclass
class ChannelScales:
    """What MaskSparsity measured for one layer."""

    scale: torch.Tensor  # |γ_k| per output channel after the regularised training, float32
    selected: torch.Tensor  # bool per output channel: the mask, the channels the L1 penalty was applied to
    source: str  # "gate", or the name of the BatchNorm whose scale was used


# ---------------------------------------------------------------------------------------------- channel gates

def _channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[1]  # GPT-2 stores [in, out]
    if isinstance(module, CONVOLUTIONS) and not module.transposed:
        return module.out_channels
    raise TargetError(f"MaskSparsity gates the output channels of Linear, Conv1D and Conv1d/2d/3d layers, not "
                      f"{type(module).__name__}")


def _along(vector: torch.Tensor, dim: int, dims: int) -> torch.Tensor:
    """A per-channel vector viewed to broadcast along dim `dim` of a tensor with `dims` dims."""
    shape = [1] * dims
    shape[dim] = -1
    return vector.view(shape)


class ChannelGates:
    """A multiplicative gate per output channel of each module, initialised to 1 (float32, where its module's
    weight is) and applied to the module's output by a forward hook. The gates are not parameters of the model."""

    def __init__(self, modules: Iterable[nn.Module]):
        sizes = {module: _channels(module) for module in modules}  # refuses an unsupported module before any hook
        self.gates = {module: nn.Parameter(torch.ones(n, device=module.weight.device)) for module, n in sizes.items()}
        self._hooks = contextlib.ExitStack()  # open until remove(), or fold()
        self._hooks.enter_context(removing([m.register_forward_hook(_gating(g)) for m, g in self.gates.items()]))

    def remove(self) -> None:
        """Removes the hooks: the modules compute what they computed without gates."""
        self._hooks.close()

    @torch.no_grad()
    def fold(self) -> None:
        """Removes the hooks and multiplies each gate into its module's weight and bias: the gated function, with
        no gate left."""
        self.remove()
        for module, gate in self.gates.items():
            weight = module.weight
            # a Linear's or convolution's weight has output channels first, GPT-2's Conv1D last
            dim = -1 if Conv1D and isinstance(module, Conv1D) else 0
            weight.mul_(_along(gate.to(weight.dtype), dim, weight.dim()))
            if module.bias is not None:
                module.bias.mul_(gate.to(module.bias.dtype))


def _gating(gate: nn.Parameter):
    def hook(module, args, output):
        # cast, so that a half-precision model stays in its dtype; gradients still reach the float32 gate
        dim = 1 if isinstance(module, CONVOLUTIONS) else -1  # channels of a convolution's output, else last
        return output * _along(gate.to(output.dtype), dim, output.dim())

    return hook


def _batchnorms_after(model: nn.Module, modules: Sequence[nn.Module], batch: dict) -> dict:
    """{module: (name, BatchNorm)} for each module whose output tensor is itself the input of an affine
    BatchNorm with one scale per channel of it, found by one forward pass. Nothing when the model has none."""
    norms = {m: name for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine}
    if not norms:
        return {}
    produced: dict = {}
    found: dict = {}

    def after(module, args, output):
        produced[id(output)] = (output, module)  # the tensor is kept, so its id stays unique during the pass

    def before(norm, args):
        hit = produced.get(id(args[0]))
        if hit is not None and hit[0] is args[0] and norm.num_features == _channels(hit[1]):
            found.setdefault(hit[1], (norms[norm], norm))

    hooks = [m.register_forward_hook(after) for m in modules] + [n.register_forward_pre_hook(before) for n in norms]
    with removing(hooks), evaluating(model):
        call_model(model, batch)
    return found


# ------------------------------------------------------------------------------------------------- the mask

def lowest_channels(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool mask of the round(fraction * n) lowest of n channel scores (ties by position)."""
    n = scores.numel()
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.argsort(scores.detach().float().cpu(), stable=True)[:round(fraction * n)]] = True
    return chosen


def select_channels(base: Estimator, model: nn.Module, targets: Sequence, batches: list[dict], fraction: float,
                    progress: bool = True, group: int = 1) -> dict:
    """{target module: bool mask of its output channels}: per layer, the `fraction` of its groups of `group`
    consecutive channels (1: single channels; a head's width: heads) that `base` scores lowest, with base's
    statistics gathered on the dense model as prunekit.score gathers them."""
    ragged = [t.name for t in targets if _channels(t.module) % group]
    if ragged:
        raise TargetError(f"MaskSparsity's group={group} does not divide the output channels of {', '.join(ragged)}; "
                          f"exclude them or pick a group size that divides them")
    stats = DenseModel(model, targets, batches, base, progress=progress).stats(base)
    return {t.module: lowest_channels(base.group_scores(t.weight.float(), stats[t.module], group, 0),
                                      fraction).repeat_interleave(group) for t in targets}


# ------------------------------------------------------------------------------------------------- training

def _state(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _snapshot(model: nn.Module) -> dict:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in _state(model)}


@torch.no_grad()
def _restore(model: nn.Module, snapshot: dict) -> None:
    for name, tensor in _state(model):
        tensor.copy_(snapshot[name])


def lr_schedule(lr: float, steps: int) -> list[float]:
    """The learning rate of each step: lr, x 0.1 after each of 30%, 60% and 90% of the steps."""
    milestones = [round(f * steps) for f in _MILESTONES]
    return [lr * _DECAY ** sum(step >= m for m in milestones) for step in range(steps)]


@torch.no_grad()
def shrink(scales: dict, selected: dict, amount: float) -> None:
    """The L1 penalty's proximal step, amount = lr λ: γ ← sign(γ) max(|γ| − amount, 0) on the selected channels
    of every layer, the others left as they are."""
    for module, scale in scales.items():
        chosen = selected[module].to(scale.device)
        values = scale[chosen]
        scale[chosen] = values.sign() * (values.abs() - amount).clamp(min=0)


@ESTIMATORS.register("mask_sparsity")
class MaskSparsity(Estimator):
    """MaskSparsity (Jiang et al. 2023): a short training phase with an L1 penalty on the scales of the channels a
    pruning mask selects, then pruning in increasing |scale|. See the module docstring for the algorithm.

    base: estimator (name or instance) whose lowest-scored `fraction` of each layer's output channels form the mask.
    fraction: share of each layer's output channels the mask selects (0.5, the uniform ratio of the paper's code).
        Tie it to what will be pruned, and target only the layers whose channels will go (`include`): the phase
        drives every selected channel to zero, so a mask wider than the pruning removes more than the budget.
    group: the mask's unit, in consecutive output channels: 1 (channels), or a head's width to select whole heads
        (on the value projections, say: a head whose values are zero outputs zero, whatever its attention).
    train: the training batches: a callable returning an iterable of batches (called again whenever one runs out),
        or a re-iterable such as a DataLoader; the calibration batches by default.
    loss: fn(model, batch) -> scalar tensor; the model's own loss by default (labels, or next tokens for an LM).
    steps, lr, momentum: the optimiser's steps (each on one batch), initial learning rate and momentum. The paper
        trains 100 epochs from lr 0.1; steps=100 and lr=1e-3 are this library's choice for a short phase on a
        pretrained model. Momentum 0.9 is the paper's.
    l1: λ; by default 2 / Σ_t lr_t over the schedule (see the module docstring).

    needs Needs.TRAINING: the model keeps its trained parameters after gather (gates folded into the weights).
    scores: |γ_k| for every weight of channel k. group_scores (dim=0): |γ| summed over each group of `size`
    channels; dim=1 (groups of input channels) gives zeros, since a channel's scale belongs to the layer that
    produces it: a structure spanning both (a head: rows of q, k, v and columns of the output projection) scores
    by the producing layers' scales. layer_score: the mean |γ| of the layer.
    prune: whole channels in increasing |γ|, the last one partly, by weight magnitude; N:M groups lie within one
    row, where |γ| is constant, so N:M pruning keeps the largest trained weights of each group.
    """

    needs = Needs.TRAINING

    def __init__(self, base: str | Estimator = "magnitude", fraction: float = 0.5,
                 train: Callable[[], Iterable] | Iterable | None = None, loss: Loss | None = None, steps: int = 100,
                 lr: float = 1e-3, l1: float | None = None, momentum: float = 0.9, group: int = 1):
        self.base = ESTIMATORS.create(base)
        if self.base.needs & Needs.TRAINING:
            raise PrunekitError(f"MaskSparsity's base {self.base.name!r} trains the model itself; use an estimator "
                                f"that only measures it")
        if not 0 < fraction <= 1:
            raise PrunekitError(f"fraction must be in (0, 1], got {fraction}")
        if steps < 1 or not lr > 0 or not 0 <= momentum < 1 or (l1 is not None and l1 < 0):
            raise PrunekitError(f"need steps >= 1, lr > 0, 0 <= momentum < 1 and l1 >= 0; got steps={steps}, lr={lr}, "
                                f"momentum={momentum}, l1={l1}")
        if not (isinstance(group, int) and group >= 1):
            raise PrunekitError(f"group must be a whole number of channels >= 1, got {group!r}")
        self.fraction, self.train, self.loss, self.group = fraction, train, loss or model_loss, group
        self.steps, self.lr, self.momentum = steps, lr, momentum
        self.l1 = l1 if l1 is not None else 2 / sum(lr_schedule(lr, steps))

    def gather(self, model, targets, batches, progress=True) -> dict:
        modules = list(dict.fromkeys(t.module for t in targets))
        selected = select_channels(self.base, model, targets, batches, self.fraction, progress, self.group)
        norms = _batchnorms_after(model, modules, batches[0])
        snapshot = _snapshot(model)
        gates = ChannelGates(m for m in modules if m not in norms)
        scales = {m: norms[m][1].weight if m in norms else gates.gates[m] for m in modules}
        try:
            self._train(model, scales, selected, batches, progress)
        except BaseException:
            gates.remove()
            _restore(model, snapshot)
            raise
        gates.fold()
        return {m: ChannelScales(scales[m].detach().abs().float().clone(), selected[m],
                                 norms[m][0] if m in norms else "gate") for m in modules}

    def _train(self, model: nn.Module, scales: dict, selected: dict, batches: list[dict], progress: bool) -> None:
        params = list({id(p): p for p in [*model.parameters(), *scales.values()] if p.requires_grad}.values())
        frozen = [s for s in scales.values() if not s.requires_grad]  # a scale the user froze must still train
        optimizer = torch.optim.SGD(params + frozen, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        schedule = lr_schedule(self.lr, self.steps)
        was_training = model.training
        for s in frozen:
            s.requires_grad_(True)
        model.train()
        try:
            with torch.enable_grad(), tqdm(total=self.steps, desc=self.name, disable=not progress,
                                           unit="step") as bar:
                for step, (lr, batch) in enumerate(zip(schedule, self._batches(batches))):
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.zero_grad(set_to_none=True)
                    task = self.loss(model, batch)
                    value = task.item()
                    if not math.isfinite(value):
                        raise CalibrationError(f"MaskSparsity: the loss is {value} at step {step}; lower lr")
                    task.backward()
                    optimizer.step()
                    shrink(scales, selected, lr * self.l1)
                    bar.update()
                    bar.set_postfix(loss=f"{value:.4g}")
        finally:
            model.train(was_training)
            for s in frozen:
                s.requires_grad_(False)

    def _batches(self, calibration: list[dict]) -> Iterator:
        """The training batches, endlessly: `train` (called again, or iterated again, whenever it runs out) or
        the calibration batches."""
        while True:
            source = calibration if self.train is None else self.train() if callable(self.train) else self.train
            empty = True
            for batch in source:
                empty = False
                yield batch
            if empty:
                raise CalibrationError("MaskSparsity got no training batches; train must be a callable returning "
                                       "batches, or a re-iterable such as a DataLoader, not a spent generator")

    def scores(self, weight: torch.Tensor, stats: ChannelScales) -> torch.Tensor:
        scale = stats.scale.to(device=weight.device, dtype=weight.dtype)
        return scale.view(-1, *[1] * (weight.dim() - 1)).expand_as(weight).contiguous()

    def group_scores(self, weight: torch.Tensor, stats: ChannelScales, size: int = 1, dim: int = 0) -> torch.Tensor:
        if dim != 0:  # the scales of the channels it reads belong to the layer producing them (class docstring)
            return torch.zeros_like(group_sum(weight.new_zeros(weight.shape[dim]), size, 0))
        return group_sum(stats.scale.to(weight.device), size, 0)

    def layer_score(self, weight: torch.Tensor, stats: ChannelScales) -> float:
        return float(stats.scale.mean())

    def prune(self, weight, stats: ChannelScales, count, nm, block=None):
        if nm is not None:
            keep = masking.select(weight.abs(), count, nm)
        elif block is not None:  # tiles of the channels with the smallest scales go first
            keep = masking.select(self.scores(weight, stats), count, block=block)
        else:
            keep = channels_first(stats.scale.to(weight.device), weight, count)
        return weight * keep, keep

    def __repr__(self) -> str:
        return (f"MaskSparsity(base={self.base!r}, fraction={self.fraction}, steps={self.steps}, lr={self.lr}, "
                f"l1={self.l1:.4g}, momentum={self.momentum}, group={self.group})")


def channels_first(scale: torch.Tensor, weight: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask pruning exactly `count` weights: whole output channels in increasing scale (ties by position),
    then the smallest-magnitude weights of the next channel for what is left."""
    order = torch.argsort(scale, stable=True)
    full, rest = divmod(count, weight[0].numel())
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[order[:full]] = False
    if rest:
        row = order[full]
        keep[row].view(-1)[torch.argsort(weight[row].abs().flatten(), stable=True)[:rest]] = False
    return keep
