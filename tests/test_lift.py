"""LIFT and the sparse update machinery (selection, reduced gradients, torch's AdamW on the selected values) against
references in the test."""
import copy

import numpy as np
import pytest
import torch
import transformers as tf
from torch import nn

import prunekit
from conftest import VOCAB, tiny
from prunekit import PrunekitError, TargetError
from prunekit.masks import attach
from prunekit.tuning import load_deltas, prepare, save_deltas
from prunekit.tuning.sparse import adamw, reselect, select, selection, state_size


def batch(seed=0, n=2, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids}


def train(model, optimizer, steps, seed=0):
    for i in range(steps):
        model(**batch(seed + i)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_principal(chosen, weight, filter_rank, k, keep=None, what=""):
    """`chosen` is the top-k of |rank-r truncated SVD|, computed here in float64 with numpy: k entries, none scoring
    below an entry left out, up to float32 rounding (LIFT computes in float32: two entries a rounding apart at the
    k-th place may come either way, and did on one machine)."""
    u, s, vt = np.linalg.svd(weight.detach().double().numpy(), full_matrices=False)
    approx = np.abs((u[:, :filter_rank] * s[:filter_rank]) @ vt[:filter_rank]).ravel()
    if keep is not None:
        approx[~keep.numpy().ravel()] = -1
    chosen = np.array(sorted(chosen))
    left = np.setdiff1d(np.arange(approx.size), chosen)
    assert chosen.size == k, what
    assert approx[chosen].min() >= approx[left].max() - 1e-4 * approx.max(), what
    exact = set(np.argsort(-approx, kind="stable")[:k].tolist())
    assert len(exact.symmetric_difference(chosen.tolist())) <= 2, what  # at most a tie swapped


def test_selection_is_the_top_k_of_the_low_rank_approximation():
    model = tiny("llama")
    tuned = prepare(model, "lift", rank=2, filter_rank=3, svd="exact")
    for name, module in tuned.layers.items():
        out, inp = module.weight.shape
        chosen = set(selection(module.weight).indices.tolist())
        assert len(chosen) == 2 * (out + inp)
        assert_principal(chosen, module.weight, 3, 2 * (out + inp), what=name)
    assert len(tuned.layers) == 2 * 7  # every Linear of the blocks, nothing else trains
    assert tuned.trainable_count() == sum(2 * sum(m.weight.shape) for m in tuned.layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in tuned.layers}


def test_randomized_svd_finds_the_same_principal_weights_on_a_low_rank_matrix():
    torch.manual_seed(0)
    w = torch.randn(40, 3) @ torch.randn(3, 30)  # rank 3: the randomized SVD is exact up to rounding
    from prunekit.tuning.lift import low_rank
    torch.testing.assert_close(low_rank(w, 3, "randomized"), low_rank(w, 3, "exact"), atol=1e-4, rtol=1e-4)


def test_only_selected_entries_change_and_state_is_sized_by_the_selection():
    model = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    tuned = prepare(model, "lift", rank=2, filter_rank=4, interval=0)
    optimizer = tuned.optimizer(lr=1e-2)
    train(model, optimizer, 2)
    k = sum(selection(m.weight).indices.numel() for m in tuned.layers.values())
    assert state_size(optimizer) == 2 * k
    for name, value in model.state_dict().items():
        changed = (value != before[name]).view(-1)
        module = tuned.layers.get(name.removesuffix(".weight"))
        if module is None:
            assert not changed.any(), name
        else:
            allowed = torch.zeros_like(changed)
            allowed[selection(module.weight).indices] = True
            assert changed.any() and not (changed & ~allowed).any(), name


def test_adamw_on_selected_values_equals_dense_adamw_on_those_entries_and_on_whole_unselected_parameters():
    torch.manual_seed(0)
    dense, sparse = nn.Linear(6, 5), nn.Linear(6, 5)
    sparse.load_state_dict(dense.state_dict())
    chosen = torch.tensor([0, 3, 7, 11, 29])
    select(sparse.weight, chosen)  # the bias has no selection: it trains whole, as an adapter would
    options = dict(lr=0.05, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    reference = torch.optim.AdamW([dense.weight, dense.bias], **options)
    optimizer = adamw([sparse.weight, sparse.bias], **options)
    frozen = torch.ones(30, dtype=torch.bool)
    frozen[chosen] = False
    original = dense.weight.detach().view(-1)[frozen].clone()
    for _ in range(4):
        x = torch.randn(8, 6)
        for layer, opt in ((dense, reference), (sparse, optimizer)):
            layer(x).square().sum().backward()
            assert layer is dense or sparse.weight.grad is None  # the dense gradient is freed during backward
            opt.step()
            opt.zero_grad()
        with torch.no_grad():  # the reference trains the same entries: the others (decayed by AdamW) go back
            dense.weight.view(-1)[frozen] = original
        torch.testing.assert_close(sparse.weight.view(-1)[chosen], dense.weight.view(-1)[chosen])
        torch.testing.assert_close(sparse.bias, dense.bias)
    assert state_size(optimizer) == 2 * (len(chosen) + 5)


def test_an_optimizer_of_ones_own_over_trainable_steps_the_selected_entries_in_the_weights():
    """SGD over the selected values, hooked by the method: one step moves exactly the selected entries of each
    weight by -lr times the dense gradient there (computed here on an untouched copy)."""
    model = tiny("llama")
    reference = copy.deepcopy(model)
    tuned = prepare(model, "lift", rank=2, filter_rank=3, interval=0)
    optimizer = tuned.hooked(torch.optim.SGD(tuned.trainable(), lr=0.5))
    model(**batch(3)).loss.backward()
    optimizer.step()
    reference(**batch(3)).loss.backward()
    for name, module in tuned.layers.items():
        before = dict(reference.named_modules())[name].weight
        expected = before.detach().clone().view(-1)
        chosen = selection(module.weight).indices
        expected[chosen] -= 0.5 * before.grad.view(-1)[chosen]
        torch.testing.assert_close(module.weight.detach().view(-1), expected, msg=name)
    assert tuned.steps == 1


def test_gradients_accumulate_over_micro_batches():
    layer = nn.Linear(4, 3)
    select(layer.weight, torch.arange(12))
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    layer(x1).sum().backward()
    layer(x2).sum().backward()
    expected = torch.ones(5 + 5, 3).T @ torch.cat([x1, x2])
    torch.testing.assert_close(selection(layer.weight).grad, expected.view(-1))


def test_refresh_carries_moments_of_entries_that_stay():
    layer = nn.Linear(4, 3)
    select(layer.weight, torch.tensor([1, 2, 5]))
    optimizer = adamw([layer.weight], lr=0.1)
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    values = selection(layer.weight).values  # what the optimizer trains
    old = {k: optimizer.state[values][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    reselect(layer.weight, torch.tensor([2, 5, 9]), optimizer)
    for key, value in old.items():
        torch.testing.assert_close(optimizer.state[values][key], torch.stack([value[1], value[2],
                                                                              torch.tensor(0.0)]))


def test_lift_refreshes_every_interval_steps():
    model = tiny("llama")
    tuned = prepare(model, "lift", rank=2, filter_rank=2, interval=2, svd="exact")
    optimizer = tuned.optimizer(lr=0.05)
    train(model, optimizer, 2)
    for module in tuned.layers.values():  # after step 2 the selection is the principal weights of W now
        out, inp = module.weight.shape
        assert_principal(selection(module.weight).indices.tolist(), module.weight, 2, 2 * (out + inp))


def test_pruned_entries_are_never_selected_and_stay_zero():
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude")
    masks = {n: m.clone() for n, m in prunekit.masks(model).items()}
    tuned = prepare(model, "lift", rank=2, filter_rank=3, interval=1, svd="exact")
    for name, module in tuned.layers.items():
        keep = masks[name]
        out, inp = keep.shape
        assert keep.view(-1)[selection(module.weight).indices].all()
        assert_principal(selection(module.weight).indices.tolist(), module.weight, 3, 2 * (out + inp), keep, name)
    train(model, tuned.optimizer(lr=0.05), 3)
    for name, module in tuned.layers.items():
        assert not module.weight[~masks[name]].any(), name


def test_saved_deltas_reproduce_the_trained_model_on_a_fresh_base(tmp_path):
    base = tiny("llama")
    model = copy.deepcopy(base)
    tuned = prepare(model, "lift", rank=2, filter_rank=3, interval=1)
    train(model, tuned.optimizer(lr=0.05), 3)
    meta = load_deltas(base, save_deltas(tuned, tmp_path / "lift"))
    assert meta["method"] == "lift"
    ids = batch(99)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


def test_deltas_trained_dense_keep_a_pruned_copys_zeros_and_change_only_its_kept_entries(tmp_path):
    base = tiny("llama")
    model = copy.deepcopy(base)
    tuned = prepare(model, "lift", rank=2, filter_rank=3)
    train(model, tuned.optimizer(lr=0.05), 2)
    pruned_base = copy.deepcopy(base)
    prunekit.prune(pruned_base, 0.5, importance="magnitude")
    down = pruned_base.model.layers[0].mlp.down_proj
    attach(down, down.prune_mask.T.contiguous().T)  # a strided mask, as SparseGPT's are
    assert not down.prune_mask.is_contiguous()
    before = {n: p.detach().clone() for n, p in pruned_base.named_parameters()}
    load_deltas(pruned_base, save_deltas(tuned, tmp_path / "lift"))
    trained, original = dict(model.named_parameters()), dict(base.named_parameters())
    for name, keep in prunekit.masks(pruned_base).items():
        weight = dict(pruned_base.named_modules())[name].weight
        change = trained[f"{name}.weight"] - original[f"{name}.weight"]
        assert (change[~keep] != 0).any(), name  # the dense training did touch entries the copy prunes
        assert not weight[~keep].any(), name
        torch.testing.assert_close(weight[keep], (before[f"{name}.weight"] + change)[keep])


def test_deltas_onto_a_different_base_are_refused_before_anything_changes(tmp_path):
    model = tiny("llama")
    tuned = prepare(model, "lift", rank=1, filter_rank=2)
    path = save_deltas(tuned, tmp_path / "d")
    torch.manual_seed(0)
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(PrunekitError, match="different base model"):
        load_deltas(other, path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


def test_trains_through_transformers_trainer(tmp_path):
    model = tiny("llama")
    tuned = prepare(model, "lift", rank=2, filter_rank=2, interval=2)
    data = [batch(i, n=1) for i in range(4)]
    data = [{k: v[0] for k, v in b.items()} for b in data]
    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                max_grad_norm=0, report_to=[], save_strategy="no", logging_strategy="no",
                                use_cpu=True)
    before = {n: m.weight.detach().clone() for n, m in tuned.layers.items()}
    tf.Trainer(model=model, args=args, train_dataset=data, optimizers=(tuned.optimizer(lr=1e-2), None)).train()
    assert tuned.steps == 3
    assert all(not torch.equal(m.weight, before[n]) for n, m in tuned.layers.items())


@pytest.mark.parametrize("options,error,message", [
    (dict(method="lfit"), PrunekitError, "unknown tuning method 'lfit'"),
    (dict(method="lift", ranks=4), PrunekitError, "bad options for tuning method 'lift'"),
    (dict(method="lift", rank=0), PrunekitError, "rank must be an integer >= 1"),
    (dict(method="lift", svd="qr"), PrunekitError, "svd must be one of"),
    (dict(method="lift", rank=64), PrunekitError,
     r"than model.layers.0.self_attn.k_proj \(16x32\) has unpruned; pass rank <= 10"),
    (dict(method="lift", include="nothing_matches"), TargetError, "no Linear or Conv1D layer"),
])
def test_bad_input_fails_before_the_model_changes(options, error, message):
    model = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=message):
        prepare(model, **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


class ConvBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 12, 3, padding=1), nn.Conv2d(12, 8, 1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Sequential(ConvBlock(), ConvBlock()),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_convolutions_train_their_principal_weights_as_out_by_patch_matrices(tmp_path):
    """A Conv2d of the blocks is the [out, in x kh x kw] matrix of its input patches: LIFT selects the top-K of that
    matrix's low-rank approximation, K = rank x (out + in x kh x kw); training moves only those entries, and the
    saved deltas rebuild the trained convolutions on a fresh copy."""
    model = small_cnn()
    tuned = prepare(model, "lift", rank=2, filter_rank=2, svd="exact")
    assert sorted(tuned.layers) == ["1.0.conv1", "1.0.conv2", "1.1.conv1", "1.1.conv2"]  # the stem and head stay
    before = {n: m.weight.detach().clone() for n, m in tuned.layers.items()}
    for name, module in tuned.layers.items():
        flat = module.weight.view(module.weight.shape[0], -1)
        k = 2 * sum(flat.shape)
        assert_principal(selection(module.weight).indices.tolist(), flat, 2, k, what=name)
    optimizer = tuned.optimizer(lr=1e-2)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, module in tuned.layers.items():
        moved = (module.weight.detach() != before[name]).view(-1).nonzero().view(-1)
        assert moved.numel() > 0 and set(moved.tolist()) <= set(selection(module.weight).indices.tolist())
    save_deltas(tuned, tmp_path / "deltas")
    fresh = small_cnn()
    load_deltas(fresh, tmp_path / "deltas")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
