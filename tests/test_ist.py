"""IST: layer draws against exact probabilities, suppression against losses recomputed by hand, masks, deltas,
a Trainer, and inputs that must fail before the model changes."""
import copy
import itertools
import math

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import prunekit
import prunekit.tuning.ist  # noqa: F401  (registers "ist")
from conftest import VOCAB, tiny
from prunekit import PrunekitError, TargetError
from prunekit.tuning import load_deltas, prepare, save_deltas
from prunekit.tuning.ist import draw

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(seed=0, n=2, length=10):
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def deep_llama(layers=4):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                              intermediate_size=64, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=2)).eval()


def randomise_adapters(tuned, seed=5, blocks=None):
    """Nonzero B (peft starts it at zero), so that every adapter changes its layer's output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, layers in enumerate(tuned.blocks):
            if blocks is not None and i not in blocks:
                continue
            for layer in layers:
                for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                    w.copy_(torch.randn(w.shape, generator=g))


def pair_probability(w, i, j):
    """P(the set {i, j}) for two draws without replacement, each ∝ w among the layers left."""
    return float(w[i] * w[j] / (1 - w[i]) + w[j] * w[i] / (1 - w[j]))


def test_the_layers_drawn_for_training_follow_sigmoid_of_minus_the_scores():
    tuned = prepare(deep_llama(), "ist", rank=1, update=0.5)
    assert len(tuned.blocks) == 4 and tuned.count(tuned.update) == 2
    tuned.scores = torch.tensor([-2.0, 0.0, 1.0, 3.0])  # lower score = more important = drawn more often
    n = 20000
    counts = {}
    for _ in range(n):
        pair = tuple(tuned.sample())
        counts[pair] = counts.get(pair, 0) + 1
    w = torch.sigmoid(-tuned.scores).double()
    w = w / w.sum()
    for i, j in itertools.combinations(range(4), 2):
        p = pair_probability(w, i, j)
        assert abs(counts.get((i, j), 0) / n - p) < 4 * math.sqrt(p * (1 - p) / n), (i, j, counts)
    assert sum(counts.values()) == n  # never the same layer twice
    # suppression draws the other way: ∝ sigmoid(+I)
    g = torch.Generator().manual_seed(0)
    last = sum(draw(tuned.scores, 1, g, important=False) == [3] for _ in range(4000)) / 4000
    w_sup = torch.sigmoid(tuned.scores) / torch.sigmoid(tuned.scores).sum()
    assert abs(last - float(w_sup[3])) < 4 * math.sqrt(float(w_sup[3] * (1 - w_sup[3])) / 4000)


def test_each_step_trains_only_the_drawn_layers_and_the_others_keep_their_moments():
    model = deep_llama()  # left in eval mode, as a careless loop would: the batch is still captured
    tuned = prepare(model, "ist", rank=2, update=0.5, interval=1000)
    optimizer = tuned.optimizer(lr=0.05)
    for step in range(3):
        active = list(tuned.active)
        assert len(active) == 2
        before = [[p.detach().clone() for p in tuned._params(layers)] for layers in tuned.blocks]
        moments = {id(p): optimizer.state[p]["exp_avg"].clone() for p in tuned.trainable() if p in optimizer.state}
        data = batch(step)
        model(**data).loss.backward()
        for i, layers in enumerate(tuned.blocks):  # no gradient at all for the adapters of layers not drawn
            assert all((p.grad is not None) == (i in active) for p in tuned._params(layers)), (step, i)
        optimizer.step()
        optimizer.zero_grad()
        for i, layers in enumerate(tuned.blocks):
            params = tuned._params(layers)
            moved = [not torch.equal(p, q) for p, q in zip(params, before[i])]
            assert any(moved) == (i in active), (step, i, active)
            if i not in active:
                assert all(torch.equal(optimizer.state[p]["exp_avg"], moments[id(p)]) for p in params
                           if id(p) in moments)
        assert torch.equal(tuned._batch[1]["input_ids"], data["input_ids"])  # the latest training batch
    frozen = {n for n, p in model.named_parameters() if "lora_" not in n}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert tuned.trainable_count() == sum(2 * (m.in_features + m.out_features) for m in
                                          (layer.get_base_layer() for layer in tuned.layers.values()))


def test_a_score_update_is_the_reinforce_step_on_losses_recomputed_with_scaled_adapters():
    model = deep_llama()
    tuned = prepare(model, "ist", rank=2, seed=0)  # seed 0: plain draws would suppress {2, 3} twice
    randomise_adapters(tuned)
    tuned.scores = torch.tensor([0.5, -0.5, 1.0, 0.0])
    start = tuned.scores.clone()
    scaling = [dict(layer.scaling) for layer in tuned.layers.values()]
    reference = copy.deepcopy(model)
    data = batch(7, n=4, length=16)
    tuned._batch = ((), data)
    tuned.update_scores()
    rounds = tuned.history
    assert len(rounds) == 3 and all(len(picked) == 2 for picked, _ in rounds)
    assert len({tuple(picked) for picked, _ in rounds}) == 3  # the rounds suppress different sets
    rewards = []
    for picked, loss in rounds:  # by hand: λ·B in the suppressed layers' adapters is the same function
        suppressed = copy.deepcopy(reference)
        with torch.no_grad():
            for i in picked:
                prefix = f"model.layers.{i}."
                for name, p in suppressed.named_parameters():
                    if name.startswith(prefix) and "lora_B" in name:
                        p.mul_(0.25)
            expected = float(suppressed(**data).loss)
        assert abs(loss - expected) < 1e-5, (picked, loss, expected)
        rewards.append(math.exp(-expected))
    mean = sum(rewards) / 3
    p = torch.sigmoid(start).double()
    want = start.double().clone()
    for (picked, _), reward in zip(rounds, rewards):
        for i in picked:
            want[i] += 10 * (reward - mean) * p[i] * (1 - p[i])
    torch.testing.assert_close(tuned.scores.double(), want, atol=1e-6, rtol=0)
    assert [dict(layer.scaling) for layer in tuned.layers.values()] == scaling  # restored exactly
    with torch.no_grad():
        torch.testing.assert_close(model(**data).logits, reference(**data).logits)


def test_more_rounds_than_distinct_sets_still_ends_and_uses_every_set():
    model = tiny("llama")  # 2 blocks: suppressing 1 of them leaves 2 possible sets for 5 rounds
    tuned = prepare(model, "ist", rank=1, rounds=5)
    randomise_adapters(tuned)
    tuned._batch = ((), batch(3))
    tuned.update_scores()
    picked = [tuple(p) for p, _ in tuned.history]
    assert len(picked) == 5 and set(picked[:2]) == {(0,), (1,)}
    assert tuned.count(tuned.update) == 1  # int(0.25 * 2) = 0 layers would train nothing


def test_given_batches_are_used_in_turn_with_a_loss_function():
    model = deep_llama()
    first, second = ({"input_ids": batch(s)["input_ids"]} for s in (1, 2))  # no labels: loss_fn gives the loss
    tuned = prepare(model, "ist", rank=2, batches=[first, second], loss_fn=lambda out, b: out.logits.std())
    with torch.no_grad():  # adapters start at B = 0: suppressing them leaves the function as it is
        expected = [float(model(**b).logits.std()) for b in (first, second, first)]
    for want in expected:
        tuned.update_scores()
        assert len(tuned.history) == 3 and all(abs(loss - want) < 1e-6 for _, loss in tuned.history)
    torch.testing.assert_close(tuned.scores, torch.zeros(4))  # equal rewards: nothing to learn


def test_suppression_lowers_the_score_of_the_layer_that_matters():
    """Layer 0's adapters carry a large change its base weights lack; every other adapter is zero. Suppressing
    layer 0 costs loss, suppressing the others costs nothing: layer 0 must become the most important (lowest)."""
    model = deep_llama()
    tuned = prepare(model, "ist", rank=2, seed=1)
    randomise_adapters(tuned, blocks=[0])
    with torch.no_grad():
        for layer in tuned.blocks[0]:
            layer.get_base_layer().weight.sub_(layer.get_delta_weight("default"))  # the adapter restores the base
    data = batch(7, n=4, length=16)
    tuned._batch = ((), data)
    for _ in range(15):
        tuned.update_scores()
    # rewards are exp(-loss), small at a random model's loss, so the scores move little; the order is what counts
    assert int(tuned.scores.argmin()) == 0 and tuned.scores[0] < 0 and tuned.scores[0] < 2 * tuned.scores[1:].min()
    w = torch.sigmoid(-tuned.scores)
    assert w[0] / w.sum() > 0.25  # and so it is drawn for training more often than the others


def test_pruned_entries_stay_zero_and_deltas_reload_to_the_same_logits(tmp_path):
    model = deep_llama()
    prunekit.prune(model, 0.5, importance="magnitude")
    masks = {n: m.clone() for n, m in prunekit.masks(model).items()}
    fresh = copy.deepcopy(model)
    tuned = prepare(model, "ist", rank=2, interval=2)
    optimizer = tuned.optimizer(lr=0.05)
    model.train()
    for step in range(5):
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert tuned.steps == 5 and len(tuned.history) == 3 and tuned.scores.abs().sum() > 0  # updated at steps 2, 4
    model.eval()
    with torch.no_grad():
        adapted = model(**batch(9)).logits
    meta = load_deltas(fresh, save_deltas(tuned, tmp_path / "ist"))
    assert meta["method"] == "ist"
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch(9)).logits, adapted, atol=1e-5, rtol=1e-5)
    for name, module in fresh.named_modules():
        if name in masks:
            assert not module.weight[~masks[name]].any(), name
    for name, layer in tuned.layers.items():  # the adapted layer itself: W + masked delta is zero where pruned
        layer.merge()
        assert not layer.get_base_layer().weight[~masks[name]].any(), name


def test_existing_peft_dora_adapters_are_used_a_trainer_runs_ist_through_its_callback_and_deltas_reload(tmp_path):
    model = peft.get_peft_model(deep_llama(), peft.LoraConfig(r=2, use_dora=True, target_modules=["v_proj",
                                                                                                  "down_proj"]))
    tuned = prepare(model, "ist", update=0.25, interval=1)
    assert len(tuned.layers) == 8 and all(len(layers) == 2 for layers in tuned.blocks)
    data = [{k: v[0] for k, v in batch(i, n=1).items()} for i in range(4)]
    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                report_to=[], use_cpu=True, max_grad_norm=0, save_strategy="no",
                                disable_tqdm=True, learning_rate=0.01)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[tuned.callback()])
    trainer.train()
    assert tuned.steps == 2 and tuned.scores.abs().sum() > 0  # scores updated after steps 1 and 2
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in tuned.trainable()}  # the Trainer's optimizer holds every adapter
    assert any("magnitude" in n for n, p in model.named_parameters() if id(p) in held)
    model.eval()
    fresh = deep_llama()
    load_deltas(fresh, save_deltas(tuned, tmp_path / "dora"))
    ids = batch(9)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prune", [False, True])
def test_peft_itself_loads_the_saved_adapter_to_the_logits_of_prunekits_loaded_model(tmp_path, prune):
    """The LoRA part of deltas is a peft adapter folder: PeftModel.from_pretrained reads it as it is (over a pruned
    base, with protect() keeping the pruned entries out of B·A) and computes what load_deltas' merged model does."""
    model = deep_llama()
    if prune:
        prunekit.prune(model, 0.5, importance="magnitude")
    fresh = copy.deepcopy(model)
    tuned = prepare(model, "ist", rank=2, interval=2)
    randomise_adapters(tuned)  # every adapter nonzero, trained or not
    optimizer = tuned.optimizer(lr=0.05)
    for step in range(3):
        model(**batch(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_deltas(tuned, tmp_path / "ist")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in path.iterdir()}
    by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(fresh), str(path))
    if prune:
        prunekit.tuning.lowrank.protect(prunekit.tuning.lowrank.lora_layers(by_peft))
    ids = batch(9)["input_ids"]
    with torch.no_grad():
        base = fresh(input_ids=ids).logits
    load_deltas(fresh, path)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert not torch.allclose(expected, base, atol=1e-3)  # the adapters do change the model
        torch.testing.assert_close(by_peft(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def _pruned():
    model = deep_llama()
    prunekit.prune(model, 0.5, importance="magnitude")
    return model


def _pruned_dora():
    return peft.get_peft_model(_pruned(), peft.LoraConfig(r=2, use_dora=True, target_modules=["v_proj"]))


@pytest.mark.parametrize("build,options,error,message", [
    (deep_llama, dict(nonsense=1), PrunekitError, "bad options for tuning method 'ist'"),
    (deep_llama, dict(update=0.0), PrunekitError, r"update is a fraction of the layers in \(0, 1\] \(0.25 trains"),
    (deep_llama, dict(suppress=2), PrunekitError, r"suppress is a fraction of the layers in \(0, 1\]"),
    (deep_llama, dict(factor=1.5), PrunekitError, r"factor \(λ, the scale of the suppressed adapters\) must be in "),
    (deep_llama, dict(interval=0), PrunekitError, r"interval must be an integer >= 1 \(steps between"),
    (deep_llama, dict(rounds=1.5), PrunekitError, "rounds must be an integer >= 1"),
    (deep_llama, dict(rank=0), PrunekitError, "rank must be an integer >= 1"),
    (deep_llama, dict(score_lr=-1), PrunekitError, "score_lr .* must be a positive number"),
    (deep_llama, dict(loss_fn="ce"), PrunekitError, r"loss_fn must be a function \(outputs, batch\)"),
    (deep_llama, dict(batches=batch()), PrunekitError, "wrap a single batch in a list"),
    (deep_llama, dict(rank=None), PrunekitError,
     r"looked for peft LoRA/DoRA layers \(peft.tuners.lora.Linear\) in LlamaForCausalLM and found none: pass rank"),
    (deep_llama, dict(include="nothing_matches"), TargetError, "no Linear or Conv1D layer matching"),
    (deep_llama, dict(include="lm_head"), PrunekitError, "is inside its blocks, so IST would have no layer"),
    (OneLayer, dict(), PrunekitError, "looked for a ModuleList or Sequential of >= 2 same-class blocks"),
    (_pruned, dict(dora=True), PrunekitError, "is pruned; DoRA normalises each column"),
    (_pruned_dora, dict(rank=None), PrunekitError, "is pruned and its adapter 'default' is DoRA"),
    (lambda: peft.get_peft_model(deep_llama(), peft.LoraConfig(r=2)), dict(), PrunekitError,
     r"already has peft LoRA layers \(8\), which IST schedules as they are; rank would be ignored"),
])
def test_bad_input_fails_before_the_model_changes(build, options, error, message):
    model = build()
    before = copy.deepcopy(model.state_dict())
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    variants = {n: dict(m.lora_variant) for n, m in model.named_modules() if hasattr(m, "lora_variant")}
    with pytest.raises(error, match=message):
        prepare(model, "ist", **{"rank": 2, **options})
    assert model.state_dict().keys() == before.keys()  # no adapter was injected
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: dict(m.lora_variant) for n, m in model.named_modules() if hasattr(m, "lora_variant")} == variants
    assert not model._forward_pre_hooks
