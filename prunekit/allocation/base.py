"""The allocator protocol and the arithmetic every allocator shares: fitting to a budget, exact rounding."""
from __future__ import annotations

import copy
import math
from typing import ClassVar, Sequence

import torch

from ..budget import Budget
from ..errors import BudgetError
from ..registry import Registry


class Allocator:
    """Turns a model-wide budget into one sparsity per target, in two steps.

    measure(dense): one measurement per target (a score, a distortion curve), taken on the dense model before
        anything is pruned; None when the rule needs none. See calibration.dense.DenseModel.
    allocate(sizes, costs, budget, measured): a pure rule. sizes are weights per target, costs the FLOPs per
        weight (all 1 unless the budget is in FLOPs); it returns sparsities whose cost-weighted mean is the
        budget, each within the budget's per-layer floor and cap.
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False  # does measure() need calibration data?
    structured_only: ClassVar[bool] = False  # ranks heads and channels only: masks need another allocator
    # Structured pruning allocates over heads and channels from the same per-layer measurements; a rule whose
    # measurement only means something for unstructured masks (DP's distortion curves) says False.
    structured: ClassVar[bool] = True
    linear_inputs: ClassVar[bool] = False  # measures Linear input statistics (cannot read a convolution's)
    offloadable: ClassVar[bool] = True  # measures one block at a time, so it runs on prunekit.load_offloaded models
    measured: list | None = None  # measurements to allocate from instead of measuring (see reuse)

    def measure(self, dense) -> list | None:
        return None

    def reuse(self, measured: Sequence | None) -> "Allocator":
        """A copy that allocates from earlier measurements (`report.measured` of a run on the same model and
        calibration data) instead of measuring again: several budgets for the cost of one measurement. None
        (a rule that measures nothing, such as uniform) gives a plain copy."""
        clone = copy.copy(self)
        clone.measured = None if measured is None else list(measured)
        return clone

    def allocate(self, sizes: Sequence[int], costs: Sequence[float], budget: Budget, measured) -> list[float]:
        raise NotImplementedError

    def allocate_units(self, unit_scores: Sequence[torch.Tensor], unit_costs: Sequence[float],
                       choices: Sequence[Sequence[int]], goal: float) -> list[int] | None:
        """Structured pruning only: units removed per structure, from the estimator's importance of removing each
        next unit (ascending per structure), the cost of one unit, the unit counts each may lose and the cost to
        remove in all. None (the default): allocate per layer with measure() and allocate() instead."""
        return None

    def layer_score(self, measured, sparsity: float) -> float | None:
        """What the report shows in its score column for one target."""
        return measured if isinstance(measured, (int, float)) else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


ALLOCATORS: Registry[Allocator] = Registry("allocator", Allocator)  # each allocator's file registers it


def layer_bounds(sizes: Sequence[int], budget: Budget) -> tuple[list[int], list[int]]:
    """Fewest and most weights each layer may lose: caps are strict, a floor may round down by under one weight."""
    lo = [math.floor(budget.min_layer_sparsity * n + 1e-9) for n in sizes]
    hi = [math.floor(budget.max_layer_sparsity * n + 1e-9) for n in sizes]
    return lo, hi


def fit_to_budget(raw: Sequence[float], sizes: Sequence[int], costs: Sequence[float], budget: Budget) -> list[float]:
    """Shifts raw per-layer sparsities by one constant t, clipping each layer to its floor and cap (in whole
    weights), so that the cost-weighted mean equals the budget. The pruned cost is continuous and non-decreasing in
    t, so t is found by bisection; when nothing clips this is the plain mean shift OWL uses."""
    s = torch.tensor(raw, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    f = torch.tensor(costs, dtype=torch.float64)
    lo, hi = (torch.tensor(b, dtype=torch.float64) for b in layer_bounds(sizes, budget))
    goal = budget.sparsity * float((n * f).sum())
    if float((hi * f).sum()) < goal - 0.5 * float(f.max()):
        raise BudgetError(f"budget {budget.sparsity:g} needs more than max_layer_sparsity={budget.max_layer_sparsity:g} "
                          f"allows: at most {float((hi * f).sum() / (n * f).sum()):.4%} of the targeted "
                          f"{budget.metric} may go")

    def pruned(t: float) -> torch.Tensor:
        return torch.minimum(torch.maximum((s + t) * n, lo), hi)

    a, b = -1.0 - float(s.max()), 2.0 - float(s.min())
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if float((pruned(mid) * f).sum()) < goal else (a, mid)
    return (pruned(b) / n).tolist()


def exact_counts(sizes: Sequence[int], sparsities: Sequence[float], budget: Budget, unit: int = 1) -> list[int]:
    """Weights to prune per layer: summing to round(sum of sparsity * size) exactly (for a params budget that is
    round(budget * total)), each within one weight of sparsity * size and inside the layer's bounds
    (largest-remainder rounding).

    unit: weights per pruning unit (a block granularity's tile area, dividing every size). The rounding then
    happens in whole units: the total is exact to the unit and each layer within one unit of its allocation."""
    if unit > 1:
        return [count * unit for count in exact_counts([n // unit for n in sizes], sparsities, budget)]
    total = round(sum(s * n for s, n in zip(sparsities, sizes)))
    lo, hi = layer_bounds(sizes, budget)
    ideal = [min(max(s * n, a), b) for s, n, a, b in zip(sparsities, sizes, lo, hi)]
    counts = [math.floor(x) for x in ideal]
    short = total - sum(counts)
    # Round up the layers with the largest remainders (or, after float noise, down those with the smallest).
    order = sorted(range(len(sizes)), key=lambda i: ideal[i] - counts[i], reverse=short > 0)
    step = 1 if short > 0 else -1
    for i in order:
        if short == 0:
            break
        if lo[i] <= counts[i] + step <= hi[i] and abs(counts[i] + step - ideal[i]) < 1:
            counts[i] += step
            short -= step
    if short:
        raise BudgetError(f"cannot meet the budget of {total:,} pruned weights within the per-layer floor and cap "
                          f"in whole weights; loosen min_layer_sparsity/max_layer_sparsity")
    return counts
