"""Global ranking: the least important units of the whole model go first, wherever they are."""
from __future__ import annotations

import heapq
from typing import Sequence

from ..budget import Budget
from ..errors import BudgetError
from .base import ALLOCATORS, Allocator


@ALLOCATORS.register("global")
class Global(Allocator):
    """One ranking over the model instead of a share per layer: for structured pruning, units (heads, channels)
    are removed in order of importance per unit of cost, so a layer loses more where its units matter less.
    NViT ranks heads and channels of all layers together this way (Yang et al., CVPR 2023), and Torch-Pruning's
    global_pruning does with its importances; it needs scores comparable across layers, which loss-based
    estimators (fisher, structural_hessian, in units of loss) give and magnitudes do not.

    Greedy on marginal importance per cost: every structure's next unit (its least important left) competes;
    the cheapest in importance per removed weight (or FLOP) goes, until the budget is met, each structure within
    its allowed counts (whole steps of round_to, at least one unit kept). Only for granularity="structured".
    """

    structured_only = True

    def allocate(self, sizes: Sequence[int], costs: Sequence[float], budget: Budget, measured=None) -> list[float]:
        raise BudgetError("allocator 'global' ranks heads and channels, so it needs granularity='structured'")

    def allocate_units(self, unit_scores, unit_costs, choices, goal) -> list[int]:
        pick = [0] * len(unit_scores)  # index into each structure's allowed counts
        done = 0.0
        heap = []

        def push(k: int) -> None:
            if pick[k] + 1 < len(choices[k]):
                a, b = choices[k][pick[k]], choices[k][pick[k] + 1]
                step = (b - a) * unit_costs[k]
                heapq.heappush(heap, (float(unit_scores[k][a:b].sum()) / step, k))

        for k in range(len(unit_scores)):
            push(k)
        while heap and done < goal:
            _, k = heapq.heappop(heap)
            step = (choices[k][pick[k] + 1] - choices[k][pick[k]]) * unit_costs[k]
            if done + step > goal and done + step - goal > goal - done:
                continue  # overshooting by more than stopping short: this structure stops here
            pick[k] += 1
            done += step
            push(k)
        return [c[i] for c, i in zip(choices, pick)]
