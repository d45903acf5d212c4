"""SPT (sensitivity-aware LoRA + sparse tuning) against references computed in the test."""
import copy
import math
from collections import Counter

import peft
import pytest
import torch

import prunekit
import prunekit.tuning.spt  # noqa: F401  (registers "spt")
from conftest import VOCAB, tiny
from prunekit import PrunekitError, TargetError
from prunekit.tuning import load_deltas, prepare, save_deltas
from prunekit.tuning.lowrank import base_name, lora_layers
from prunekit.tuning.sparse import selection, state_size
from prunekit.tuning.spt import allocate, sensitivity

INF = float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n=2, size=2, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (size, length), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def train(model, optimizer, steps, seed=10):
    for batch in batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def targets(model):
    return {t.name: t.module for t in prunekit.targets.find_targets(model)}


def lora_params(tuned):
    return sum(p.numel() for n, p in tuned.model.named_parameters() if "lora_" in n and p.requires_grad)


# -- allocation: a pure function of sensitivities, budget, rank and alpha

def reference_allocation(sens, budget, rank, alpha):
    """Brute force over every τ: the largest τ whose count fits the budget, and what it trains."""
    names = list(sens)
    ranked = sorted((-float(v), i, j) for i, n in enumerate(names) for j, v in enumerate(sens[n].ravel().tolist())
                    if v > -INF)
    cost = {n: rank * sum(sens[n].shape) for n in names}

    def config(tau):
        sigma = Counter(names[i] for _, i, _ in ranked[:tau])
        lora = [n for n in names if sigma[n] >= cost[n] / alpha]
        count = sum(cost[n] if n in lora else sigma[n] for n in names)
        return sigma, lora, count

    tau = max(t for t in range(len(ranked) + 1) if config(t)[2] <= budget)
    sigma, lora, count = config(tau)
    sparse = {n: sorted(j for _, i, j in ranked[:tau] if names[i] == n) for n in names if n not in lora and sigma[n]}
    return lora, sparse, {n: sigma[n] for n in names}, tau, count


def hand_built():
    return {"a": torch.tensor([[9.0, 1.0, 8.0], [0.5, 7.0, 0.1]]),                      # LoRA cost 5, threshold 3
            "b": torch.tensor([[6.0, 0.2, 0.3], [0.4, 5.0, 0.6], [0.7, 0.8, 0.9]]),      # LoRA cost 6, threshold 3
            "c": torch.tensor([[4.0, 3.0], [2.0, -INF]])}                                # LoRA cost 4, threshold 2


@pytest.mark.parametrize("budget,lora,sparse,tau,count", [
    # a9 a8 a7 (a -> LoRA, 5) b6 b5 (7) c4 (8) | c3 would make c a LoRA: 5 + 2 + 4 = 11 > 8
    (8, ["a"], {"b": [0, 4], "c": [0]}, 6, 8),
    (10, ["a"], {"b": [0, 4], "c": [0]}, 6, 8),  # the budget is a cap: 11 does not fit 10
    # ... c3 (c -> LoRA, 11) c2 a1 (both absorbed by LoRA: 11) | b0.9 would make b a LoRA: 5 + 6 + 4 = 15 > 11
    (11, ["a", "c"], {"b": [0, 4]}, 9, 11),
    # everything sensitive, all three LoRA (15); the pruned entry of c is never counted
    (17, ["a", "b", "c"], {}, 18, 15),
])
def test_allocation_follows_the_rules_on_a_hand_built_map(budget, lora, sparse, tau, count):
    got = allocate(hand_built(), budget, rank=1, alpha=2.0)
    assert got.lora == lora
    assert {n: v.tolist() for n, v in got.sparse.items()} == sparse
    assert (got.tau, got.count) == (tau, count)
    assert got.costs == {"a": 5, "b": 6, "c": 4}


def test_allocation_equals_a_brute_force_search_over_tau():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        sens = {}
        for name, shape in (("x", (3, 4)), ("y", (5, 2)), ("z", (4, 4))):
            s = torch.randint(0, 6, shape, generator=g).float()  # small integers: many ties
            s[torch.rand(shape, generator=g) < 0.2] = -INF
            sens[name] = s
        rank, alpha = [(1, 1.0), (1, 2.5), (2, 4.0), (1, 7.0)][trial % 4]
        finite = sum(int((s > -INF).sum()) for s in sens.values())
        for budget in range(1, finite + 1, 3):
            got = allocate(sens, budget, rank=rank, alpha=alpha)
            lora, sparse, sigma, tau, count = reference_allocation({n: s.numpy() for n, s in sens.items()}, budget,
                                                                   rank, alpha)
            assert got.lora == lora, (trial, budget)
            assert {n: v.tolist() for n, v in got.sparse.items()} == sparse, (trial, budget)
            assert (got.sensitive, got.tau, got.count) == (sigma, tau, count), (trial, budget)


@pytest.mark.parametrize("options,message", [
    (dict(budget=19),
     r"budget 19 is more than the 18 trainable \(unpruned\) entries of the 3 matrices; pass budget <= 18"),
    (dict(budget=0), "budget must be an integer >= 1"),
    (dict(budget=5, rank=0), "rank must be an integer >= 1"),
    (dict(budget=5, alpha=0.5), "alpha must be a number >= 1"),
])
def test_allocation_refuses_bad_input(options, message):
    with pytest.raises(PrunekitError, match=message):
        allocate(hand_built(), **{"rank": 1, **options})


def test_allocation_refuses_non_finite_sensitivities():
    sens = hand_built()
    sens["b"][1, 1] = float("nan")
    with pytest.raises(PrunekitError, match="'b' holds NaN"):
        allocate(sens, 5, rank=1)


# -- sensitivity: accumulated squared gradients

@pytest.mark.parametrize("per_sample", [True, False])
def test_sensitivity_accumulates_squared_gradients_per_sample_or_per_batch(per_sample):
    model = tiny("llama")
    data = batches(2, size=2)
    reference = copy.deepcopy(model)
    modules = targets(reference)
    weights = [m.weight for m in modules.values()]
    expected = [torch.zeros_like(w) for w in weights]
    for batch in data:
        pieces = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(2)] if per_sample else [batch]
        for piece in pieces:
            grads = torch.autograd.grad(reference(**piece).loss, weights)
            for e, g in zip(expected, grads):
                e += g ** 2
    requires = [p.requires_grad for p in model.parameters()]
    got = sensitivity(model, targets(model), data, per_sample=per_sample, progress=False)
    assert list(got) == list(modules)
    for (name, s), e in zip(got.items(), expected):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-12, msg=name)
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(p.grad is None for p in model.parameters())


def test_pruned_entries_have_no_sensitivity():
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude")
    masks = prunekit.masks(model)
    got = sensitivity(model, targets(model), batches(1), progress=False)
    for name, s in got.items():
        assert (s[~masks[name]] == -INF).all() and (s[masks[name]] >= 0).all(), name


def test_loss_fn_gives_the_loss_of_models_without_one():
    model = tiny("vit")
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}]

    def loss_fn(outputs, batch):  # a loss the model does not compute
        return outputs.logits[:, 1].square().sum()

    reference = copy.deepcopy(model)
    modules = targets(reference)
    expected = [torch.zeros_like(m.weight) for m in modules.values()]
    for i in range(2):
        grads = torch.autograd.grad(loss_fn(reference(pixel_values=data[0]["pixel_values"][i:i + 1]), None),
                                    [m.weight for m in modules.values()])
        for e, gr in zip(expected, grads):
            e += gr ** 2
    got = sensitivity(model, targets(model), data, loss_fn=loss_fn, progress=False)
    for s, e in zip(got.values(), expected):
        torch.testing.assert_close(s, e, rtol=1e-5, atol=1e-12)


# -- prepare, training, deltas

def test_prepare_trains_exactly_the_allocation():
    model = tiny("llama")
    data = batches(2)
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)
    scores = sensitivity(reference, targets(reference), data, progress=False)
    expected = allocate(scores, 1500, rank=2, alpha=10.0)
    assert expected.lora and expected.sparse  # both kinds occur at this budget
    tuned = prepare(model, "spt", batches=data, budget=1500, rank=2, progress=False)
    assert tuned.allocation.lora == expected.lora
    assert sorted(tuned.lora) == sorted(expected.lora)
    assert {n: selection(m.weight).indices.tolist() for n, m in tuned.layers.items()} == \
        {n: v.tolist() for n, v in expected.sparse.items()}
    shapes = {n: m.weight.shape for n, m in targets(tiny("llama")).items()}
    lora = sum(2 * (shapes[n][0] + shapes[n][1]) for n in expected.lora)
    sparse = sum(v.numel() for v in expected.sparse.values())
    assert lora_params(tuned) == lora
    assert tuned.trainable_count() == lora + sparse == expected.count <= 1500
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}.default.weight" for n in expected.lora for ab in "AB"} | \
        {f"{n}.weight" for n in expected.sparse}

    optimizer = tuned.optimizer(lr=1e-2)
    assert optimizer.param_groups[0]["params"] == tuned.trainable()
    train(model, optimizer, 2)
    assert state_size(optimizer) == 2 * (lora + sparse)
    state = {n.replace(".base_layer", ""): v for n, v in model.state_dict().items() if "lora_" not in n}
    assert set(state) == set(before)
    for name, value in state.items():
        changed = (value != before[name]).view(-1)
        owner = name.removesuffix(".weight")
        if owner in expected.sparse:
            allowed = torch.zeros_like(changed)
            allowed[expected.sparse[owner]] = True
            assert changed.any() and not (changed & ~allowed).any(), name
        else:
            assert not changed.any(), name  # LoRA'd weights change only through their factors


def test_default_budget_is_a_rank_r_lora_over_the_targets():
    model = tiny("llama")
    shapes = [m.weight.shape for m in targets(model).values()]
    budget = sum(4 * (o + i) for o, i in shapes)
    tuned = prepare(model, "spt", batches=batches(1), rank=4, progress=False)
    count = tuned.trainable_count()
    # the cap holds, and the next sensitive entry would have broken it: at most one LoRA switch short of it
    largest_jump = max(4 * (o + i) - math.ceil(4 * (o + i) / 10) + 1 for o, i in shapes)
    assert budget - largest_jump < count <= budget
    assert tuned.options()["used"] == count


def test_pruned_entries_are_never_selected_and_stay_zero(tmp_path):
    base = tiny("llama")
    prunekit.prune(base, 0.5, importance="magnitude")
    masks = {n: m.clone() for n, m in prunekit.masks(base).items()}
    model = copy.deepcopy(base)
    tuned = prepare(model, "spt", batches=batches(2), rank=2, budget=1200, progress=False)
    assert tuned.lora and tuned.layers
    for name, module in tuned.layers.items():
        assert masks[name].view(-1)[selection(module.weight).indices].all(), name
    train(model, tuned.optimizer(lr=0.05), 3)
    for name, module in tuned.layers.items():
        assert not module.weight[~masks[name]].any(), name
    for name, layer in tuned.lora.items():
        assert not layer.get_base_layer().weight[~masks[name]].any(), name
    # the LoRA'd layers compute with pruned entries at zero: the trained model equals a pruned base plus deltas
    load_deltas(base, save_deltas(tuned, tmp_path / "spt"))
    for name, keep in masks.items():
        assert not dict(base.named_modules())[name].weight[~keep].any(), name
    ids = batches(1, seed=99)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2: Conv1D layers, weights stored [in, out]
def test_saved_deltas_reproduce_the_trained_model_on_a_fresh_base(tmp_path, family):
    base = tiny(family)
    model = copy.deepcopy(base)
    tuned = prepare(model, "spt", batches=batches(2), rank=2, budget=1200, progress=False)
    assert tuned.lora and tuned.layers
    train(model, tuned.optimizer(lr=0.05), 3)
    meta = load_deltas(base, save_deltas(tuned, tmp_path / "spt"))
    assert meta["method"] == "spt"
    ids = batches(1, seed=99)[0]["input_ids"]
    with torch.no_grad():
        trained, reloaded = model(ids).logits, base(ids).logits
    assert not torch.allclose(trained, tiny(family)(ids).logits, atol=1e-4)  # training did change the model
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_peft_itself_loads_the_lora_part_of_the_saved_deltas(tmp_path, family):
    """The structured matrices' LoRA is saved as a peft adapter: PeftModel.from_pretrained puts the trained
    adapters (and only them) on a fresh base, each with the trained layer's delta B·A · scale."""
    base = tiny(family)
    model = copy.deepcopy(base)
    tuned = prepare(model, "spt", batches=batches(2), rank=2, budget=1200, progress=False)
    train(model, tuned.optimizer(lr=0.05), 3)
    by_peft = peft.PeftModel.from_pretrained(base, str(save_deltas(tuned, tmp_path / "spt")))
    loaded = {base_name(n): layer for n, layer in lora_layers(by_peft).items()}
    assert sorted(loaded) == sorted(tuned.lora) and tuned.layers  # the sparse matrices are not peft's
    for name, layer in tuned.lora.items():
        torch.testing.assert_close(loaded[name].get_delta_weight("default"), layer.get_delta_weight("default"))
        assert loaded[name].get_delta_weight("default").abs().sum() > 0, name


def test_vit_classifier_trains_and_reloads(tmp_path):
    base = tiny("vit")
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=g), "labels": torch.tensor([1, 3])}
            for _ in range(2)]
    tuned = prepare(model, "spt", batches=data, rank=2, budget=1000, progress=False)
    assert tuned.lora or tuned.layers
    assert 0 < tuned.trainable_count() <= 1000
    optimizer = tuned.optimizer(lr=0.05)
    for batch in data:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    load_deltas(base, save_deltas(tuned, tmp_path / "vit"))
    with torch.no_grad():
        torch.testing.assert_close(base(data[0]["pixel_values"]).logits, model(data[0]["pixel_values"]).logits,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options,error,message", [
    (dict(method="tps"), PrunekitError, "unknown tuning method 'tps'"),
    (dict(method="spt", ranks=4), PrunekitError, "bad options for tuning method 'spt'"),
    (dict(method="spt", rank=0), PrunekitError, "rank must be an integer >= 1"),
    (dict(method="spt", budget=-3), PrunekitError, "budget must be an integer >= 1"),
    (dict(method="spt", alpha=0.5), PrunekitError, "alpha must be a number >= 1"),
    (dict(method="spt", per_sample="yes"), PrunekitError, "per_sample must be True or False"),
    (dict(method="spt", dropout=1.5), PrunekitError, r"dropout must be a number in \[0, 1\)"),
    (dict(method="spt", loss_fn="mse"), PrunekitError, "loss_fn must be a function"),
    (dict(method="spt", batches=None), PrunekitError, "SPT needs batches"),
    (dict(method="spt", batches=[torch.zeros(2, 3)]), PrunekitError, "batch 0 is a Tensor"),
    (dict(method="spt", budget=10 ** 6), PrunekitError,
     "budget 1,000,000 is more than the 18,432 unpruned weights of the 14 targeted layers of LlamaForCausalLM; "
     "pass budget <= 18,432"),
    (dict(method="spt", rank=32), PrunekitError,
     r"default budget 32,768 \(a rank-32 LoRA's parameter count over these layers\) is more than the 18,432"),
    (dict(method="spt", include="nothing_matches"), TargetError, "no Linear or Conv1D layer"),
    (dict(method="spt", batches=[{"input_ids": torch.zeros(2, 5, dtype=torch.long)}]), PrunekitError,
     "returned no .loss; put labels in the batches, or pass loss_fn"),
])
def test_bad_input_fails_before_the_model_changes(options, error, message):
    model = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    options.setdefault("batches", batches(1))
    with pytest.raises(error, match=message):
        prepare(model, **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_a_model_without_linear_layers_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(TargetError, match="Sequential has no Linear or Conv1D layer"):
        prepare(model, "spt", batches=[{"input": torch.zeros(1, 3, 8, 8)}])
    assert all(p.requires_grad for p in model.parameters())
