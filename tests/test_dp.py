"""The DP allocator: exact optimum against brute force, curves against a recomputation, additivity, budgets."""
import copy
import itertools
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from conftest import calibration_for, tiny
from prunekit.allocation.dp import DP, knapsack
from prunekit.targets import find_targets


def brute_force(costs, distortion, target):
    best = np.inf
    for combo in itertools.product(*(range(len(row)) for row in costs)):
        if sum(costs[l][k] for l, k in enumerate(combo)) == target:
            best = min(best, sum(distortion[l][k] for l, k in enumerate(combo)))
    return best


def test_knapsack_finds_the_optimum_of_random_instances():
    rng = random.Random(0)
    for _ in range(300):
        layers, levels = rng.randint(1, 5), rng.randint(2, 4)
        costs = [[rng.randint(0, 9) for _ in range(levels)] for _ in range(layers)]
        distortion = [[rng.random() for _ in range(levels)] for _ in range(layers)]
        for row in distortion:  # some levels forbidden, as floors and caps do
            if rng.random() < 0.3:
                row[rng.randrange(levels)] = np.inf
        # a target some combination reaches
        combo = [rng.choice([k for k in range(levels) if np.isfinite(distortion[l][k])] or [0])
                 for l in range(layers)]
        if not all(np.isfinite(distortion[l][k]) for l, k in enumerate(combo)):
            continue
        target = sum(costs[l][k] for l, k in enumerate(combo))
        picks = knapsack(np.array(costs), np.array(distortion), target)
        assert sum(costs[l][k] for l, k in enumerate(picks)) == target
        assert sum(distortion[l][k] for l, k in enumerate(picks)) == brute_force(costs, distortion, target)


def test_knapsack_takes_the_nearest_reachable_total():
    costs = np.array([[0, 4], [0, 4]])  # totals 0, 4, 8
    picks = knapsack(costs, np.zeros((2, 2)), 5)
    assert sum(costs[l][k] for l, k in enumerate(picks)) == 4
    picks = knapsack(costs, np.zeros((2, 2)), 6)  # tie between 4 and 8: the lower
    assert sum(costs[l][k] for l, k in enumerate(picks)) == 4


def test_allocation_meets_the_budget_exactly_within_floors_and_caps():
    rng = np.random.default_rng(1)
    dp = DP(levels=10)
    for _ in range(50):
        layers = rng.integers(2, 12)
        sizes = rng.integers(100, 5000, layers).tolist()
        curves = np.cumsum(rng.random((layers, 10)) * rng.random((layers, 1)) * 10, axis=1)
        curves[:, 0] = 0
        budget = prunekit.Budget(sparsity=float(rng.uniform(0.3, 0.7)), min_layer_sparsity=0.1,
                                 max_layer_sparsity=0.85)
        out = dp.allocate(sizes, [1.0] * layers, budget, curves.tolist())
        counts = prunekit.allocation.exact_counts(sizes, out, budget)
        assert sum(counts) == round(budget.sparsity * sum(sizes))
        # caps hold; a floor may round down by under one weight
        assert all(0.1 * n - 1 < s * n <= 0.85 * n + 1e-9 for s, n in zip(out, sizes))


def test_allocation_prunes_the_layer_that_hurts_least():
    flat, steep = [0.0, 0.1, 0.2, 0.3], [0.0, 5.0, 10.0, 15.0]
    out = DP(levels=4).allocate([1000, 1000], [1.0, 1.0], prunekit.Budget(sparsity=0.375), [flat, steep])
    assert out == pytest.approx([0.75, 0.0])


def dense_model(model, x, estimator="wanda"):
    return prunekit.calibration.dense.DenseModel(model, find_targets(model), prunekit.calibration.as_batches(x, model),
                                                  prunekit.importance.ESTIMATORS.create(estimator), progress=False)


def test_curves_match_a_recomputation_with_the_model_itself():
    """Block 0's curve points: prune one layer alone with Wanda (masks from the formula), run the model, compare
    block 0's output with the dense one on the same samples, and scale by block 0's gain: the model's logit
    error over the block-output error when every layer of block 0 is pruned to the probe level."""
    model, x = tiny("llama"), calibration_for("llama", n=8, length=16)
    dense = dense_model(model, x)
    dp = DP(levels=4, samples=2)
    curves = dp.measure(dense)

    def run(m, added=None):
        out = {}

        def hook(mod, a, o):
            out["y"] = o
            return None if added is None else o + added

        handle = m.model.layers[0].register_forward_hook(hook)
        with torch.no_grad():
            logits = m(input_ids=x[:2]).logits
        handle.remove()
        return out["y"], logits

    def sq_error(a, b):
        return float((a - b).pow(2).sum(-1).mean())

    reference, reference_logits = run(model)
    sq = {}
    hooks = [t.module.register_forward_pre_hook(
        lambda m, a, name=t.name: sq.__setitem__(name, a[0].reshape(-1, a[0].shape[-1]).pow(2).sum(0)) and None)
        for t in dense.targets if t.block == 0]
    with torch.no_grad():
        model(input_ids=x)
    for h in hooks:
        h.remove()

    def wanda_prune(t, level):  # returns the weight to restore
        w = t.weight.clone()
        per_row = round(level * t.numel) // w.shape[0]
        score = w.abs() * sq[t.name].sqrt()
        keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, score.argsort(1)[:, :per_row], False)
        with torch.no_grad():
            t.module.weight.mul_(keep)
        return w

    block0 = [t for t in dense.targets if t.block == 0]
    saved = [wanda_prune(t, dp.probe) for t in block0]
    error = run(model)[0] - reference
    for t, w in zip(block0, saved):
        with torch.no_grad():
            t.module.weight.copy_(w)
    gain = sq_error(run(model, added=error)[1], reference_logits) / sq_error(error, 0 * error)

    for t, curve in zip(dense.targets, curves):
        if t.block != 0:
            continue
        assert curve[0] == 0.0
        for level, value in zip(dp.levels[1:], curve[1:]):
            w = wanda_prune(t, level)
            expect = sq_error(run(model)[0], reference) * gain
            with torch.no_grad():
                t.module.weight.copy_(w)
            assert value == pytest.approx(expect, rel=1e-4), (t.name, level)


def test_scaled_curves_predict_the_models_output_error():
    """What the DP adds up is meant to be the error of the model's logits when a layer alone is pruned. Compare
    with that error measured directly (the layer pruned alone by prune() in a copy of the model), for every
    layer of a tiny Llama at 25% and 50%. Measured ratios predicted / direct: 0.69-1.23 (the gain is linearised
    at one error per block); allowed: within a factor 2."""
    model, x = tiny("llama"), calibration_for("llama", n=8, length=16)
    dense = dense_model(model, x)
    dp = DP(levels=4, samples=2)
    curves = dp.measure(dense)
    with torch.no_grad():
        reference = model(input_ids=x[:2]).logits
    ratios = []
    for t, curve in zip(dense.targets, curves):
        for k in (1, 2):  # the same layer pruned alone, by prune() itself, in a copy of the model
            one = copy.deepcopy(model)
            prunekit.prune(one, prunekit.Budget(sparsity=dp.levels[k], include=rf"^{re.escape(t.name)}$"),
                           importance="wanda", calibration=x, progress=False)
            with torch.no_grad():
                direct = float((one(input_ids=x[:2]).logits - reference).pow(2).sum(-1).mean())
            ratios.append(curve[k] / direct)
    assert 0.5 <= min(ratios) and max(ratios) <= 2.0, ratios


def test_distortion_is_nearly_additive_on_a_block():
    """Pruning two layers of a block together distorts its output by close to the sum of what each does alone.

    Measured ratios joint / (sum of single), at 30%, 50%, 70% magnitude sparsity on this tiny Llama block:
    q and up 0.999, 1.000, 0.999; v and down 0.994, 1.002, 0.997 (different paths: near exact); q and k 0.955,
    0.972, 0.932; gate and up 0.974, 0.901, 0.822 (same multiplicative path: the errors interact). Tolerance
    allowed: 20% relative.
    """
    model, x = tiny("llama"), calibration_for("llama", n=8, length=16)
    block = model.model.layers[0]

    def distortion(layers, level):
        saved = [l.weight.detach().clone() for l in layers]
        with torch.no_grad():
            for l in layers:  # magnitude pruning per row
                k = int(level * l.weight.shape[1])
                l.weight.scatter_(1, l.weight.abs().argsort(1)[:, :k], 0.0)
            out = model(input_ids=x, output_hidden_states=True).hidden_states[1]
            for l, w in zip(layers, saved):
                l.weight.copy_(w)
        return float((out - dense).pow(2).sum(-1).mean())

    with torch.no_grad():
        dense = model(input_ids=x, output_hidden_states=True).hidden_states[1]
    attn, mlp = block.self_attn, block.mlp
    for pair in [(attn.q_proj, mlp.up_proj), (attn.v_proj, mlp.down_proj), (attn.q_proj, attn.k_proj),
                 (mlp.gate_proj, mlp.up_proj)]:
        for level in (0.3, 0.5, 0.7):
            alone = distortion([pair[0]], level) + distortion([pair[1]], level)
            together = distortion(list(pair), level)
            assert abs(together - alone) <= 0.2 * alone, (level, together, alone)


class TwoRates(nn.Module):
    """A block whose second layer sees only the first position of each sequence (like a classifier on CLS), so
    its FLOPs per weight are a fraction of the first layer's."""

    def __init__(self):
        super().__init__()
        self.every, self.first = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        y = x + self.every(x)
        return torch.cat([y[:, :1] + self.first(y[:, :1]), y[:, 1:]], 1)


@pytest.mark.parametrize("allocator", ["uniform", "owl", "dp"])
def test_a_flops_budget_weighs_layers_by_their_cost(allocator):
    torch.manual_seed(0)
    model = nn.Sequential(TwoRates(), TwoRates())
    batches = [{"input": torch.randn(4, 8, 16)} for _ in range(2)]
    report = prunekit.prune(model, prunekit.Budget(flops=0.4), importance="wanda", allocator=allocator,
                            calibration=batches, progress=False)
    assert report.metric == "flops"
    assert [row.flops_per_weight for row in report.layers] == [32.0, 4.0, 32.0, 4.0]
    assert report.flops_sparsity == pytest.approx(0.6, abs=sum(r.flops_per_weight for r in report.layers) / (
        sum(r.numel * r.flops_per_weight for r in report.layers)))
    assert report.exact and "FLOPs removed" in report.summary()


def test_measurements_can_be_reused_for_another_budget(tmp_path):
    """One measurement, several budgets: reusing report.measured (through its JSON) gives exactly what a fresh
    measurement gives."""
    x = calibration_for("llama", n=8, length=16)
    first = prunekit.prune(tiny("llama"), 0.5, importance="wanda", allocator="dp", calibration=x, progress=False)
    first.save(tmp_path / "report.json")
    measured = prunekit.PruneReport.load(tmp_path / "report.json").measured
    fresh, reused = tiny("llama"), tiny("llama")
    prunekit.prune(fresh, 0.7, importance="wanda", allocator="dp", calibration=x, progress=False)
    report = prunekit.prune(reused, 0.7, importance="wanda", allocator=DP().reuse(measured), calibration=x,
                            progress=False)
    assert all(torch.equal(a, b) for a, b in zip(prunekit.masks(fresh).values(), prunekit.masks(reused).values()))
    assert report.measured == measured
    with pytest.raises(prunekit.PrunekitError, match="reuses 3 measurements but the model has 14 targets"):
        prunekit.prune(tiny("llama"), 0.7, allocator=DP().reuse(measured[:3]), calibration=x, progress=False)


def test_a_rule_that_measures_nothing_reuses_nothing():
    """Uniform measures nothing (report.measured is None); reusing that is a plain copy, as callers that reuse
    every allocator's measurement in one loop expect."""
    from prunekit.allocation.uniform import Uniform

    report = prunekit.prune(tiny("llama"), 0.5, importance="magnitude", progress=False)
    assert report.measured is None
    again = prunekit.prune(tiny("llama"), 0.5, importance="magnitude", allocator=Uniform().reuse(report.measured),
                           progress=False)
    assert again.measured is None and [r.target for r in again.layers] == [r.target for r in report.layers]
