"""ADMM reconstruction and DSnoT refinement against independent references: the layer-wise error they are meant to
lower, SparseGPT's and Wanda's on the same cases, and a brute-force optimum over every support of a tiny layer."""
import itertools

import pytest
import torch

import prunekit
from conftest import calibration_for, tiny
from prunekit import masking
from prunekit.calibration.stats import LayerStats, Needs
from prunekit.importance import ESTIMATORS
from prunekit.importance.admm import ADMM
from prunekit.importance.dsnot import DSnoT
from prunekit.importance.reconstruction import refit_on_support


def layer(rows, cols, seed, samples=256):
    """A random weight and the statistics of correlated random inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    x = torch.randn(samples, cols, generator=g) @ mix
    stats = LayerStats(Needs.HESSIAN, cols)
    stats.update(x)
    return torch.randn(rows, cols, generator=g), stats, x


def error(w0, w, x):
    """||W0 X - W X||² straight from the inputs, not from the statistics the estimators use."""
    return float(((w0.double() - w.double()) @ x.double().t()).square().sum())


CASES = [(48, 64, 0.5, None, None), (48, 64, 0.7, None, None), (32, 96, 0.8, None, None), (48, 64, 0.5, (2, 4), None),
         (64, 64, 0.75, None, (16, 16))]


@pytest.mark.parametrize("rows,cols,sparsity,nm,block", CASES)
def test_admm_is_never_worse_than_sparsegpt_or_wanda(rows, cols, sparsity, nm, block):
    for seed in range(3):
        w, stats, x = layer(rows, cols, seed)
        count = round(sparsity * w.numel())
        ours, keep = ADMM().prune(w, stats, count, nm, block)
        assert int((~keep).sum()) == count and bool((ours[~keep] == 0).all())
        if nm is not None:
            assert masking.nm_mask(keep.float(), *nm).equal(keep)
        sgpt, _ = ESTIMATORS.create("sparsegpt").prune(w.clone(), stats, count, nm, block)
        wanda, _ = ESTIMATORS.create("wanda").prune(w.clone(), stats, count, nm, block)
        mine = error(w, ours, x)
        assert mine <= error(w, sgpt, x) * (1 + 1e-6) and mine <= error(w, wanda, x) * (1 + 1e-6)


def test_the_refit_is_the_least_squares_optimum_on_each_rows_support():
    w, stats, x = layer(6, 10, seed=4, samples=40)
    keep = torch.rand(6, 10, generator=torch.Generator().manual_seed(1)) < 0.5
    h = stats.hessian()
    fitted = refit_on_support(w, h, keep, w * keep, iterations=50)
    for r in range(6):
        s = keep[r].nonzero().squeeze(1)
        solution = torch.linalg.lstsq(x[:, s].double(), (x.double() @ w[r].double()).unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(fitted[r, s].double(), solution, rtol=1e-4, atol=1e-5)
        assert bool((fitted[r, ~keep[r]] == 0).all())


def brute_force(w, x, n, m):
    """The least error over every N:M support of every row, each refitted by least squares."""
    total = 0.0
    for r in range(w.shape[0]):
        groups = [list(itertools.combinations(range(g, g + m), n)) for g in range(0, w.shape[1], m)]
        best = None
        for choice in itertools.product(*groups):
            s = [c for part in choice for c in part]
            target = x.double() @ w[r].double()
            fit = torch.linalg.lstsq(x[:, s].double(), target.unsqueeze(1)).solution.squeeze(1)
            e = float((x[:, s].double() @ fit - target).square().sum())
            best = e if best is None else min(best, e)
        total += best
    return total


def test_admm_reaches_the_brute_force_optimum_of_a_tiny_layer():
    """8x8 at 50% (4 of every row's 8 kept): on this layer ADMM's support is the best of the 70 per row. (On 20
    random 8x8 layers it reaches the optimum on 8 and is 2% above it on average: ADMM is a heuristic, the exact
    problem combinatorial.)"""
    w, stats, x = layer(8, 8, seed=8, samples=64)
    ours, keep = ADMM().prune(w, stats, 0, (4, 8))
    assert error(w, ours, x) == pytest.approx(brute_force(w, x, 4, 8), rel=1e-5)


def test_admm_stays_near_the_brute_force_optimum():
    ratios = []
    for seed in range(6):
        w, stats, x = layer(4, 8, seed=seed, samples=48)
        ours, _ = ADMM().prune(w, stats, 0, (4, 8))
        ratios.append(error(w, ours, x) / brute_force(w, x, 4, 8))
    assert min(ratios) >= 1 - 1e-6 and max(ratios) <= 1.15, ratios


@pytest.mark.parametrize("base", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_dsnot_never_raises_the_error_and_keeps_the_count(base, nm):
    for seed in range(3):
        w, stats, x = layer(32, 64, seed)
        count = 1024
        before, keep_before = ESTIMATORS.create(base).prune(w.clone(), stats, count, nm)
        after, keep = DSnoT(base).prune(w.clone(), stats, count, nm)
        assert error(w, after, x) <= error(w, before, x) * (1 + 1e-9)
        assert int((~keep).sum()) == int((~keep_before).sum()) and bool((after[~keep] == 0).all())
        assert torch.equal((~keep).sum(1), (~keep_before).sum(1))  # swaps stay within each row
        if nm is not None:
            assert masking.nm_mask(keep.float(), *nm).equal(keep)
    w, stats, x = layer(32, 64, 0)
    wanda, _ = ESTIMATORS.create("wanda").prune(w.clone(), stats, 1024, None)
    refined, _ = DSnoT("wanda").prune(w.clone(), stats, 1024, None)
    assert error(w, refined, x) < 0.9 * error(w, wanda, x)  # it does something


@pytest.mark.parametrize("order", ["layer", "block"])
@pytest.mark.parametrize("importance,allocator", [("admm", "uniform"), ("admm", "owl"), ("dsnot", "dp")])
def test_they_run_in_the_pipeline(order, importance, allocator):
    model = tiny("llama")
    report = prunekit.prune(model, 0.5, importance=importance, allocator=allocator,
                            calibration=calibration_for("llama"), order=order, progress=False)
    assert report.exact and len(prunekit.masks(model)) == 14
    assert all(bool((model.get_submodule(n).weight[~k] == 0).all()) for n, k in prunekit.masks(model).items())


def test_dsnot_refuses_a_whole_model_base():
    with pytest.raises(prunekit.PrunekitError, match="refines masks of estimators the block runner feeds"):
        DSnoT("fisher")


def test_the_default_importance_is_admm_for_n_m_and_wanda_otherwise():
    calibration = calibration_for("llama", n=4)
    assert prunekit.prune(tiny("llama"), "2:4", calibration=calibration, progress=False).importance.startswith("ADMM")
    assert prunekit.prune(tiny("llama"), 0.5, calibration=calibration, progress=False).importance.startswith("Wanda")
