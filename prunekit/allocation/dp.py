"""Layer-adaptive sparsity by dynamic programming over per-layer distortion curves."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..budget import Budget
from ..calibration.hooks import removing
from ..calibration.inputs import split_first, token_mask
from ..calibration.runner import call_model, evaluating
from ..errors import BudgetError, TargetError
from ..targets import find_blocks
from .base import ALLOCATORS, Allocator, fit_to_budget


def knapsack(costs: np.ndarray, distortion: np.ndarray, target: int) -> list[int]:
    """One level per layer minimising the summed distortion with the summed cost exactly `target`, or, when no
    combination reaches it, the reachable total nearest to it (the lower one on a tie).

    costs: [L, K] non-negative integers; distortion: [L, K], +inf where a level is not allowed. Exact dynamic
    programming over totals: O(L * K * T) time and O(L * T) bytes for the choices, T = the largest total.
    """
    costs = np.asarray(costs, dtype=np.int64)
    distortion = np.asarray(distortion, dtype=np.float64)
    layers, levels = costs.shape
    finite = np.where(np.isfinite(distortion), costs, 0)
    top = int(finite.max(1).sum())
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    choice = np.full((layers, top + 1), -1, dtype=np.int16)
    for layer in range(layers):
        new = np.full(top + 1, np.inf)
        for level in range(levels):
            d, c = distortion[layer, level], int(costs[layer, level])
            if not np.isfinite(d):
                continue
            candidate = best[: top + 1 - c] + d
            better = candidate < new[c:]
            new[c:][better] = candidate[better]
            choice[layer, c:][better] = level
        best = new
    reachable = np.flatnonzero(np.isfinite(best))
    if reachable.size == 0:
        raise BudgetError("no level is allowed for some layer; loosen min_layer_sparsity/max_layer_sparsity")
    total = int(reachable[np.argmin(np.abs(reachable - target) * 2 + (reachable > target))])
    picks = []
    for layer in reversed(range(layers)):
        level = int(choice[layer, total])
        picks.append(level)
        total -= int(costs[layer, level])
    return picks[::-1]


@ALLOCATORS.register("dp")
class DP(Allocator):
    """Xu et al., "Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks"
    (ICCV 2023): the distortion of the output when several layers are pruned is close to the sum of the
    distortions each causes alone, so choosing one sparsity per layer is a knapsack solved exactly by DP.

    Curves: for every target and each of `levels` sparsities (0, 1/levels, ..., (levels-1)/levels), the layer
    alone is pruned to that level by the local estimator that will prune it for real, on the first `samples`
    calibration samples of the dense model. The paper measures the distortion of the network's output (its
    logits); a full-model pass per (layer, level) costs L times more than what the block-by-block runner has at
    hand, the block's output. So each curve is measured at its block's output (mean over tokens of the squared
    L2 error) and converted to the network's output by the block's propagation gain: the squared error of the
    network's output divided by the squared error at the block's output, for the error that pruning all of the
    block's layers to `probe` sparsity puts there (one full forward per block). Unscaled block-output errors are
    not comparable across blocks: the residual stream grows with depth, so the same absolute error matters far
    more early on, and an allocation on them piles sparsity onto the first blocks (SmolLM2-135M, Wanda, 60%:
    perplexity 846 against uniform's 105). Curves cost `levels` block forwards per layer plus one model
    forward per block, on `samples` samples.

    Allocation: costs and the budget are counted on a grid of `grid` units of the total (weights, or FLOPs under
    a flops budget). The DP takes O(L * levels * grid) time and O(L * grid) bytes, whatever the model's size.
    The chosen levels then get the one small common shift that makes the budget exact to the weight.
    """

    needs_data = True
    structured = False  # its curves are distortions of unstructured pruning levels

    def __init__(self, levels: int = 20, samples: int = 2, grid: int = 10_000, probe: float = 0.5):
        if levels < 2 or samples < 1 or grid < 10 or not 0 < probe < 1:
            raise ValueError(f"need levels >= 2, samples >= 1, grid >= 10, 0 < probe < 1; got {levels}, {samples}, "
                             f"{grid}, {probe}")
        self.levels = [k / levels for k in range(levels)]
        self.samples, self.grid, self.probe = samples, grid, probe

    def measure(self, dense) -> list[list[float]]:
        curves, errors = {}, {}
        for step, group, stats in dense.blocks(dense.estimator.needs, "dp curves", first_rows=self.samples):
            if step is None:
                raise TargetError(f"dp measures distortion at block outputs, and {', '.join(t.name for t in group)} "
                                  f"lie outside the model's blocks; exclude them or use another allocator")
            reference, mask = step.outputs[0], step.masks[0]
            originals = {t: t.module.weight.detach().clone() for t in group}

            def pruned_to(t, level):
                pruned, _ = dense.estimator.prune(t.weight.float(), stats[t], round(level * t.numel), None)
                t.module.weight.data.copy_(t.to_native(pruned))

            def restore(*changed):
                for t in changed:
                    t.module.weight.data.copy_(originals[t])

            try:
                for t in group:
                    curve = [0.0]
                    for level in self.levels[1:]:
                        pruned_to(t, level)
                        curve.append(_distortion(step.forward(1)[0], reference, mask))
                        restore(t)
                    curves[t] = curve
                for t in group:
                    pruned_to(t, self.probe)
                errors[step.index] = step.forward(1)[0] - reference
            finally:  # the dense model leaves measuring as it came, even on Ctrl-C
                restore(*group)
        gains = propagation_gains(dense.model, split_first(dense.batches, self.samples)[0], errors)
        return [[d * gains[t.block] for d in curves[t]] for t in dense.targets]

    def allocate(self, sizes: Sequence[int], costs: Sequence[float], budget: Budget,
                 measured: Sequence[Sequence[float]]) -> list[float]:
        weights = np.asarray(sizes, dtype=np.float64) * np.asarray(costs, dtype=np.float64)
        unit = weights.sum() / self.grid
        levels = np.asarray(self.levels)
        cost = np.rint(weights[:, None] * levels[None, :] / unit).astype(np.int64)
        allowed = (levels >= budget.min_layer_sparsity - 1e-12) & (levels <= budget.max_layer_sparsity + 1e-12)
        curves = np.where(allowed[None, :], np.asarray(measured, dtype=np.float64), np.inf)
        picks = knapsack(cost, curves, round(budget.sparsity * self.grid))
        return fit_to_budget(levels[picks].tolist(), sizes, costs, budget)

    def layer_score(self, measured, sparsity: float) -> float:
        """The layer's distortion at its allocated sparsity (interpolated on its curve)."""
        return float(np.interp(sparsity, self.levels, measured))

    def __repr__(self) -> str:
        return f"DP(levels={len(self.levels)}, samples={self.samples}, grid={self.grid}, probe={self.probe:g})"


def propagation_gains(model: nn.Module, batch: dict, errors: dict[int, torch.Tensor]) -> dict[int, float]:
    """Per block index b: squared error of the model's output (logits, or the last hidden state) when
    errors[b] is added to block b's output, over the squared error added, both as means over real tokens."""
    _, blocks = find_blocks(model)
    mask = token_mask(batch)
    with evaluating(model):
        reference = _model_output(call_model(model, batch))
        gains = {}
        for b, error in errors.items():
            with removing([blocks[b].register_forward_hook(lambda m, args, out, e=error: _add_to_hidden(out, e))]):
                output = _model_output(call_model(model, batch))
            added = _distortion(error, torch.zeros_like(error), mask)
            gains[b] = _distortion(output, reference, mask) / added if added > 0 else 1.0
    return gains


def _add_to_hidden(out, error: torch.Tensor):
    if isinstance(out, tuple):
        return (out[0] + error.to(out[0]),) + out[1:]
    return out + error.to(out)


def _model_output(out) -> torch.Tensor:
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0] if isinstance(out, (tuple, list)) else out


def _distortion(output: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean over (non-padding) tokens of the squared L2 norm of the output's error."""
    err = (output.float() - reference.float()).square().sum(-1)
    if mask is not None and mask.shape == err.shape:
        err = err[mask]
    return float(err.mean())
