"""Block granularity: tile masks against brute force, exact budgets in whole tiles, ragged layers refused."""
import itertools

import pytest
import torch

import prunekit
from conftest import calibration_for, tiny
from prunekit import Budget, BudgetError
from prunekit.masking import block_mask, select

pytestmark = pytest.mark.usefixtures("one_thread")


def tile_is_constant(keep: torch.Tensor, r: int, c: int) -> bool:
    tiles = keep.reshape(keep.shape[0] // r, r, keep.shape[1] // c, c)
    return bool((tiles.all(dim=(1, 3)) | ~tiles.any(dim=(1, 3))).all())


@pytest.mark.parametrize("r,c", [(2, 3), (4, 4), (1, 2)])
def test_block_mask_prunes_the_tiles_of_lowest_summed_score(r, c):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4 * r, 3 * c, generator=g)
    sums = {(i, j): float(scores[i * r:(i + 1) * r, j * c:(j + 1) * c].sum()) for i in range(4) for j in range(3)}
    for tiles in (0, 1, 5, 12):
        keep = block_mask(scores, tiles * r * c, (r, c))
        assert int((~keep).sum()) == tiles * r * c and tile_is_constant(keep, r, c)
        pruned = {t for t in sums if not keep[t[0] * r, t[1] * c]}
        assert pruned == set(sorted(sums, key=sums.get)[:tiles])


def test_block_mask_per_row_of_tiles_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(6, 8, generator=g)  # 3 x 4 tiles of 2x2
    sums = scores.reshape(3, 2, 4, 2).sum(dim=(1, 3))
    keep = block_mask(scores, 7 * 4, (2, 2), group="row")  # 7 tiles over 3 rows of tiles: 3, 2, 2
    tile_keep = keep[::2, ::2]
    per_row = (~tile_keep).sum(1)
    assert sorted(per_row.tolist()) == [2, 2, 3]
    ordered = sums.sort(1).values  # brute force over which row of tiles takes the extra one
    best = min(sum(float(ordered[i, : 2 + (i == extra)].sum()) for i in range(3)) for extra in range(3))
    assert float(sums[~tile_keep].sum()) == pytest.approx(best)


def test_block_mask_refuses_partial_tiles_and_ragged_shapes():
    with pytest.raises(ValueError, match="whole 2x2 tiles"):
        block_mask(torch.rand(4, 4), 3, (2, 2))
    with pytest.raises(BudgetError, match="block 4x4 granularity needs both dimensions.*5x8"):
        select(torch.rand(5, 8), 16, block=(4, 4))


def test_budget_parses_block_granularities():
    assert Budget(sparsity=0.5, granularity="block").block == (32, 32)
    assert Budget(sparsity=0.5, granularity="block64x64").block == (64, 64)
    assert Budget(sparsity=0.5, granularity="block16x8").block == (16, 8)
    assert Budget(sparsity=0.5).block is None and Budget(granularity="2:4").block is None
    for bad in ("block0x4", "block1x1"):
        with pytest.raises(BudgetError, match="at least two weights"):
            Budget(sparsity=0.5, granularity=bad)
    for bad in ("block32", "blocks", "block 32x32x2"):
        with pytest.raises(BudgetError, match="unknown granularity"):
            Budget(sparsity=0.5, granularity=bad)
    with pytest.raises(BudgetError, match="needs a sparsity"):
        Budget(granularity="block")


@pytest.mark.parametrize("importance,allocator", [("magnitude", "uniform"), ("wanda", "uniform"),
                                                  ("sparsegpt", "uniform"), ("wanda", "owl")])
def test_prune_in_whole_tiles_is_exact(importance, allocator):
    model = tiny("llama")
    budget = Budget(sparsity=0.6, granularity="block16x16", max_layer_sparsity=0.95)
    report = prunekit.prune(model, budget, importance=importance, allocator=allocator,
                            calibration=calibration_for("llama"), progress=False)
    tiles = sum(row.numel for row in report.layers) // 256
    assert report.pruned == round(0.6 * tiles) * 256 and report.exact
    assert report.granularity == "block16x16" and "exact to the 16x16 tile" in report.summary()
    for name, keep in prunekit.masks(model).items():
        weight = model.get_submodule(name).weight
        assert tile_is_constant(keep, 16, 16), name
        assert bool((weight[~keep] == 0).all())
    if allocator == "uniform":  # each layer within one tile of its share
        for row in report.layers:
            assert abs(row.pruned - 0.6 * row.numel) <= 256


def test_sparsegpt_block_ranks_tiles_by_obs_saliency_and_reconstructs():
    """One lazy batch over the whole layer: the pruned tiles are those of least summed w^2 / [H^-1]_jj^2, with the
    Cholesky factor's diagonal, and the kept weights change (the OBS update) where plain masking would not."""
    from prunekit.calibration.stats import LayerStats, Needs
    from prunekit.importance.sparsegpt import SparseGPT

    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 8, generator=g)
    stats = LayerStats(Needs.HESSIAN, 8)
    stats.update(torch.randn(64, 8, generator=g))
    est = SparseGPT(blocksize=8)
    new, keep = est.prune(w, stats, 3 * 16, None, (4, 4))
    d = torch.diagonal(est.inverse_cholesky(stats.hessian()))
    saliency = w.square() / d.square().unsqueeze(0)
    sums = {(i, j): float(saliency[4 * i:4 * i + 4, 4 * j:4 * j + 4].sum())
            for i, j in itertools.product(range(2), range(2))}
    pruned = {t for t in sums if not keep[4 * t[0], 4 * t[1]]}
    assert pruned == set(sorted(sums, key=sums.get)[:3])
    assert bool((new[~keep] == 0).all()) and not torch.allclose(new[keep], w[keep])


def test_ragged_layers_are_refused_before_any_change():
    model = tiny("llama")  # k_proj and v_proj are 16 x 32: 32x32 tiles do not cover them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BudgetError, match="k_proj is 16x32"):
        prunekit.prune(model, Budget(sparsity=0.5, granularity="block"), importance="magnitude", progress=False)
    assert prunekit.masks(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    report = prunekit.prune(model, Budget(sparsity=0.5, granularity="block", exclude=r"[kv]_proj"),
                            importance="magnitude", progress=False)
    assert report.exact and report.granularity == "block32x32"
