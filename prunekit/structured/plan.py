"""From a budget and an allocator's sparsities to whole units removed per structure, within one unit of the budget.

Pure arithmetic on plain numbers: costs are the targeted weights (or FLOPs) one unit removes, goals are in the same
currency. Everything here runs before the model changes, so every refusal leaves it as it was.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence

from ..budget import Budget
from ..errors import BudgetError
from .units import Structure


def allowed(s: Structure, cap: float) -> list[int]:
    """Unit counts the structure may lose: none, or so many that at least `keep` units and a multiple of `step`
    stay, and at most `cap` of its units go."""
    top = math.floor(cap * s.units + 1e-9)
    return [r for r in range(0, min(top, s.units) + 1) if s.allowed(r)]


def inner_budget(budget: Budget, goal: float, pool: float) -> Budget:
    """The budget as a share of what the structures can remove at all (the allocator's sizes): the targets also hold
    weights no structure cuts (the residual stream), which count in the budget but cannot go."""
    share = goal / pool
    if share >= 1:
        raise BudgetError(f"the budget asks for {goal:,.0f} targeted {budget.metric} but every prunable head and "
                          f"channel together hold {pool:,.0f}; lower the budget")
    return dataclasses.replace(budget, sparsity=share, params=None, flops=None,
                               max_layer_sparsity=max(budget.max_layer_sparsity, share),
                               min_layer_sparsity=min(budget.min_layer_sparsity, share))


def check_reachable(structures: Sequence[Structure], costs: Sequence[float], goal: float, cap: float,
                    metric: str) -> None:
    """Refuses, naming the structures at their limit, a goal that needs more than every structure keeping its last
    unit (or round_to channels) allows."""
    most = sum(allowed(s, cap)[-1] * c for s, c in zip(structures, costs))
    if most + 1e-6 * goal < goal - max(costs) / 2:
        full = [s for s in structures if allowed(s, 1.0)[-1] < s.units]
        example = ", ".join(f"{s.name} ({s.units} {s.unit}s, keeps >= {s.keep})" for s in full[:3])
        raise BudgetError(f"the budget needs {goal:,.0f} targeted {metric} removed, but at most {most:,.0f} can go: "
                          f"a layer would lose every head or channel ({example}); every structure keeps at least one "
                          f"unit" + (f" and at most max_layer_sparsity={cap:g} of each goes" if cap < 1 else "")
                          + "; lower the budget or include more layers")


def round_free(structures: Sequence[Structure], sparsities: Sequence[float], costs: Sequence[float], goal: float,
               cap: float) -> list[int]:
    """Per structure, units removed near sparsity x units, the removed cost as near the goal as whole units allow
    (within one unit of the smallest step): each starts at the allowed count below its ideal, then the structures
    least over their ideal take one more allowed step while that brings the total nearer."""
    choices = [allowed(s, cap) for s in structures]
    ideal = [x * s.units for x, s in zip(sparsities, structures)]
    pick = [max(i for i, r in enumerate(c) if r <= x + 1e-9) for c, x in zip(choices, ideal)]
    left = goal - sum(c[i] * f for c, i, f in zip(choices, pick, costs))
    heap = []

    def push(k: int) -> None:
        if pick[k] + 1 < len(choices[k]):
            nxt = choices[k][pick[k] + 1]
            heapq.heappush(heap, ((nxt - ideal[k]) / max(structures[k].step, 1), k))

    for k in range(len(structures)):
        push(k)
    while heap and left > 0:
        _, k = heapq.heappop(heap)
        step = (choices[k][pick[k] + 1] - choices[k][pick[k]]) * costs[k]
        if step < 2 * left:  # one more step brings the total nearer the goal
            pick[k] += 1
            left -= step
            push(k)
    return [c[i] for c, i in zip(choices, pick)]


def round_uniform(structures: Sequence[Structure], sparsities: Sequence[float], costs: Sequence[float], goal: float,
                  cap: float) -> list[int]:
    """One unit count per kind (heads, channels) for every structure of that kind: the kind's sparsity is the
    cost-weighted mean of the allocator's; coarse kinds (the costliest units) are rounded first and the finer ones
    absorb the difference, so the total is within one unit per structure of the goal."""
    kinds = _kinds(structures)
    weight = {kind: sum(structures[k].units * costs[k] for k in m) for kind, m in kinds.items()}
    share = {kind: sum(sparsities[k] * structures[k].units * costs[k] for k in m) / weight[kind]
             for kind, m in kinds.items()}
    order = sorted(kinds, key=lambda kind: -max(costs[k] * structures[k].step for k in kinds[kind]))
    removed = [0] * len(structures)
    left = goal
    for i, kind in enumerate(order):
        members = kinds[kind]
        first = structures[members[0]]
        later = sum(share[j] * weight[j] for j in order[i + 1:])
        per_unit = sum(costs[k] for k in members)  # one unit from every structure of the kind
        want = (left - later) / per_unit
        count = min(allowed(first, cap), key=lambda r: (abs(r - want), r))
        for k in members:
            removed[k] = count
        left -= count * per_unit
    return removed


def by_kind(allocate_units, structures: Sequence[Structure], unit_scores, costs: Sequence[float], goal: float,
            cap: float) -> list[int] | None:
    """allocate_units with every kind (heads, channels) as one structure: removing a unit of the kind removes one
    from every structure of it, so that the widths stay uniform; None when the allocator does not rank units."""
    members = list(_kinds(structures).values())
    merged = allocate_units([sum(unit_scores[k] for k in m) for m in members],
                            [sum(costs[k] for k in m) for m in members],
                            [allowed(structures[m[0]], cap) for m in members], goal)
    if merged is None:
        return None
    removed = [0] * len(structures)
    for m, count in zip(members, merged):
        for k in m:
            removed[k] = count
    return removed


def _kinds(structures: Sequence[Structure]) -> dict[str, list[int]]:
    """Indices of the structures of each kind, refusing uniform widths where the structures of a kind differ."""
    kinds: dict[str, list[int]] = {}
    for k, s in enumerate(structures):
        kinds.setdefault(s.kind, []).append(k)
    for kind, members in kinds.items():
        if len({(structures[k].units, structures[k].step) for k in members}) != 1:
            raise BudgetError(f"uniform=True needs every {kind} structure to start alike, but their widths differ "
                              f"({sorted({structures[k].units for k in members})}); use uniform=False")
    return kinds
