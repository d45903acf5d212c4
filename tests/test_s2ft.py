"""S2FT: co-permutation, slices, partial backprop, fuse/unfuse, masks and deltas, against dense references."""
import copy

import pytest
import torch

import prunekit
from conftest import VOCAB, calibration_for, tiny
from prunekit import PrunekitError
from prunekit.tuning import load_deltas, prepare, save_deltas
from prunekit.tuning.s2ft import coupled_blocks, permute

ALL = dict(heads=0.5, channels=0.25, value_heads=0.5, up_channels=0.25)  # every kind of slice, overlapping sets


def batch(seed=0, n=2, length=10):
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def logits(model, seed=99):
    with torch.no_grad():
        return model(input_ids=batch(seed)["input_ids"]).logits


def train(tuned, steps=3, lr=0.05):
    optimizer = tuned.optimizer(lr=lr)
    for i in range(steps):
        tuned.model(**batch(i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def outputs(model, family):
    with torch.no_grad():
        if family == "vit":
            return model(pixel_values=calibration_for("vit")[0]["pixel_values"]).logits
        return model(input_ids=batch(99)["input_ids"])[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "bert", "vit"])
def test_co_permutation_leaves_the_function_unchanged(family):
    model = tiny(family)
    before = outputs(model, family)
    o = coupled_blocks(model)[0].layers["o"].weight.clone()
    g = torch.Generator().manual_seed(3)
    for block in coupled_blocks(model):
        assert block.groups == (2 if family in ("llama", "qwen2") else 4)  # GQA: 4 query heads, 2 KV heads
        permute(block, torch.arange(block.groups).flip(0), torch.randperm(block.channels, generator=g))
    assert not torch.equal(coupled_blocks(model)[0].layers["o"].weight, o)  # the weights did move
    after = outputs(model, family)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_splitting_a_kv_group_would_change_the_function():
    """The negative control: swapping two query heads of different KV groups (without their K/V) is not allowed."""
    model = tiny("llama")
    before = logits(model)
    block = coupled_blocks(model)[0]
    rows = torch.arange(block.layers["q"].out_features)
    head = block.group_rows // 2  # = head_dim: heads 1 and 2 sit in groups 0 and 1
    rows[head:2 * head], rows[2 * head:3 * head] = rows[2 * head:3 * head].clone(), rows[head:2 * head].clone()
    with torch.no_grad():
        block.layers["q"].weight.copy_(block.layers["q"].weight[rows])
        block.layers["o"].weight.copy_(block.layers["o"].weight[:, rows])
    assert (logits(model) - before).abs().max() > 1e-3


def test_slices_are_whole_kv_groups_and_channels_of_the_original_weights():
    model = tiny("llama")
    original = copy.deepcopy(model)
    before = logits(model)
    tuned = prepare(model, "s2ft", **ALL)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)  # deltas start at zero
    params = dict(original.named_parameters())
    head_cols = 2 * 8  # two query heads of head_dim 8 per KV group
    for name, s in tuned.slices.items():
        weight = params[f"{name}.weight"].detach()
        width = s.end - s.start
        here = s.module.weight.detach().narrow(s.dim, s.start, width).reshape(-1)
        torch.testing.assert_close(here, weight.reshape(-1)[s.flat_indices()])  # same entries, moved
        if name.endswith("o_proj"):
            cols = s.axis_perm[s.start:s.end].view(-1, head_cols)
            assert (cols - cols[:, :1] == torch.arange(head_cols)).all() and (cols[:, 0] % head_cols == 0).all()
    counts = {"o_proj": 2, "down_proj": 32, "v_proj": 2, "up_proj": 32}  # of 4 groups and 128 channels, 2 blocks
    for suffix, total in counts.items():
        layers = [s for n, s in tuned.slices.items() if n.endswith(suffix)]
        size = {"o_proj": head_cols, "v_proj": 8}.get(suffix, 1)
        assert sum((s.end - s.start) // size for s in layers) == total, suffix


def test_only_the_slice_gradient_is_computed_and_equals_the_dense_gradient_there():
    model = tiny("llama")
    reference = copy.deepcopy(model)
    tuned = prepare(model, "s2ft", **ALL)
    b = batch(5)
    model(**b).loss.backward()
    for p in reference.parameters():
        p.requires_grad_(True)
    reference(**b).loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    assert all(p.grad is None for n, p in model.named_parameters() if "s2ft" not in n)
    for name, s in tuned.slices.items():
        expected = grads[f"{name}.weight"].reshape(-1)[s.flat_indices()].view_as(s.delta)
        torch.testing.assert_close(s.delta.grad, expected, atol=1e-6, rtol=1e-5)


def test_fuse_then_unfuse_round_trips_exactly_and_fused_logits_match():
    model = tiny("llama")
    tuned = prepare(model, "s2ft", **ALL)
    train(tuned)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = logits(model)
    tuned.fuse()
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, weights[n])}
    assert changed == {f"{n}.weight" for n in tuned.slices}
    tuned.unfuse()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert torch.equal(logits(model), adapted)


def test_pruned_entries_stay_zero_and_saved_deltas_reload_onto_a_fresh_unpermuted_base(tmp_path):
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude")
    fresh = copy.deepcopy(model)
    tuned = prepare(model, "s2ft", **ALL)
    assert tuned.trainable_count() == sum(int(s.keep.sum()) for s in tuned.slices.values())
    train(tuned)
    adapted = logits(model)
    load_deltas(fresh, save_deltas(tuned, tmp_path / "s2ft"))
    torch.testing.assert_close(logits(fresh), adapted, atol=1e-5, rtol=1e-5)
    tuned.fuse()
    modules = dict(model.named_modules())
    for name, keep in prunekit.masks(model).items():
        assert not modules[name].weight[~keep].any(), name  # masks moved with their weights
    for name, keep in prunekit.masks(fresh).items():
        assert not dict(fresh.named_modules())[name].weight[~keep].any(), name


def test_selection_by_an_estimator_takes_the_units_with_the_largest_summed_score():
    model = tiny("llama")
    sums = [b.layers["o"].weight.detach().abs().view(32, 2, 16).sum(dim=(0, 2)) for b in coupled_blocks(model)]
    best = max(((i, u) for i in range(2) for u in range(2)), key=lambda bu: sums[bu[0]][bu[1]])
    tuned = prepare(model, "s2ft", heads=0.25, channels=0.0, select="magnitude")
    (name, s), = tuned.slices.items()
    assert name == f"model.layers.{best[0]}.self_attn.o_proj"
    assert s.axis_perm[s.start] == best[1] * 16


def test_bad_options_and_models_fail_before_anything_changes():
    with pytest.raises(PrunekitError, match="heads"):
        prepare(tiny("llama"), "s2ft", heads=1.5)
    with pytest.raises(PrunekitError, match="trains nothing"):
        prepare(tiny("llama"), "s2ft", heads=0.0, channels=0.0)
    with pytest.raises(PrunekitError, match="selects none"):
        prepare(tiny("llama"), "s2ft", heads=0.01, channels=0.0)
    with pytest.raises(PrunekitError, match="unknown"):
        prepare(tiny("llama"), "s2ft", select="nonsense")
    model = tiny("gpt2")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunekitError, match="q_proj"):
        prepare(model, "s2ft")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
