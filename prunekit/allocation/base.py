"""The allocator protocol and the arithmetic every allocator shares: fitting to a budget, exact rounding."""
from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch

from ..budget import Budget
from ..calibration.stats import LayerStats, Needs
from ..errors import BudgetError


class Allocator:
    """Turns a model-wide budget into one sparsity per target.

    needs: statistics of a dense calibration pass the allocator scores layers from (Needs.NONE: no pass).
    `block_scores` sees one block's targets (weights and stats) and returns a score per target; `allocate`
    turns sizes and those scores into sparsities whose size-weighted mean is the budget.
    """

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs.NONE

    def block_scores(self, weights: Sequence[torch.Tensor], stats: Sequence[LayerStats]) -> list[float]:
        raise NotImplementedError

    def allocate(self, sizes: Sequence[int], budget: Budget, scores: Sequence[float] | None) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def layer_bounds(sizes: Sequence[int], budget: Budget) -> tuple[list[int], list[int]]:
    """Fewest and most weights each layer may lose: caps are strict, a floor may round down by under one weight."""
    lo = [math.floor(budget.min_layer_sparsity * n + 1e-9) for n in sizes]
    hi = [math.floor(budget.max_layer_sparsity * n + 1e-9) for n in sizes]
    return lo, hi


def fit_to_budget(raw: Sequence[float], sizes: Sequence[int], budget: Budget) -> list[float]:
    """Shifts raw per-layer sparsities by one constant t, clipping each layer to its floor and cap (in whole
    weights), so that the size-weighted mean equals the budget. The pruned total is continuous and
    non-decreasing in t, so t is found by bisection; when nothing clips this is the plain mean shift OWL uses."""
    s = torch.tensor(raw, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    lo, hi = (torch.tensor(b, dtype=torch.float64) for b in layer_bounds(sizes, budget))
    goal = budget.sparsity * float(n.sum())
    if float(hi.sum()) < goal - 0.5:
        raise BudgetError(f"budget {budget.sparsity:g} needs more than max_layer_sparsity={budget.max_layer_sparsity:g} "
                          f"allows: at most {int(hi.sum()):,} of {int(n.sum()):,} weights may go")

    def pruned(t: float) -> torch.Tensor:
        return torch.minimum(torch.maximum((s + t) * n, lo), hi)

    a, b = -1.0 - float(s.max()), 2.0 - float(s.min())
    for _ in range(200):
        mid = (a + b) / 2
        a, b = (mid, b) if float(pruned(mid).sum()) < goal else (a, mid)
    return (pruned(b) / n).tolist()


def exact_counts(sizes: Sequence[int], sparsities: Sequence[float], budget: Budget) -> list[int]:
    """Weights to prune per layer: summing to round(budget * total) exactly, each within one weight of
    sparsity * size and inside the layer's bounds (largest-remainder rounding)."""
    total = round(budget.sparsity * sum(sizes))
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
