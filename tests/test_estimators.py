"""Estimators against independent references computed here: formulas for magnitude and Wanda, and a
straightforward float64 OBS (explicit inverses, one column at a time) for SparseGPT."""
import pytest
import torch
from torch import nn

import prunekit
from prunekit.importance import ESTIMATORS
from prunekit.importance.sparsegpt import SparseGPT


def single_linear(rows=6, cols=16, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(cols, rows))


def inputs(n=40, cols=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    # correlated features with unequal scales, so that activation-aware scores differ from magnitude
    mix = torch.randn(cols, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    return torch.randn(n, cols, generator=g) @ mix


def test_registry_lists_the_estimators():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(ESTIMATORS.names())


def test_magnitude_prunes_the_smallest_weights_of_the_layer():
    model = single_linear()
    w = model[0].weight.detach().clone()
    report = prunekit.prune(model, 0.3, importance="magnitude", progress=False)
    k = round(0.3 * w.numel())
    expect = torch.ones(w.numel(), dtype=torch.bool)
    expect[w.abs().flatten().argsort()[:k]] = False
    assert torch.equal(prunekit.masks(model)["0"], expect.view_as(w))
    assert torch.equal(model[0].weight, w * expect.view_as(w))
    assert report.pruned == k


def test_wanda_matches_its_formula_per_output_row():
    model = single_linear()
    x = inputs()
    w = model[0].weight.detach().clone()
    prunekit.prune(model, 0.5, importance="wanda", calibration=x, progress=False)
    score = w.abs() * x.pow(2).sum(0).sqrt()  # |W_ij| * ||X_j||_2
    expect = torch.ones_like(w, dtype=torch.bool)
    expect.scatter_(1, score.argsort(1)[:, :8], False)  # 8 of 16 per row
    assert torch.equal(prunekit.masks(model)["0"], expect)
    # and it is not simply magnitude on this data
    assert not torch.equal(expect, torch.ones_like(expect).scatter_(1, w.abs().argsort(1)[:, :8], False))


def test_wanda_ignores_padding_tokens():
    """Right padding, masked out, must not change the statistics: same masks as the unpadded windows."""
    from conftest import tiny

    ids = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(4))], 1)
    mask = torch.cat([torch.ones(4, 12), torch.zeros(4, 5)], 1).long()
    a, b = tiny("llama"), tiny("llama")
    prunekit.prune(a, 0.5, importance="wanda", calibration=[{"input_ids": ids}], progress=False)
    prunekit.prune(b, 0.5, importance="wanda", calibration=[{"input_ids": padded, "attention_mask": mask}],
                   progress=False)
    for name, keep in prunekit.masks(a).items():
        assert torch.equal(keep, prunekit.masks(b)[name]), name


def obs_reference(w, x, count=None, nm=None, blocksize=128, damp=0.01):
    """SparseGPT's algorithm written the slow, obvious way in float64: for column j, the inverse Hessian of the
    columns not yet processed is inv(H[j:, j:]); a pruned weight is removed with the OBS update."""
    w = w.double().clone()
    x = x.double()
    rows, cols = w.shape
    h = 2 * x.t() @ x / x.shape[0]
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=h.dtype)
    inv_tail = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    d2 = torch.tensor([inv_tail[j][0, 0] for j in range(cols)], dtype=h.dtype)  # [H_F^-1]_jj
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if nm is None:  # the block's share of the count, lowest OBS saliency w^2 / [H_F^-1]_jj first
            share = round(count * i2 / cols) - round(count * i1 / cols)
            sal = (w[:, i1:i2] ** 2 / d2[i1:i2]).flatten()
            block = torch.zeros(sal.numel(), dtype=torch.bool)
            block[sal.argsort()[:share]] = True
            pruned[:, i1:i2] = block.view(rows, i2 - i1)
        for j in range(i1, i2):
            if nm is not None and (j - i1) % nm[1] == 0:
                sal = w[:, j:j + nm[1]] ** 2 / d2[j:j + nm[1]]
                pruned[:, j:j + nm[1]] = False
                pruned[:, j:j + nm[1]].scatter_(1, sal.argsort(1)[:, : nm[1] - nm[0]], True)
            hf = inv_tail[j]
            for r in range(rows):
                if pruned[r, j]:
                    w[r, j:] -= w[r, j] / hf[0, 0] * hf[0]
    return w, ~pruned


@pytest.mark.parametrize("budget,blocksize,cols", [(0.5, 128, 16), (0.6, 8, 16), ("2:4", 8, 16), ("4:8", 128, 16),
                                                   (0.5, 64, 96), ("2:4", 64, 96)])  # 96: runs of 32 columns
def test_sparsegpt_matches_straightforward_obs(budget, blocksize, cols):
    model = single_linear(rows=6, cols=cols)
    x = inputs(n=128, cols=cols)
    w = model[0].weight.detach().clone()
    b = prunekit.Budget.coerce(budget)
    prunekit.prune(model, b, importance=SparseGPT(blocksize=blocksize), calibration=x, progress=False)
    expect_w, expect_keep = obs_reference(w, x, count=round(b.sparsity * w.numel()), nm=b.nm, blocksize=blocksize)
    assert torch.equal(prunekit.masks(model)["0"], expect_keep)
    torch.testing.assert_close(model[0].weight.double(), expect_w, rtol=1e-4, atol=1e-5)
    assert (model[0].weight[~expect_keep] == 0).all()


def test_sparsegpt_reconstruction_beats_masking_alone():
    model = single_linear(rows=8, cols=16)
    x = inputs(n=64, cols=16)
    w = model[0].weight.detach().clone()
    prunekit.prune(model, 0.5, importance="sparsegpt", calibration=x, progress=False)
    keep = prunekit.masks(model)["0"]
    err_obs = ((model[0].weight - w) @ x.t()).pow(2).sum()
    err_mask = ((w * keep - w) @ x.t()).pow(2).sum()
    assert err_obs < 0.8 * err_mask


def test_sparsegpt_survives_a_singular_hessian():
    """Rank-deficient inputs (fewer tokens than features, a dead feature): damping keeps it solvable."""
    model = single_linear(rows=4, cols=16)
    x = inputs(n=5, cols=16)
    x[:, 3] = 0
    report = prunekit.prune(model, 0.5, importance="sparsegpt", calibration=x, progress=False)
    assert report.exact and torch.isfinite(model[0].weight).all()
