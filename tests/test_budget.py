"""Budget parsing, validation, and the exact-rounding arithmetic every allocator relies on."""
import random

import pytest

from prunekit import Budget, BudgetError
from prunekit.allocation import exact_counts, fit_to_budget


def test_coerce_forms():
    assert Budget.coerce(0.5).sparsity == 0.5
    assert Budget.coerce("50%").sparsity == 0.5
    assert Budget.coerce("0.25").sparsity == 0.25
    two_four = Budget.coerce("2:4")
    assert (two_four.nm, two_four.sparsity) == ((2, 4), 0.5)
    assert Budget.coerce("4:8").nm == (4, 8)
    assert Budget(granularity="1:4").sparsity == 0.75


@pytest.mark.parametrize("bad,match", [
    (0.0, "in \\(0, 1\\)"), (1.0, "in \\(0, 1\\)"), (1.5, "in \\(0, 1\\)"), (-0.1, "in \\(0, 1\\)"),
    ("half", "cannot read budget"), ("4:2", "0 < N < M"), ("0:4", "0 < N < M"), (True, "must be a Budget"),
    (None, "must be a Budget"),
])
def test_bad_budgets_say_what_is_wrong(bad, match):
    with pytest.raises(BudgetError, match=match):
        Budget.coerce(bad)


def test_budget_constraints():
    with pytest.raises(BudgetError, match="contradicts"):
        Budget(sparsity=0.6, granularity="2:4")
    with pytest.raises(BudgetError, match="max_layer_sparsity=0.6"):
        Budget(sparsity=0.7, max_layer_sparsity=0.6)
    with pytest.raises(BudgetError, match="min_layer_sparsity"):
        Budget(sparsity=0.2, min_layer_sparsity=0.3)
    with pytest.raises(BudgetError, match="floors and caps do not apply"):
        Budget(granularity="2:4", max_layer_sparsity=0.9)
    with pytest.raises(BudgetError, match="granularity"):
        Budget(sparsity=0.5, granularity="blocks")
    with pytest.raises(BudgetError, match="regular expression"):
        Budget(sparsity=0.5, include="(")


def test_exact_counts_hits_the_budget_to_the_weight():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.randint(1, 5000) for _ in range(rng.randint(1, 12))]
        budget = Budget(sparsity=rng.uniform(0.05, 0.95), min_layer_sparsity=rng.choice([0.0, 0.02]),
                        max_layer_sparsity=rng.choice([1.0, 0.98]))
        raw = [budget.sparsity + rng.uniform(-0.2, 0.2) for _ in sizes]
        sparsities = fit_to_budget(raw, sizes, [1.0] * len(sizes), budget)
        counts = exact_counts(sizes, sparsities, budget)
        assert sum(counts) == round(budget.sparsity * sum(sizes))
        for c, s, n in zip(counts, sparsities, sizes):
            assert abs(c - s * n) < 1 + 1e-6
            assert budget.min_layer_sparsity * n - 1 < c <= budget.max_layer_sparsity * n + 1e-9


def test_fit_to_budget_is_a_clipped_shift():
    # Shift t: (0.2 + t) + (0.5 + t) + min(0.9 + t, 0.6) = 1.5 gives t = 0.1 with the third layer at its cap.
    out = fit_to_budget([0.2, 0.5, 0.9], [100] * 3, [1.0] * 3, Budget(sparsity=0.5, max_layer_sparsity=0.6))
    assert out == pytest.approx([0.3, 0.6, 0.6])
    # Unequal sizes: the size-weighted mean is what must match; no clipping, so it is a plain shift.
    out = fit_to_budget([0.4, 0.6], [300, 100], [1.0, 1.0], Budget(sparsity=0.5))
    assert out == pytest.approx([0.45, 0.65])


def test_budgets_that_cannot_fit_in_whole_weights_name_the_constraint():
    # Two 3-weight layers capped at 50% can lose at most 1 weight each, but 50% of 6 is 3.
    with pytest.raises(BudgetError, match="max_layer_sparsity=0.5 allows: at most 33.3333% of the targeted params"):
        fit_to_budget([0.5, 0.5], [3, 3], [1.0, 1.0], Budget(sparsity=0.5, max_layer_sparsity=0.5))
