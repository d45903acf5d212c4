"""Beta-Rank against the paper's equation computed here in numpy straight from the calibration batch (patches cut
out by hand, outputs recomputed), on convolutions and Linear layers, and through prunekit.prune."""
import numpy as np
import pytest
import torch
from torch import nn

import prunekit
from conftest import calibration_for, tiny
from prunekit.importance import beta_rank as beta_rank_module
from prunekit.importance.beta_rank import BetaRank, gather_moments
from prunekit.targets import Target, find_targets


def reference_conv_ranks(x, weight, bias, stride, padding, dilation, groups):
    """R̂_k = min-max of ||f_k||_1 Σ_p std(patches at p) / std(outputs of k at p), float64, from the raw batch."""
    x, weight, bias = (t.detach().double().numpy() for t in (x, weight, bias))
    n, channels, height, width = x.shape
    filters, per_group, k, _ = weight.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    span = dilation * (k - 1) + 1
    rows = (height + 2 * padding - span) // stride + 1
    cols = (width + 2 * padding - span) // stride + 1
    ratio = np.zeros(filters)
    for i in range(rows):
        for j in range(cols):
            window = xp[:, :, i * stride:i * stride + span:dilation, j * stride:j * stride + span:dilation]
            for f in range(filters):
                g = f // (filters // groups)
                patch = window[:, g * per_group:(g + 1) * per_group]  # [n, per_group, k, k]: what filter f reads
                out = np.einsum("nckl,ckl->n", patch, weight[f]) + bias[f]
                ratio[f] += patch.std() / out.std()
    raw = np.abs(weight).reshape(filters, -1).sum(1) * ratio
    return (raw - raw.min()) / (raw.max() - raw.min())


@pytest.mark.parametrize("stride, padding, dilation, groups", [(2, 1, 1, 1), (1, 2, 2, 2)])
def test_conv_filters_match_the_papers_equation(stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    model = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(6, 2, 1))
    g = torch.Generator().manual_seed(1)
    # channels of unequal scale and nonzero mean, in two batches that must add up to one sample set
    scale = torch.tensor([0.5, 1.0, 2.0, 3.0]).view(1, 4, 1, 1)
    batches = [{"input": torch.randn(5, 4, 9, 9, generator=g) * scale + 0.7} for _ in range(2)]
    stats = gather_moments(model, [Target("conv", conv, None)], batches, progress=False)

    ranks = BetaRank().group_scores(conv.weight.detach(), stats[conv])
    expect = reference_conv_ranks(torch.cat([b["input"] for b in batches]), conv.weight, conv.bias,
                                  stride, padding, dilation, groups)
    np.testing.assert_allclose(ranks.numpy(), expect, rtol=1e-5, atol=1e-6)
    assert ranks.min() == 0 and ranks.max() == 1


def test_linear_channels_match_the_papers_equation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))
    g = torch.Generator().manual_seed(2)
    batches = [{"input": torch.randn(3, 7, 8, generator=g) * torch.linspace(0.2, 2, 8) + 0.3} for _ in range(2)]
    targets = find_targets(model)
    stats = gather_moments(model, targets, batches, progress=False)

    w1, b1, w2, b2 = (p.detach().double().numpy() for p in model.parameters())
    x = torch.cat([b["input"] for b in batches]).double().numpy().reshape(-1, 8)  # every token a sample
    h = np.tanh(x @ w1.T + b1)
    for target, inputs, weight, bias in zip(targets, (x, h), (w1, w2), (b1, b2)):
        out = inputs @ weight.T + bias
        raw = np.abs(weight).sum(1) * inputs.std() / out.std(0)
        expect = (raw - raw.min()) / (raw.max() - raw.min())
        ranks = BetaRank().group_scores(target.weight.float(), stats[target.module])
        np.testing.assert_allclose(ranks.numpy(), expect, rtol=1e-5, atol=1e-6)
        assert ranks.min() == 0 and ranks.max() == 1


def test_per_weight_scores_are_the_summands_of_the_filter_score():
    """|f'_kj| = β_k |W_kj|: each filter's weights add up to its R^β, so groups of scores rank like the filters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    batches = [{"input": torch.randn(20, 8)}]
    t = find_targets(model)[0]
    stats = gather_moments(model, [t], batches, progress=False)
    est = BetaRank()
    per_weight = est.scores(t.weight.float(), stats[t.module])
    raw = per_weight.sum(1)
    assert torch.allclose((raw - raw.min()) / (raw.max() - raw.min()), est.group_scores(t.weight, stats[t.module]),
                          atol=1e-6)
    assert est.group_scores(t.weight, stats[t.module], size=5).shape == (1,)
    # input channels get nothing of their own: a structure spanning rows and columns scores by its rows
    assert torch.equal(est.group_scores(t.weight, stats[t.module], size=2, dim=1), torch.zeros(4))
    with pytest.raises(ValueError, match="tile"):
        est.group_scores(t.weight, stats[t.module], size=3, dim=1)


def test_float64_chunks_add_up_to_the_whole_batch(monkeypatch):
    """Activations are summed in float64 a few samples at a time; the chunking must not change the moments."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(2), nn.Linear(36, 5))
    targets = [Target("conv", model[0], None), Target("linear", model[2], None)]
    batches = [{"input": torch.randn(6, 3, 6, 6)}]
    whole = gather_moments(model, targets, batches, progress=False)
    monkeypatch.setattr(beta_rank_module, "_CHUNK", 50)  # a sample or two per chunk
    chunked = gather_moments(model, targets, batches, progress=False)
    for t in targets:
        for moments in ("inputs", "outputs"):
            a, b = getattr(whole[t.module], moments), getattr(chunked[t.module], moments)
            assert a.count == b.count
            assert torch.allclose(a.sum, b.sum, rtol=1e-12, atol=1e-12)
            assert torch.allclose(a.sq, b.sq, rtol=1e-12, atol=1e-12)


def test_a_filter_with_constant_output_ranks_lowest():
    """σ_out = 0 leaves β undefined; such a filter carries nothing and must rank 0, not infinitely high."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    with torch.no_grad():
        layer.weight[2] = 0  # output 2 is its bias, whatever the input
    stats = gather_moments(layer, [Target("layer", layer, None)], [{"input": torch.randn(30, 6)}], progress=False)
    ranks = BetaRank().group_scores(layer.weight.detach(), stats[layer])
    assert torch.isfinite(ranks).all() and ranks[2] == 0 and (ranks[[0, 1, 3]] > 0).all()


def test_padding_tokens_are_left_out():
    """Right padding, masked out, gives the statistics of the unpadded windows (causal model: real tokens never
    see the padding)."""
    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(4))], 1)
    mask = torch.cat([torch.ones(4, 12), torch.zeros(4, 5)], 1).long()
    model = tiny("llama")
    targets = find_targets(model)
    plain = gather_moments(model, targets, [{"input_ids": ids}], progress=False)
    masked = gather_moments(model, targets, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    for t in targets:
        assert masked[t.module].samples == plain[t.module].samples == 48
        assert torch.allclose(masked[t.module].output_std, plain[t.module].output_std, rtol=1e-4, atol=1e-6)
        assert torch.allclose(masked[t.module].input_std, plain[t.module].input_std, rtol=1e-4, atol=1e-6)


def test_gather_leaves_the_model_unchanged():
    model = tiny("llama")
    ids = calibration_for("llama")
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    BetaRank().gather(model, find_targets(model), [{"input_ids": ids}], progress=False)
    assert model.training  # the training flag is restored
    model.eval()
    assert torch.equal(model(ids).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_prune_meets_half_the_targeted_weights_exactly(family):
    model = tiny(family)
    report = prunekit.prune(model, 0.5, importance="beta_rank", calibration=calibration_for(family), progress=False)
    targets = find_targets(model)
    total = sum(t.numel for t in targets)
    assert report.pruned == total // 2
    assert sum(int((~keep).sum()) for keep in prunekit.masks(model).values()) == total // 2
    assert all(int((t.module.weight == 0).sum()) == t.numel // 2 for t in targets)
    assert "BetaRank" in report.importance
