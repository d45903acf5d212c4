"""Uniform allocation: every layer gets the budget's sparsity."""
from __future__ import annotations

from typing import Sequence

from ..budget import Budget
from .base import ALLOCATORS, Allocator, fit_to_budget


@ALLOCATORS.register("uniform")
class Uniform(Allocator):
    """The same sparsity in every layer, the baseline of SparseGPT and Wanda (adjusted only where a layer's cap,
    in whole weights, cannot hold it)."""

    def allocate(self, sizes: Sequence[int], costs: Sequence[float], budget: Budget, measured=None) -> list[float]:
        return fit_to_budget([budget.sparsity] * len(sizes), sizes, costs, budget)
