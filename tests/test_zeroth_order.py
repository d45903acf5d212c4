"""Zeroth-order scores against true gradients on a quadratic loss; seeds; the model left as it was."""
import pytest
import torch
from torch import nn

import prunekit
from conftest import calibration_for, tiny
from prunekit.calibration import as_batches
from prunekit.importance.zeroth_order import ZerothOrder
from prunekit.targets import find_targets


class Chain(nn.Module):
    """Linear blocks without activations: the loss ||f(x) - y||^2 is quadratic in each block's weight."""

    def __init__(self, scales):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6, bias=False)) for _ in scales)
        with torch.no_grad():
            for block, scale in zip(self.blocks, scales):
                block[0].weight.copy_(torch.eye(6) + scale * torch.randn(6, 6))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def setup():
    torch.manual_seed(0)
    model = Chain([0.02, 0.3, 0.1])
    x, y = torch.randn(32, 6), torch.randn(32, 6)

    def loss(m, batch):
        return (m(batch["input"]) - y).square().mean()

    targets = find_targets(model)
    batches = as_batches({"input": x}, model)
    grads = torch.autograd.grad(loss(model, batches[0]), [t.module.weight for t in targets])
    return model, targets, batches, loss, grads


def gather(estimator, model, targets, batches):
    return estimator.gather(model, targets, batches, progress=False)


def test_layer_scores_estimate_the_squared_gradient_norms_without_bias():
    model, targets, batches, loss, grads = setup()
    probes = 1500
    estimator = ZerothOrder(probes=probes, eps=1e-3, samples=32, relative=False, loss=loss)
    stats = gather(estimator, model, targets, batches)
    truth = [float(g.square().sum()) for g in grads]
    got = [estimator.layer_score(t.weight, stats[t.module]) for t in targets]
    assert sorted(range(3), key=got.__getitem__) == sorted(range(3), key=truth.__getitem__)
    # the U-statistic's relative standard error is about sqrt(8 / probes + 2 * 36 / probes^2) = 0.07 here
    for value, norm in zip(got, truth):
        assert value / norm == pytest.approx(1.0, abs=0.25)
    # squaring the mean estimate instead would add the noise: with few probes it overshoots by far
    few = ZerothOrder(probes=4, relative=False, samples=32, loss=loss)
    few_stats = gather(few, model, targets, batches)
    biased = [float(sum(few_stats[t.module].estimates(t.weight)).div(4).square().sum()) for t in targets]
    assert sum(biased) > 2 * sum(truth)


def test_relative_scores_estimate_the_taylor_terms_per_weight_and_per_group():
    model, targets, batches, loss, grads = setup()
    probes = 1500
    taylor = [g * t.weight for g, t in zip(grads, targets)]
    per_weight = ZerothOrder(probes=probes, samples=32, loss=loss)
    stats = gather(per_weight, model, targets, batches)
    for t, c in zip(targets, taylor):
        assert per_weight.layer_score(t.weight, stats[t.module]) / float(c.square().sum()) == pytest.approx(1, abs=0.25)
    # one draw shared by each output row: scores of (sum_j g_rj w_rj)^2 per row
    shared = ZerothOrder(probes=probes, samples=32, share=(1, 0), loss=loss)
    stats = gather(shared, model, targets, batches)
    for t, c in zip(targets, taylor):
        truth = c.sum(1).square()
        got = shared.group_scores(t.weight, stats[t.module], 1, 0)
        assert (got - truth).abs().max() < 0.25 * truth.sum()
        assert torch.allclose(shared.scores(t.weight, stats[t.module]).sum(1), got, rtol=1e-5)
        with pytest.raises(ValueError, match="shared over groups"):
            shared.group_scores(t.weight, stats[t.module], 2, 0)


def test_same_seed_same_scores_and_the_model_is_untouched():
    model, targets, batches, loss, _ = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = []
    for seed in (3, 3, 4):
        estimator = ZerothOrder(probes=3, seed=seed, samples=32, loss=loss)
        stats = gather(estimator, model, targets, batches)
        scores.append(estimator.scores(targets[1].weight, stats[targets[1].module]))
    assert torch.equal(scores[0], scores[1]) and not torch.equal(scores[0], scores[2])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prune_a_causal_lm_forward_only():
    model = tiny("llama")
    report = prunekit.prune(model, 0.5, importance=ZerothOrder(probes=4, samples=2),
                            calibration=calibration_for("llama", n=4), progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-4) and report.exact


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="probes >= 2"):
        ZerothOrder(probes=1)
