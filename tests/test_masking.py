"""Masks against brute force: exact counts, the right entries, valid N:M groups."""
import itertools

import pytest
import torch

from prunekit.masking import lowest, lowest_per_row, nm_mask, select
from prunekit.masking.unstructured import kth_smallest


def test_lowest_prunes_exactly_the_k_smallest():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 9, generator=g)
    for k in (0, 1, 17, 62, 63):
        keep = lowest(scores, k)
        assert int((~keep).sum()) == k
        if 0 < k < scores.numel():  # every pruned score is below every kept one
            assert scores[~keep].max() < scores[keep].min()


def test_lowest_with_ties_is_exact_and_takes_earliest():
    scores = torch.tensor([[1.0, 0.5, 0.5], [0.5, 2.0, 0.5]])
    keep = lowest(scores, 2)
    assert keep.tolist() == [[True, False, False], [True, True, True]]


def test_lowest_per_row_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    for rows, cols, count in [(3, 4, 5), (4, 3, 6), (2, 5, 9), (3, 3, 0)]:
        scores = torch.rand(rows, cols, generator=g)
        keep = lowest_per_row(scores, count)
        base, extra = divmod(count, rows)
        per_row = (~keep).sum(1)
        assert int(per_row.sum()) == count
        assert sorted(per_row.tolist()) == sorted([base + 1] * extra + [base] * (rows - extra))
        # Brute force: over every way to give the extra prunings to rows, pruning each row's lowest entries,
        # ours removes the least total score.
        ordered = scores.sort(1).values
        best = min(sum(ordered[r, : base + (r in chosen)].sum() for r in range(rows))
                   for chosen in itertools.combinations(range(rows), extra))
        assert float(scores[~keep].sum()) == pytest.approx(float(best))
        for r in range(rows):  # within each row, the pruned are its lowest
            if 0 < per_row[r] < cols:
                assert scores[r][~keep[r]].max() < scores[r][keep[r]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_keeps_the_n_largest_of_every_group(n, m):
    g = torch.Generator().manual_seed(2)
    scores = torch.rand(5, 4 * m, generator=g)
    keep = nm_mask(scores, n, m)
    groups_keep = keep.view(5, 4, m)
    groups_score = scores.view(5, 4, m)
    assert (groups_keep.sum(-1) == n).all()
    for r, c in itertools.product(range(5), range(4)):
        expect = set(groups_score[r, c].argsort(descending=True)[:n].tolist())
        assert set(groups_keep[r, c].nonzero().flatten().tolist()) == expect


def test_select_rejects_unknown_group():
    with pytest.raises(ValueError, match="comparison group"):
        select(torch.rand(2, 2), 1, group="column")


@pytest.mark.parametrize("case", ["random", "ties", "biased sample"])
def test_kth_smallest_equals_torch_selection_on_large_tensors(case):
    # Above 2^17 elements the k-th value is bracketed by a strided sample first; it must stay exact, including when
    # half the scores tie (already-pruned weights) and when the sample misses the bracket (every 64th element huge,
    # so the sample's quantiles lie far above the true ones and the full selection must take over).
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(300_000, generator=g).square()
    if case == "ties":
        flat[::2] = 0.0
    if case == "biased sample":
        flat[::64] += 1e6
    for k in (1, 1000, 150_000, 150_001, 250_000, 299_999, 300_000):
        assert kth_smallest(flat, k) == flat.kthvalue(k).values, k
    keep = lowest(flat.view(600, 500), 150_001)
    assert int((~keep).sum()) == 150_001 and flat.view(600, 500)[~keep].max() <= flat.view(600, 500)[keep].min()
