"""prepare(): a model carries one fine-tuning method; anything else is refused before the model changes."""
import copy

import peft
import pytest
import torch

from conftest import VOCAB, tiny
from prunekit import PrunekitError
from prunekit.tuning import prepare
from prunekit.tuning.sparse import select


def options(method):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    return {"lift": dict(rank=1, filter_rank=2), "s2ft": dict(heads=0.5, channels=0.1), "ist": dict(rank=2),
            "spt": dict(batches=[{"input_ids": ids, "labels": ids}], rank=2, budget=1500, progress=False)}[method]


def snapshot(model):
    """Everything a method changes when it sets up: weights, what trains, modules, hooks."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [n for n, _ in model.named_modules()],
            {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()},
            sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()))


def same(a, b):
    return all(torch.equal(v, b[0][k]) for k, v in a[0].items()) and a[1:] == b[1:]


METHODS = ["lift", "s2ft", "ist", "spt"]


@pytest.mark.parametrize("second", METHODS)
@pytest.mark.parametrize("first", METHODS)
def test_a_prepared_model_refuses_a_second_method_and_stays_as_it_was(first, second):
    model = tiny("llama")
    prepare(model, first, **options(first))
    before = snapshot(model)
    with pytest.raises(PrunekitError, match=f"already prepared for {first} fine-tuning; to use {second}, prepare "
                                            f"it on a fresh copy of the base model"):
        prepare(model, second, **options(second))
    assert same(snapshot(model), before)
    with pytest.raises(PrunekitError, match="already prepared"):  # a deep copy carries the method too
        prepare(copy.deepcopy(model), second, **options(second))


@pytest.mark.parametrize("method", ["lift", "s2ft", "spt"])
def test_user_peft_adapters_are_refused_by_the_methods_that_set_up_their_own(method):
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    with pytest.raises(PrunekitError, match=r"has peft adapter layers \(.*q_proj.* and 3 more\); .*merge_and_unload"):
        prepare(model, method, **options(method))
    assert same(snapshot(model), before)


def test_ist_takes_the_users_peft_adapters():
    model = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    tuned = prepare(model, "ist")
    assert len(tuned.layers) == 4


@pytest.mark.parametrize("method", METHODS)
def test_weights_with_a_hand_made_selection_are_refused(method):
    model = tiny("llama")
    select(model.model.layers[0].mlp.down_proj.weight, torch.arange(5))
    before = snapshot(model)
    with pytest.raises(PrunekitError, match="train at selected entries"):
        prepare(model, method, **options(method))
    assert same(snapshot(model), before)
