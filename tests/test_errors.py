"""Bad input fails with a message that says what is wrong, before any weight changes."""
import re

import pytest
import torch
from torch import nn

import prunekit
from conftest import VOCAB, calibration_for, tiny
from prunekit import BudgetError, CalibrationError, PrunekitError, TargetError
from prunekit.allocation import ALLOCATORS
from prunekit.importance import ESTIMATORS
from prunekit.importance.wanda import Wanda


def untouched(model, fn, error=PrunekitError):
    """Runs fn (which must raise `error`) and checks the model kept every weight and got no mask."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        fn()
    assert prunekit.masks(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return str(info.value)


@pytest.fixture
def model():
    return tiny("llama")


@pytest.fixture
def windows():
    return calibration_for("llama")


@pytest.mark.parametrize("budget", [0, 1, 1.2, -0.5, "3:2", "nonsense"])
def test_budget_outside_the_unit_interval(model, windows, budget):
    untouched(model, lambda: prunekit.prune(model, budget, calibration=windows), BudgetError)


def test_nm_that_does_not_divide_the_input(windows):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    msg = untouched(model, lambda: prunekit.prune(model, "2:4", importance="magnitude"))
    assert "multiple of 4" in msg and "0 has 6 inputs" in msg


def test_nm_with_a_non_uniform_allocator(model, windows):
    msg = untouched(model, lambda: prunekit.prune(model, "2:4", allocator="owl", calibration=windows))
    assert "allocator='uniform'" in msg


@pytest.mark.parametrize("kind,name", [("importance", "wandaa"), ("allocator", "owl2")])
def test_unknown_names_list_the_known_ones(model, windows, kind, name):
    msg = untouched(model, lambda: prunekit.prune(model, 0.5, calibration=windows, **{kind: name}))
    assert f"unknown {kind} {name!r}" in msg
    registry = ESTIMATORS if kind == "importance" else ALLOCATORS
    assert msg.endswith("known: " + ", ".join(registry.names()))
    assert {"magnitude", "sparsegpt", "wanda"} <= set(ESTIMATORS.names()) and {"owl", "uniform"} <= set(ALLOCATORS.names())


def test_a_model_with_nothing_to_prune():
    model = nn.Sequential(nn.ReLU(), nn.Tanh())
    msg = untouched(model, lambda: prunekit.prune(model, 0.5, importance="magnitude"), TargetError)
    assert "no Linear or Conv1D layer" in msg


def test_include_that_matches_nothing(model):
    msg = untouched(model, lambda: prunekit.prune(model, prunekit.Budget(sparsity=0.5, include="nope"),
                                                  importance="magnitude"))
    assert "include='nope'" in msg


def test_methods_that_need_data_say_so(model):
    msg = untouched(model, lambda: prunekit.prune(model, 0.5, importance="wanda"))
    assert "importance 'wanda'" in msg and "need calibration data" in msg
    msg = untouched(model, lambda: prunekit.prune(model, 0.5, importance="magnitude", allocator="owl"))
    assert "allocator 'owl'" in msg


@pytest.mark.parametrize("calibration,match", [
    (torch.rand(4, 16), "token ids \\(torch.long\\)"),
    (torch.randint(0, VOCAB, (64,)), "shape \\[N, L\\]"),
    (torch.randint(0, VOCAB, (0, 8)), "empty"),
    ([], "empty"),
    (torch.full((2, 8), VOCAB + 5), "vocabulary has 128 entries"),
    ([{"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 7)}], "does not match"),
    ([{"input_ids": "hello world"}], "not a tensor"),
    ("some text", "must be a LongTensor"),
])
def test_bad_calibration(model, calibration, match):
    msg = untouched(model, lambda: prunekit.prune(model, 0.5, calibration=calibration), CalibrationError)
    assert re.search(match, msg), msg


def test_nan_in_calibration_inputs():
    model = tiny("vit")
    pixels = torch.randn(4, 3, 16, 16)
    pixels[1, 0, 2, 3] = float("nan")
    msg = untouched(model, lambda: prunekit.prune(model, 0.5, calibration=[{"pixel_values": pixels}]))
    assert "NaN or Inf" in msg


def test_nan_in_weights(model, windows):
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    msg = untouched(model, lambda: prunekit.prune(model, 0.5, calibration=windows))
    assert "model.layers.1.mlp.up_proj.weight holds NaN or Inf" in msg


def test_pruning_twice_is_refused(model, windows):
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    with pytest.raises(TargetError, match="already pruned"):
        prunekit.prune(model, 0.6, importance="magnitude", progress=False)


def test_options_need_a_name():
    with pytest.raises(PrunekitError, match="bad options for importance 'sparsegpt'"):
        prunekit.importance.ESTIMATORS.create("sparsegpt", blocks=3)


def test_a_failure_part_way_rolls_the_model_back(model, windows):
    class FailsOnThirdLayer(Wanda):
        calls = 0

        def prune(self, *args):
            FailsOnThirdLayer.calls += 1
            if FailsOnThirdLayer.calls == 3:
                raise KeyboardInterrupt
            return super().prune(*args)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(model, 0.5, importance=FailsOnThirdLayer(), calibration=windows, progress=False)
    assert FailsOnThirdLayer.calls == 3 and prunekit.masks(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training is False  # the fixture's eval mode is back too


def test_budget_error_type_is_specific():
    with pytest.raises(BudgetError):
        prunekit.Budget(sparsity=2)


def test_a_one_layer_decoder_keeps_its_lm_head_out_of_the_default_targets():
    """Issue 26: with one decoder layer there was no container of two blocks, so the whole model (lm_head
    included) became the default targets, against the README."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = tf.LlamaForCausalLM(config)
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    names = set(prunekit.masks(model))
    assert "lm_head" not in names and len(names) == 7 and all(n.startswith("model.layers.0.") for n in names)


@pytest.mark.parametrize("importance", [3, "wanda ", object()])  # None is the default: see test_admm.py
def test_an_importance_that_is_not_one_is_a_clear_error(importance):
    model = tiny("llama")
    with pytest.raises(PrunekitError, match="unknown importance|must be a name"):
        prunekit.prune(model, 0.5, importance=importance, calibration=calibration_for("llama"), progress=False)
    with pytest.raises(PrunekitError, match="must be a name .* or an instance of Allocator, got 0.5"):
        prunekit.prune(model, 0.5, allocator=0.5, calibration=calibration_for("llama"), progress=False)
    assert prunekit.masks(model) == {}


def test_windows_longer_than_learned_positions_are_refused_and_rotary_ones_warned():
    gpt2 = tiny("gpt2")  # 64 learned positions: longer windows were an IndexError deep in the embedding
    long = torch.randint(0, VOCAB, (4, 80))
    with pytest.raises(CalibrationError, match="windows of 80 tokens but the model takes at most 64 positions; cut"):
        prunekit.prune(gpt2, 0.5, importance="wanda", calibration=long, progress=False)
    llama = tiny("llama")
    limit = llama.config.max_position_embeddings
    with pytest.warns(UserWarning, match=f"at most {limit} positions; past them its rotary positions extrapolate"):
        prunekit.prune(llama, 0.5, importance="wanda", calibration=torch.randint(0, VOCAB, (2, limit + 8)),
                       progress=False)


def test_calibration_without_the_models_input_and_bad_labels_are_clear_errors():
    model = tiny("llama")
    x = calibration_for("llama")
    with pytest.raises(CalibrationError, match="batch 0 has no 'input_ids' \\(it holds \\['ids'\\]\\)"):
        prunekit.prune(model, 0.5, importance="wanda", calibration=[{"ids": x}], progress=False)
    with pytest.raises(CalibrationError, match=r"labels \(8, 15\) do not match input_ids \(8, 16\)"):
        prunekit.prune(model, 0.5, importance="fisher", calibration=[{"input_ids": x, "labels": x[:, 1:]}],
                       progress=False)
    labels = torch.where(x == x.max(), VOCAB + 5, x)  # one id past the vocabulary
    with pytest.raises(CalibrationError, match=f"labels span \\[\\d+, {VOCAB + 5}\\] but the vocabulary has {VOCAB}"):
        prunekit.prune(model, 0.5, importance="fisher", calibration=[{"input_ids": x, "labels": labels}],
                       progress=False)
    assert prunekit.masks(model) == {}


def test_a_structured_only_allocator_is_refused_before_any_measurement(monkeypatch):
    model = tiny("llama")
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(BudgetError, match="allocator 'global' ranks heads and channels"):
        prunekit.prune(model, 0.5, importance="wanda", allocator="global", calibration=calibration_for("llama"),
                       progress=False)
