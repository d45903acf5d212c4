"""Fisher/OBD, NViT structural saliency and Hutchinson traces against references computed here."""
import math

import pytest
import torch
from torch import nn

import prunekit
from conftest import calibration_for, tiny
from prunekit.calibration import as_batches
from prunekit.importance.hessian import Fisher, Hutchinson, StructuralHessian, structure_saliency
from prunekit.targets import find_targets


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 3))])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def cross_entropy(model, batch):
    return nn.functional.cross_entropy(model(batch["input"]), batch["labels"])


def setup(n=10):
    torch.manual_seed(0)
    model = MLP()
    batch = {"input": torch.randn(n, 4), "labels": torch.randint(0, 3, (n,))}
    # two calibration batches, so that accumulation across batches is exercised too
    return model, find_targets(model), as_batches([{k: v[:4] for k, v in batch.items()},
                                                   {k: v[4:] for k, v in batch.items()}], model), batch


def one_by_one(model, batch):
    """Per-sample gradients of every Linear weight, each from its own backward."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    out = []
    for i in range(len(batch["labels"])):
        loss = cross_entropy(model, {k: v[i:i + 1] for k, v in batch.items()})
        out.append(torch.autograd.grad(loss, weights))
    return weights, out


def test_fisher_is_the_mean_of_every_samples_squared_gradient():
    model, targets, batches, batch = setup()
    stats = Fisher(loss=cross_entropy).gather(model, targets, batches, progress=False)
    weights, grads = one_by_one(model, batch)
    for layer, (t, w) in enumerate(zip(targets, weights)):
        per_sample = torch.stack([g[layer] for g in grads])
        fisher = per_sample.square().mean(0)
        assert torch.allclose(stats[t.module].fisher, fisher, rtol=1e-5, atol=1e-9)
        # the known bug keeps only the last sample's gradient; that differs here by a wide margin
        assert not torch.allclose(per_sample[-1].square(), fisher, rtol=0.1)
        # and squaring the batch gradient is not the Fisher either
        assert not torch.allclose(per_sample.mean(0).square(), fisher, rtol=0.1)
        scores = Fisher().scores(t.weight, stats[t.module])
        assert torch.allclose(scores, w.detach().square() * fisher / 2, rtol=1e-5)
        assert Fisher().layer_score(t.weight, stats[t.module]) == pytest.approx(float(scores.sum()), rel=1e-5)


def test_structural_saliency_squares_each_samples_sum_over_the_structure():
    model, targets, batches, batch = setup()
    stats = StructuralHessian(loss=cross_entropy).gather(model, targets, batches, progress=False)
    weights, grads = one_by_one(model, batch)
    first, w = targets[0], weights[0].detach()  # 6 x 4
    terms = torch.stack([g[0] for g in grads]) * w  # [samples, 6, 4]
    estimator = StructuralHessian()
    # output channels in pairs (a "head" of 2 rows), and single input channels
    rows = terms.view(len(grads), 3, 2, 4).sum((2, 3))
    assert torch.allclose(estimator.group_scores(w, stats[first.module], 2, 0), rows.square().mean(0) / 2, rtol=1e-5)
    cols = terms.sum(1)
    assert torch.allclose(estimator.group_scores(w, stats[first.module], 1, 1), cols.square().mean(0) / 2, rtol=1e-5)
    # a structure across layers: hidden unit j = row j of layer 0 and column j of layer 1, summed before squaring
    second = torch.stack([g[1] for g in grads]) * weights[1].detach()  # [samples, 3, 6]
    joint = terms.sum(2) + second.sum(1)
    got = structure_saliency([(stats[targets[0].module], 1, 0), (stats[targets[1].module], 1, 1)])
    assert torch.allclose(got, joint.square().mean(0) / 2, rtol=1e-5)
    # latency-aware: eta * seconds saved comes off each group's saliency
    plain = estimator.group_scores(w, stats[first.module])
    aware = StructuralHessian(latency=lambda weight, size, dim: torch.arange(6.0), eta=0.5)
    assert torch.allclose(aware.group_scores(w, stats[first.module]), plain - 0.5 * torch.arange(6.0))


def test_hutchinson_trace_within_its_statistical_error_of_the_exact_trace():
    model, targets, batches, batch = setup()
    probes = 400
    stats = Hutchinson(probes=probes, loss=cross_entropy).gather(model, targets, batches, progress=False)
    shapes = [t.module.weight.shape for t in targets]
    sizes = [s.numel() for s in shapes]
    flat = torch.cat([t.module.weight.detach().reshape(-1) for t in targets])
    first, second = model.blocks[0][0], model.blocks[1][0]

    def loss_of(vector, i):  # sample i's loss as a function of both target weights
        w1, w2 = (c.view(s) for c, s in zip(vector.split(sizes), shapes))
        h = torch.tanh(nn.functional.linear(batch["input"][i:i + 1], w1, first.bias))
        return nn.functional.cross_entropy(nn.functional.linear(h, w2, second.bias), batch["labels"][i:i + 1])

    per_sample = [torch.autograd.functional.hessian(lambda v: loss_of(v, i), flat) for i in range(len(batch["labels"]))]
    start = 0
    for t, n in zip(targets, sizes):
        exact = float(sum(torch.trace(h[start:start + n, start:start + n]) for h in per_sample)) / len(per_sample)
        var = 0.0  # of one product v . Hv over this layer, per sample, summed
        for h in per_sample:
            block, rows = h[start:start + n, start:start + n], h[start:start + n]
            var += 2 * float(block.square().sum() - torch.diagonal(block).square().sum())
            var += float(rows.square().sum() - block.square().sum())
        start += n
        sigma = math.sqrt(var / probes) / len(per_sample)  # the mean over probes x samples products
        got = stats[t.module].trace
        assert abs(got - exact) < 4 * sigma + 1e-7, (got, exact, sigma)
        assert sigma < 0.5 * abs(exact)  # the test can tell a wrong trace from a right one
        assert Hutchinson().layer_score(t.weight, stats[t.module]) == pytest.approx(got / n)


def test_hutchinson_seed_repeats_and_leaves_the_model_alone():
    model, targets, batches, _ = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    a = Hutchinson(probes=3, seed=5, loss=cross_entropy).gather(model, targets, batches, progress=False)
    b = Hutchinson(probes=3, seed=5, loss=cross_entropy).gather(model, targets, batches, progress=False)
    c = Hutchinson(probes=3, seed=6, loss=cross_entropy).gather(model, targets, batches, progress=False)
    t = targets[0].module
    assert a[t].trace == b[t].trace != c[t].trace
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("name", ["fisher", "structural_hessian", "hutchinson"])
def test_prune_a_causal_lm_with_loss_based_saliency_meets_the_budget(name):
    model = tiny("llama")
    report = prunekit.prune(model, 0.5, importance=name, calibration=calibration_for("llama", n=4),
                            progress=False)
    assert report.sparsity == pytest.approx(0.5, abs=1e-4)
    assert report.exact
    zeros = sum(int((t.module.weight == 0).sum()) for t in find_targets(model))
    assert zeros >= sum(t.numel for t in find_targets(model)) // 2 - 1


def test_gpt2_conv1d_gradients_are_seen_as_out_by_in():
    model = tiny("gpt2")
    targets = find_targets(model)
    stats = Fisher().gather(model, targets, as_batches(calibration_for("gpt2", n=2), model), progress=False)
    for t in targets:
        assert stats[t.module].fisher.shape == t.weight.shape
