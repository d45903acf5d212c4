"""Beta-Rank: a filter's L1 norm scaled by the ratio of the spread of its input to the spread of its output.

Homayounfar, Koohi-Moghadam, Rawassizadeh, Vardhanabhuti, "Beta-Rank: A Robust Convolutional Filter Pruning Method
For Imbalanced Medical Image Analysis", arXiv:2304.07461 (2023). Its ranking equation, for filter k of layer i:

    R^β_{i_k} = Σ|f'_{i_k}| = R^{L1}_{i_k} · |σ_i^p / σ_{i+1}^p|
              = R^{L1}_{i_k} · sqrt( Σ_{j=1..N} (x_i^j − μ_i)² / Σ_{j=1..N} (x_{i+1}^j − μ_{i+1})² ) = R^{L1}_{i_k} · β

R^{L1}_{i_k} = Σ|f_{i_k}| is the filter's L1 norm; x_i^j is the patch of layer i the filter reads at output position
p in calibration sample j (its receptive field across the input channels of its group), x_{i+1}^j the filter's
output there, N the number of samples, μ the means. Here, as in the paper, σ_in^p (the patch) uses one mean over
the samples and all patch entries, σ_out,k^p (filter k's output at p) one mean over the samples, and both are
population standard deviations: how each sum is normalised is a factor common to the whole layer, which the
per-layer min-max normalisation below removes. The paper's σ^p are per position and it leaves implicit how positions
combine; they are summed, as in the reference code:

    R^β_k = R^{L1}_k · Σ_p σ_in^p / σ_out,k^p,      R̂_k = (R^β_k − min_l R^β_l) / (max_l R^β_l − min_l R^β_l)

Linear layers (and GPT-2's Conv1D) have a single position: output channel k is filter k, the patch is the whole
input vector, and every calibration token (padding left out) is one sample.

The reference code (github.com/mohofar/Beta-Rank, rank_generation.py, std_filters) disagrees with the paper; this
module follows the paper:
- it multiplies by std(output) / std(input), the inverse of the paper's β = σ_i / σ_{i+1};
- it cuts the input patch out of an [N, C, H, W] array as if it were [N, H, W, C] (channels sliced as rows) and
  without the padding offset; here the patch is exactly the receptive field of the convolution (padding and its
  mode, stride, dilation, groups);
- it measures one batch (the last seen), here every calibration sample counts;
- it takes the mean of |f| rather than the sum (a constant factor per layer, same ranks).

Degenerate cases, which the paper does not address: where a filter's output does not vary over the samples at p
(σ_out = 0, including an all-zero patch, 0 / 0) the ratio is undefined, and that position adds nothing. A filter
whose output is constant on all calibration data thus ranks lowest (its constant can go into a bias) rather than
infinitely high. Spreads below float32 resolution of the values' magnitude count as zero. A layer whose filters all
have the same R^β ranks them all 0.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hooks import removing
from ..calibration.inputs import token_mask
from ..calibration.runner import call_model, evaluating, model_device
from ..calibration.stats import Needs
from ..errors import CalibrationError, TargetError
from ..targets import Conv1D
from .base import ESTIMATORS, Estimator, group_sum

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEARS = (nn.Linear,) + ((Conv1D,) if Conv1D else ())

# Spread (σ / rms) below which values count as constant: float32 activations do not resolve finer differences, so
# a smaller spread is rounding noise, and a β computed from it would be noise divided by almost nothing.
_RESOLUTION = torch.finfo(torch.float32).eps
_CHUNK = 1 << 22  # values per float64 chunk of activations (32 MiB)


def beta(input_std: torch.Tensor, output_std: torch.Tensor) -> torch.Tensor:
    """β_k = Σ_p σ_in^p / σ_out,k^p per filter k, positions p where σ_out,k^p = 0 left out.

    input_std: [groups, positions], the spread of the patch each group of filters reads (groups = 1 but for
    grouped convolutions, whose filters divide evenly among the groups). output_std: [filters, positions]."""
    filters, groups = output_std.shape[0], input_std.shape[0]
    if filters % groups:
        raise ValueError(f"{filters} filters do not divide among {groups} groups")
    per_filter = input_std.repeat_interleave(filters // groups, dim=0)
    ratio = torch.where(output_std > 0, per_filter / output_std, torch.zeros_like(output_std))
    return ratio.sum(1)


def beta_rank(weight: torch.Tensor, input_std: torch.Tensor, output_std: torch.Tensor) -> torch.Tensor:
    """R̂_k: the filters' R^β_k = ||f_k||_1 β_k, min-max normalised over the layer to [0, 1]. weight: [filters, ...]."""
    l1 = weight.detach().abs().flatten(1).sum(1).to(output_std.dtype)
    return min_max(l1 * beta(input_std, output_std)).to(weight.dtype)


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(v − min) / (max − min); all zeros when the values are all equal."""
    low, high = values.min(), values.max()
    if not high > low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


class Moments:
    """Sums and sums of squares (float64) of values, per cell, and how many values each cell has seen."""

    def __init__(self):
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None

    def add(self, total: torch.Tensor, total_sq: torch.Tensor, count: int) -> None:
        if self.sum is None:
            self.sum, self.sq = total, total_sq
        elif total.shape != self.sum.shape:
            raise CalibrationError(f"Beta-Rank compares outputs position by position, but calibration batches give "
                                   f"{tuple(self.sum.shape[1:])} and {tuple(total.shape[1:])} positions; give inputs "
                                   f"of one size")
        else:
            self.sum += total
            self.sq += total_sq
        self.count += count

    def std(self) -> torch.Tensor:
        """Population standard deviation per cell; 0 where it is below float32 resolution of the values' rms."""
        mean_sq = self.sq / self.count
        var = (mean_sq - (self.sum / self.count).square()).clamp(min=0)
        return torch.where(var > _RESOLUTION ** 2 * mean_sq, var.sqrt(), torch.zeros_like(var))


class BetaStats:
    """One layer's activation moments over the calibration data: its input patches per (group, position) and its
    outputs per (filter, position). Memory: a few numbers per output position, never the activations."""

    def __init__(self, module: nn.Module):
        if isinstance(module, CONVOLUTIONS) and not module.transposed:
            self.groups = module.groups
        elif isinstance(module, LINEARS):
            self.groups = 1
        else:
            raise TargetError(f"Beta-Rank scores Linear, Conv1D and Conv1d/2d/3d layers, not {type(module).__name__}")
        self.inputs, self.outputs = Moments(), Moments()

    def update(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        if isinstance(module, CONVOLUTIONS):
            patches, outputs = _conv_moments(module, x, y)
        else:
            if mask is not None and x.shape[:-1] == mask.shape and y.shape[:-1] == mask.shape:
                x, y = x[mask], y[mask]
            patches, outputs = _linear_moments(x, y)
        self.inputs.add(*patches)
        self.outputs.add(*outputs)

    @property
    def samples(self) -> int:
        """Samples (tokens for a Linear layer) seen."""
        return self.outputs.count

    @property
    def input_std(self) -> torch.Tensor:
        """σ_in^p, [groups, positions]."""
        return self.inputs.std()

    @property
    def output_std(self) -> torch.Tensor:
        """σ_out,k^p, [filters, positions]."""
        return self.outputs.std()


def _summed(values: torch.Tensor, reduce) -> tuple:
    """Σ over the samples (dim 0) of reduce(chunk) = (sums, sums of squares), computed in float64 a chunk of
    samples at a time, so that the float64 copy stays small (_CHUNK values) however large the batch."""
    total = total_sq = 0
    for chunk in values.detach().split(max(1, _CHUNK // max(1, values.shape[1:].numel()))):
        s, sq = reduce(chunk.double())
        total, total_sq = total + s, total_sq + sq
    return total, total_sq


def _linear_moments(x: torch.Tensor, y: torch.Tensor):
    """((Σx, Σx², count) of all input entries, (Σy, Σy², tokens) per output channel), each token a sample."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    patch = _summed(x, lambda c: (c.sum().view(1, 1), c.square().sum().view(1, 1)))
    out = _summed(y, lambda c: (c.sum(0).unsqueeze(1), c.square().sum(0).unsqueeze(1)))
    return (*patch, x.numel()), (*out, y.shape[0])


def _conv_moments(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """((Σx, Σx², count) over each output position's patch per group, (Σy, Σy², samples) per filter and position).

    A patch sum is the convolution of the input, summed over each group's channels, with a kernel of ones: the
    module's own _conv_forward applies its padding (and padding mode), stride, dilation and groups."""
    if x.dim() != module.weight.dim():
        raise CalibrationError(f"Beta-Rank needs batched inputs for {type(module).__name__}, got shape "
                               f"{tuple(x.shape)}")
    n, channels, groups = x.shape[0], x.shape[1], module.groups
    ones = torch.ones(groups, 1, *module.kernel_size, dtype=torch.float64, device=x.device)

    def patch_sums(chunk):
        per_group = chunk.view(chunk.shape[0], groups, channels // groups, *chunk.shape[2:])
        total = module._conv_forward(per_group.sum(2), ones, None)
        total_sq = module._conv_forward(per_group.square().sum(2), ones, None)
        return total.sum(0).flatten(1), total_sq.sum(0).flatten(1)

    patch = _summed(x, patch_sums)
    out = _summed(y, lambda c: (c.sum(0).flatten(1), c.square().sum(0).flatten(1)))
    per_patch = channels // groups * math.prod(module.kernel_size)
    return (*patch, n * per_patch), (*out, n)


def _recorder(stats: BetaStats, current: dict):
    def hook(module, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        stats.update(module, x, y, current["mask"])

    return hook


def gather_moments(model: nn.Module, targets: Sequence, batches: list[dict], progress: bool = True,
                   desc: str = "beta_rank") -> dict:
    """{target module: BetaStats} from one forward of the model over every batch, in eval mode and without
    gradients. Only forward hooks are added, and removed again: the model is left exactly as it was."""
    stats = {t.module: BetaStats(t.module) for t in targets}
    current = {"mask": None}
    hooks = [module.register_forward_hook(_recorder(st, current), with_kwargs=True) for module, st in stats.items()]
    with removing(hooks), evaluating(model):
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            mask = token_mask(batch)
            current["mask"] = None if mask is None else mask.to(model_device(model))
            call_model(model, batch)
    for t in targets:
        if stats[t.module].samples == 0:
            raise CalibrationError(f"{t.name} received no calibration data (never called, or every token padding?)")
    return stats


@ESTIMATORS.register("beta_rank")
class BetaRank(Estimator):
    """Beta-Rank (Homayounfar et al. 2023): R^β_k = ||f_k||_1 Σ_p σ_in^p / σ_out,k^p per filter or output channel,
    min-max normalised per layer; see the module docstring for the equation and its symbols.

    gather: one forward pass of the dense model over the calibration batches, hooks accumulating sums and sums of
    squares of every target's input patches and outputs; the model is left unchanged.
    group_scores (dim=0): R̂_k, summed over each group of `size` consecutive filters (a head). dim=1 (groups of
    input channels) gives zeros: β relates what a filter reads to what it writes, so the paper's score belongs to
    the filter that produces a channel, not to the layers that read it. A structure spanning both, such as a head
    (rows of q, k and v, columns of the output projection) or an MLP channel (a row of the up projection, a column
    of the down projection), thus scores by the layers that produce it.
    scores (per weight, for unstructured and N:M pruning): |f'_kj| = β_k |W_kj|, the summands of the paper's
    Σ|f'_{i_k}|, so that filter k's weights add up to its R^β_k: magnitude, weighed by the filter's β.
    layer_score: the mean R̂ of the layer's filters, how close most of them come to the layer's best (low where a
    few dominate). Ranks are normalised per layer, so it compares the shape of the layers' rankings, not their
    absolute importance.
    """

    needs = Needs.ACTIVATIONS

    def gather(self, model, targets, batches, progress=True) -> dict:
        return gather_moments(model, targets, batches, progress, desc=self.name)

    def scores(self, weight: torch.Tensor, stats: BetaStats) -> torch.Tensor:
        b = beta(stats.input_std, stats.output_std).to(weight.dtype)
        return weight.abs() * b.view(-1, *[1] * (weight.dim() - 1))

    def group_scores(self, weight: torch.Tensor, stats: BetaStats, size: int = 1, dim: int = 0) -> torch.Tensor:
        if dim != 0:  # nothing of its own for the channels it reads (see the class docstring)
            return torch.zeros_like(group_sum(weight.new_zeros(weight.shape[dim]), size, 0))
        return group_sum(beta_rank(weight, stats.input_std, stats.output_std), size, 0)

    def layer_score(self, weight: torch.Tensor, stats: BetaStats) -> float:
        return float(self.group_scores(weight, stats).mean())
