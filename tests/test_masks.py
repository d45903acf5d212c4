"""Pruned entries stay zero through training (any optimizer, copies included) until masks are removed."""
import copy

import pytest
import torch

import prunekit
from conftest import calibration_for, tiny


def train(model, x, optimizer, steps=3):
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def pruned_nonzeros(model):
    return sum(int((model.get_submodule(name).weight[~keep] != 0).sum())
               for name, keep in prunekit.masks(model).items())


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adagrad(p, lr=0.1),
])
def test_a_training_step_keeps_pruned_entries_zero(make_optimizer):
    model = tiny("llama")
    x = calibration_for("llama")
    prunekit.prune(model, 0.5, importance="wanda", calibration=x, progress=False)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in prunekit.masks(model)}
    train(model, x, make_optimizer(model.parameters()))
    assert pruned_nonzeros(model) == 0
    changed = [n for n, w in before.items() if not torch.equal(model.get_submodule(n).weight, w)]
    assert len(changed) == len(before)  # kept weights did train


def test_gradients_of_pruned_entries_are_zero():
    model = tiny("llama")
    x = calibration_for("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    model(input_ids=x, labels=x).loss.backward()
    for name, keep in prunekit.masks(model).items():
        grad = model.get_submodule(name).weight.grad
        assert (grad[~keep] == 0).all() and (grad[keep] != 0).any()


def test_momentum_from_before_pruning_cannot_revive_weights():
    model = tiny("llama")
    x = calibration_for("llama")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, x, optimizer, steps=2)  # momentum now nonzero everywhere
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    train(model, x, optimizer, steps=2)
    assert pruned_nonzeros(model) == 0


def test_a_deep_copy_keeps_its_masks_enforced():
    model = tiny("llama")
    x = calibration_for("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    clone = copy.deepcopy(model)
    train(clone, x, torch.optim.AdamW(clone.parameters(), lr=1e-2, weight_decay=0.1))
    assert pruned_nonzeros(clone) == 0 and len(prunekit.masks(clone)) == 14
    assert prunekit.remove_masks(clone) == 14 and len(prunekit.masks(model)) == 14  # original unaffected


def test_masks_move_with_the_model_and_survive_dtype_changes():
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    model.to(torch.float64)
    keep = prunekit.masks(model)["model.layers.0.mlp.up_proj"]
    assert keep.dtype == torch.bool
    assert "prune_mask" not in "".join(model.state_dict())  # masks stay out of the checkpoint


def test_removed_masks_free_the_weights():
    model = tiny("llama")
    x = calibration_for("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    keeps = prunekit.masks(model)
    assert prunekit.remove_masks(model) == 14 and prunekit.masks(model) == {}
    train(model, x, torch.optim.SGD(model.parameters(), lr=0.1))
    revived = sum(int((model.get_submodule(n).weight[~k] != 0).sum()) for n, k in keeps.items())
    assert revived > 0


def test_pruned_entries_return_to_zero_even_from_nan_and_inf():
    # an optimizer can write NaN/Inf into pruned entries (fp16 Adam's eps underflows), and a gradient can hold them;
    # NaN * 0 is NaN, so masking must overwrite rather than multiply
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    name, keep = next(iter(prunekit.masks(model).items()))
    weight = model.get_submodule(name).weight
    upstream = torch.ones_like(weight).masked_fill(~keep, float("nan"))
    (weight * upstream).sum().backward()
    assert (weight.grad[~keep] == 0).all() and (weight.grad[keep] == 1).all()

    optimizer = torch.optim.SGD([weight], lr=0.0)
    pruned = (~keep).nonzero()[:2]

    def poison(*_):
        with torch.no_grad():
            weight[tuple(pruned[0])] = float("nan")
            weight[tuple(pruned[1])] = float("inf")

    optimizer.register_step_pre_hook(poison)
    optimizer.step()
    assert (weight[~keep] == 0).all()


def test_frozen_weights_prune_and_copy():
    """A frozen model prunes (no gradient hook is possible on it), a deep copy of it runs, and once a weight trains
    again its hook comes with the next forward."""
    import copy

    from conftest import tiny

    model = tiny("llama")
    model.requires_grad_(False)
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    twin = copy.deepcopy(model)
    twin(input_ids=torch.zeros(1, 4, dtype=torch.long))
    layer = twin.model.layers[0].mlp.down_proj
    layer.weight.requires_grad_(True)
    twin(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    assert layer.weight.grad is not None and not layer.weight.grad[~layer.prune_mask].any()


def _step_before_any_forward(model):
    """An optimizer step on a copy before its first forward: weight decay and a gradient of ones everywhere."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_a_pickled_or_copied_model_is_enforced_from_its_first_step(how):
    """Issue 26: pickling failed (a weakref on each masked Parameter), and a deep copy's first optimizer step filled
    every pruned entry (the copy's new Parameters had no link to their masks until a forward)."""
    import io
    import pickle

    model = tiny("llama")
    x = calibration_for("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    if how == "pickle":
        twin = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    else:
        twin = copy.deepcopy(model)
    assert {n: k.sum() for n, k in prunekit.masks(twin).items()} == {n: k.sum() for n, k in prunekit.masks(model).items()}
    _step_before_any_forward(twin)
    assert pruned_nonzeros(twin) == 0
    train(twin, x, torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1))
    assert pruned_nonzeros(twin) == 0
    layer = twin.model.layers[0].mlp.down_proj
    twin(input_ids=x, labels=x).loss.backward()
    assert not layer.weight.grad[~layer.prune_mask].any()
    _step_before_any_forward(model)  # the original is still its own
    assert pruned_nonzeros(model) == 0
