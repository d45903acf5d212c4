"""Masked LoRA over pruned layers (prunekit.tuning.lowrank) against explicit dense references."""
import copy

import pytest
import torch
import transformers as tf

import prunekit
from conftest import VOCAB, calibration_for, tiny
from prunekit import PrunekitError
from prunekit.tuning.lowrank import _MaskedProduct, inject, lora_layers, merge_adapter, save_adapter


def saved(model, layers, path):
    """The adapter saved in peft's format, as save_deltas saves a method's LoRA layers."""
    save_adapter(model, layers, "default", path)
    return path


def pruned_llama():
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude")
    return model


def train(model, steps=3):
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=0.05)
    for i in range(steps):
        ids = calibration_for("llama", n=2, length=10, seed=i)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_masked_product_gradients_equal_autograd_through_the_explicit_masked_matrix():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.double, requires_grad=True)
    keep = (torch.rand(5, 6) > 0.5).double()
    out = _MaskedProduct.apply(x, a, b, keep, 0.7)
    reference = x @ (0.7 * (b @ a) * keep).mT
    torch.testing.assert_close(out, reference)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, a, b), grad)
    expected = torch.autograd.grad(reference, (x, a, b), grad)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)


def test_adapted_forward_saves_no_new_dense_matrix_per_pruned_layer():
    """What autograd keeps for backward from an adapted pruned layer: the input, the factors, and the weight and
    mask already resident; no new [out, in] matrix (the masked product, or a float copy of the mask) per layer."""
    model = pruned_llama()
    layers = inject(model, list(prunekit.masks(model)), rank=4)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        base.weight.requires_grad_(False)
        resident = {base.weight.data_ptr(), base.prune_mask.data_ptr()}
        saved = []
        x = torch.randn(2, 3, base.in_features, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer(x).sum().backward()
        new = [t for t in saved if t.numel() == base.weight.numel() and t.data_ptr() not in resident]
        assert not new, f"{name}: saved {[(tuple(t.shape), t.dtype) for t in new]}"
        assert base.prune_mask.data_ptr() in {t.data_ptr() for t in saved}, name  # the mask is used, not a copy


def test_adapters_over_pruned_layers_compute_and_merge_with_pruned_entries_zero():
    model = pruned_llama()
    names = list(prunekit.masks(model))
    layers = inject(model, names, rank=4)
    assert set(layers) == set(names)
    train(model)
    ids = calibration_for("llama", n=2, length=10, seed=9)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        for name, layer in layers.items():
            base = layer.get_base_layer()
            effective = base.weight + layer.get_delta_weight("default") * base.prune_mask
            x = torch.randn(3, base.in_features)
            torch.testing.assert_close(layer(x), x @ effective.T, atol=1e-5, rtol=1e-5)
            assert layer.get_delta_weight("default")[~base.prune_mask].abs().sum() > 0  # the mask matters here
            layer.merge()
            assert not base.weight[~base.prune_mask].any(), name
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_saved_lora_deltas_reload_onto_a_fresh_pruned_base_to_the_same_logits(tmp_path):
    model = pruned_llama()
    fresh = copy.deepcopy(model)
    layers = inject(model, list(prunekit.masks(model)), rank=4)
    train(model)
    ids = calibration_for("llama", n=2, length=10, seed=9)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merge_adapter(fresh, saved(model, layers, tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    for name, keep in prunekit.masks(fresh).items():
        assert not dict(fresh.named_modules())[name].weight[~keep].any()


def test_gpt2_conv1d_adapters_save_in_the_base_weights_orientation(tmp_path):
    model = tiny("gpt2")
    fresh = copy.deepcopy(model)
    layers = inject(model, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"], rank=2)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: make the delta visible
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merge_adapter(fresh, saved(model, layers, tmp_path))
        torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)


def test_dora_full_change_reloads_and_dora_over_pruned_layers_is_refused(tmp_path):
    model = tiny("llama")
    fresh = copy.deepcopy(model)
    layers = inject(model, ["model.layers.0.self_attn.v_proj"], rank=2, dora=True)
    torch.nn.init.normal_(layers["model.layers.0.self_attn.v_proj"].lora_B["default"].weight)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merge_adapter(fresh, saved(model, layers, tmp_path))
        torch.testing.assert_close(fresh(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(PrunekitError, match="DoRA"):
        inject(pruned_llama(), ["model.layers.0.self_attn.v_proj"], rank=2, dora=True)


def test_inject_refuses_what_is_not_a_linear_layer():
    model = tiny("llama")
    with pytest.raises(PrunekitError, match="model.layers.0.input_layernorm"):
        inject(model, ["model.layers.0.input_layernorm"], rank=2)
    with pytest.raises(PrunekitError, match="rank"):
        inject(model, ["model.layers.0.self_attn.v_proj"], rank=0)
    assert not lora_layers(model)  # nothing changed


def test_one_inject_call_takes_linear_and_gpt2_conv1d_layers_each_with_its_orientation():
    model = tiny("gpt2")
    layers = inject(model, ["transformer.h.0.mlp.c_fc", "lm_head"], rank=2)
    assert {n: layer.fan_in_fan_out for n, layer in layers.items()} == {"transformer.h.0.mlp.c_fc": True,
                                                                        "lm_head": False}
    x = torch.randn(3, 32)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        delta = layer.get_delta_weight("default")  # in the base weight's layout: Conv1D's is [in, out]
        with torch.no_grad():
            expected = layer.get_base_layer()(x) + x @ (delta if layer.fan_in_fan_out else delta.T)
            torch.testing.assert_close(layer(x), expected)


def test_an_adapter_that_does_not_fit_is_refused_before_anything_changes(tmp_path):
    model = tiny("llama")
    layers = inject(model, ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"], rank=2)
    saved(model, layers, tmp_path)
    torch.manual_seed(0)
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    gpt2 = tiny("gpt2")
    for target, message in ((other, r"holds base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight of "
                                     r"shape \(2, 32\), which does not fit 'model.layers.0.self_attn.v_proj' \(8 "
                                     r"outputs, 16 inputs\) here; a different base model\?"),
                            (gpt2, "changes 'model.layers.0.self_attn.v_proj', which is not a Linear or Conv1D "
                                   "layer of GPT2LMHeadModel")):
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(PrunekitError, match=message):
            merge_adapter(target, tmp_path)
        assert target.state_dict().keys() == before.keys() and not lora_layers(target)
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
