"""Allocators against hand computations, and budgets met to the weight."""
import pytest
import torch

import prunekit
from conftest import calibration_for, tiny
from prunekit.allocation import ALLOCATORS
from prunekit.allocation.owl import OWL
from prunekit.targets import find_targets


def test_registry_lists_the_allocators():
    assert {"uniform", "owl"} <= set(ALLOCATORS.names())


def test_owl_outlier_ratio_by_hand():
    # mean 2.8, threshold 3 * 2.8 = 8.4: one of five scores is above it.
    assert OWL(m=3).outlier_ratio(torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])) == pytest.approx(20.0)
    # strictly greater: with m=1 and equal scores nothing is an outlier
    assert OWL(m=1).outlier_ratio(torch.ones(4)) == 0.0


def test_owl_allocation_by_hand():
    budget = prunekit.Budget(sparsity=0.7)
    # D = 10, 20, 40: r = 0.16 * (D - 10) / 30 = 0, 0.05333.., 0.16; mean(r) = 0.07111..; s = 0.7 - r + mean(r)
    out = OWL(lam=0.08).allocate([1000, 1000, 1000], [1.0] * 3, budget, [10.0, 20.0, 40.0])
    assert out == pytest.approx([0.771111, 0.717778, 0.611111], abs=1e-6)
    # Unequal sizes: the size-weighted mean keeps the budget. r = 0, 0.2; weighted mean 0.15.
    out = OWL(lam=0.1).allocate([100, 300], [1.0, 1.0], prunekit.Budget(sparsity=0.5), [0.0, 1.0])
    assert out == pytest.approx([0.65, 0.45])
    # All layers alike: uniform (the reference code divides by zero here).
    assert OWL().allocate([10, 10], [1.0, 1.0], budget, [3.0, 3.0]) == pytest.approx([0.7, 0.7])
    # A cap binds: the shift is re-solved so the budget still holds.
    out = OWL(lam=0.2).allocate([100, 100], [1.0, 1.0], prunekit.Budget(sparsity=0.7, max_layer_sparsity=0.8),
                               [0.0, 1.0])
    assert out == pytest.approx([0.8, 0.6])


def test_owl_on_a_model_matches_a_hand_computation():
    """Outlier ratios from Wanda scores of the dense model, pooled per block, computed here with plain hooks."""
    model = tiny("llama")
    x = calibration_for("llama")
    targets = find_targets(model)
    sq = {}
    hooks = [t.module.register_forward_pre_hook(
        lambda m, args, name=t.name: sq.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0)))
        for t in targets]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()
    m, lam, s = 2.0, 0.08, 0.6
    ratios = []
    for block in (0, 1):
        scores = torch.cat([(t.weight.abs() * sq[t.name].sqrt()).flatten() for t in targets if t.block == block])
        ratios.append(100.0 * float((scores > m * scores.mean()).sum()) / scores.numel())
    assert ratios[0] != ratios[1]
    r = [2 * lam * (d - min(ratios)) / (max(ratios) - min(ratios)) for d in ratios]
    expect = [s - ri + sum(r) / 2 for ri in r]  # both blocks hold the same number of weights
    report = prunekit.prune(model, s, importance="wanda", allocator=OWL(m=m, lam=lam), calibration=x, progress=False)
    for row, t in zip(report.layers, targets):
        assert row.target == pytest.approx(expect[t.block], abs=1e-9)
        assert row.score == pytest.approx(ratios[t.block])
        assert abs(row.pruned - row.target * row.numel) < 1
    assert report.exact


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert", "vit"])
@pytest.mark.parametrize("allocator", ["uniform", "owl"])
def test_budget_is_exact_to_the_weight(family, allocator):
    model = tiny(family)
    budget = prunekit.Budget(sparsity=0.63, max_layer_sparsity=0.7)
    report = prunekit.prune(model, budget, importance="wanda", allocator=OWL(m=2, lam=0.1) if allocator == "owl"
                            else allocator, calibration=calibration_for(family), progress=False)
    assert report.pruned == round(0.63 * report.total) and report.exact
    masks = prunekit.masks(model)
    for row in report.layers:
        keep = masks[row.name]
        assert int((~keep).sum()) == row.pruned
        assert abs(row.pruned - row.target * row.numel) < 1
        assert row.pruned <= 0.7 * row.numel
    if allocator == "owl":
        assert len({round(row.target, 9) for row in report.layers}) > 1
