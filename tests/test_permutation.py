"""N:M channel permutation (prunekit.masking.permutation, prunekit.structured.permute): the assignment's gains
against direct enumeration, never less importance kept than the given order, the optimum on small cases found by
trying every grouping, and on real model classes: the model's function unchanged to float tolerance, masks N:M in
storage order, saved and reloaded (plain from_pretrained included)."""
import itertools

import pytest
import torch
import transformers as tf

import prunekit
from conftest import calibration_for, tiny
from prunekit.errors import BudgetError, CalibrationError
from prunekit.masking.permutation import _gains, kept, nm_permutation, refine, snake
from prunekit.structured.permute import permutable_groups, permute
from prunekit.targets import find_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def best_grouping(scores, n, m):
    """The most importance any grouping of the columns into M-sized groups keeps (every set partition)."""
    cols = list(range(scores.shape[1]))

    def partitions(rest):
        if not rest:
            yield []
            return
        first = rest[0]
        for others in itertools.combinations(rest[1:], m - 1):
            group = (first, *others)
            remaining = [c for c in rest if c not in group]
            for tail in partitions(remaining):
                yield [group, *tail]

    return max(sum(float(scores[:, list(g)].topk(n, dim=1)[0].sum()) for g in p) for p in partitions(cols))


@pytest.mark.parametrize("n,m,position", [(2, 4, 0), (2, 4, 3), (1, 4, 2), (3, 4, 1), (2, 8, 5)])
def test_gains_are_what_each_group_keeps_with_the_candidate_in_it(n, m, position):
    scores = torch.rand(5, 4 * m, generator=torch.Generator().manual_seed(n * 10 + m)).double()
    gains = _gains(scores, n, m, position)
    for i, j in itertools.product(range(4), range(4)):
        group = scores[:, j * m:(j + 1) * m].clone()
        group[:, position] = scores[:, i * m + position]
        assert gains[i, j].item() == pytest.approx(float(group.topk(n, dim=1)[0].sum()), rel=1e-12)


def test_a_permutation_never_keeps_less_and_is_one():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        rows, cols = int(torch.randint(1, 40, (1,), generator=g)), 4 * int(torch.randint(1, 30, (1,), generator=g))
        # heavy-tailed columns (as activation norms are), so grouping matters
        scores = torch.rand(rows, cols, generator=g) * torch.rand(cols, generator=g).pow(6) * 100
        order = nm_permutation(scores, 2, 4)
        assert sorted(order.tolist()) == list(range(cols))
        assert kept(scores[:, order], 2, 4) >= kept(scores, 2, 4) * (1 - 1e-6)
        assert kept(scores[:, order], 2, 4) >= kept(scores[:, snake(scores, 4)], 2, 4) * (1 - 1e-6)


def test_refinement_is_monotone_round_by_round():
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(3)) ** 4
    order = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    values = [kept(scores[:, order], 2, 4)]
    for _ in range(3):
        order = refine(scores, order, 2, 4, rounds=1)
        values.append(kept(scores[:, order], 2, 4))
    assert all(b >= a * (1 - 1e-6) for a, b in zip(values, values[1:]))


def test_adjacent_important_channels_are_separated():
    """Columns 0-2 carry the importance, in one group: in order a 2:4 mask keeps 5 + 4 of each row (and 4 x 1e-3
    from the two other groups); permuted, each lands in its own group beside a 1e-3: 5 + 4 + 3 + 3 x 1e-3."""
    scores = torch.full((6, 12), 1e-3)
    scores[:, :3] = torch.tensor([5.0, 4.0, 3.0])
    order = nm_permutation(scores, 2, 4)
    assert kept(scores, 2, 4) == pytest.approx(6 * 9.004, rel=1e-6)
    assert kept(scores[:, order], 2, 4) == pytest.approx(6 * 12.003, rel=1e-6)
    assert kept(scores[:, order], 2, 4) == pytest.approx(best_grouping(scores, 2, 4), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_small_cases_reach_close_to_the_best_grouping(seed):
    """8 and 12 columns: every grouping enumerated. RIA's method is a heuristic, not an optimum: on these it keeps
    98.4-100% of the best grouping's importance."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(4, 8 if seed < 3 else 12, generator=g) ** 3
    best = best_grouping(scores, 2, 4)
    got = kept(scores[:, nm_permutation(scores, 2, 4)], 2, 4)
    assert got <= best * (1 + 1e-6)
    assert got >= 0.98 * best


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        nm_permutation(-torch.ones(2, 8), 2, 4)
    with pytest.raises(BudgetError, match="multiple of 4"):
        nm_permutation(torch.ones(2, 10), 2, 4)


@pytest.mark.parametrize("family", ["llama", "opt", "bert"])
def test_the_mlp_channels_are_found_and_reordered_without_changing_the_function(family):
    model = tiny(family)
    calibration = calibration_for(family)
    batch = {"input_ids": calibration[:2]}
    targets = find_targets(model)
    groups = permutable_groups(model, targets, batch)
    assert len(groups) == 2  # one MLP per block; attention and the residual stream stay in order
    for g in groups:
        assert len(g.readers) == 1 and 1 <= len(g.producers) <= 2
    with torch.no_grad():
        before = model(**batch)[0]
        scores = {r: torch.rand(r.weight.shape, generator=torch.Generator().manual_seed(5)) for g in groups
                  for r in g.readers}
        gained = permute(groups, scores, 2, 4)
        after = model(**batch)[0]
    assert all(v >= 1 - 1e-6 for v in gained.values())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_prune_with_permute_keeps_more_and_reloads(tmp_path):
    calibration = calibration_for("llama", n=8, length=16)
    plain, permuted = tiny("llama"), tiny("llama")
    prunekit.prune(plain, "2:4", "wanda", calibration=calibration, progress=False)
    report = prunekit.prune(permuted, "2:4", "wanda", calibration=calibration, progress=False, permute=True)
    assert set(report.permuted) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert all(v >= 1.0 for v in report.permuted.values())
    assert "channels permuted in 2 groups" in report.summary()
    assert "permutation" in report.seconds
    for name, keep in prunekit.masks(permuted).items():  # N:M in the order the weights are stored
        groups = keep.reshape(keep.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
    # q/k/v/o and gate/up read unpermuted inputs: their masks are the plain run's
    plain_masks, permuted_masks = prunekit.masks(plain), prunekit.masks(permuted)
    assert torch.equal(plain_masks["model.layers.0.self_attn.q_proj"], permuted_masks["model.layers.0.self_attn.q_proj"])
    batch = {"input_ids": calibration[:2]}
    with torch.no_grad():
        logits = permuted(**batch).logits
    prunekit.save_pruned(permuted, tmp_path / "p")  # compressed
    prunekit.save_pruned(permuted, tmp_path / "dense", compressed=False)
    again = prunekit.load_pruned(tmp_path / "p")
    plain_load = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # the architecture is unchanged
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits)
        torch.testing.assert_close(plain_load(**batch).logits, logits)


def test_permute_is_refused_where_it_does_not_apply(llama):
    calibration = calibration_for("llama")
    with pytest.raises(BudgetError, match="permute=True reorders channels for N:M"):
        prunekit.prune(llama, 0.5, "wanda", calibration=calibration, progress=False, permute=True)
    with pytest.raises(CalibrationError, match="permute=True"):
        prunekit.prune(llama, "2:4", "magnitude", progress=False, permute=True)
    assert not prunekit.masks(llama)
