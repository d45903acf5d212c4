"""LRP against hand computations, conservation of relevance, tiny HF models left as they were, and pruning."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import prunekit
from conftest import calibration_for, tiny
from prunekit.calibration import as_batches
from prunekit.errors import CalibrationError, PrunekitError
from prunekit.importance import ESTIMATORS
from prunekit.importance.lrp import LRP, Rule, explain, propagation
from prunekit.masks import BUFFER
from prunekit.targets import find_targets

# ------------------------------------------------------------------------------------- hand computations

def two_layers():
    first, second = nn.Linear(3, 4), nn.Linear(4, 2)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.0], [-1.5, 0.2, 0.4], [2.0, 1.0, 1.0]]))
        first.bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.5]))
        second.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25], [-0.75, 1.5, 0.5, 1.0]]))
        second.bias.copy_(torch.tensor([0.2, -0.1]))
    x = torch.tensor([[1.0, 0.5, -2.0], [-0.5, 1.5, 1.0]])
    labels = torch.tensor([0, 1])
    return nn.Sequential(first, nn.ReLU(), second), x, labels


def shares(a, weight, bias, rule):
    """[samples, out, in]: the share of output k's relevance that goes to input j, straight from the LRP
    formulas, one contribution a_j w_kj at a time."""
    contribution = a[:, None, :] * weight[None]
    if rule.name == "epsilon":
        z = contribution.sum(-1) + bias
        return contribution / (z + rule.epsilon * torch.where(z >= 0, 1.0, -1.0))[..., None]
    positive, negative = contribution.clamp(min=0), contribution.clamp(max=0)
    z_pos = positive.sum(-1) + bias.clamp(min=0) + rule.epsilon
    z_neg = negative.sum(-1) + bias.clamp(max=0) - rule.epsilon
    return rule.alpha * positive / z_pos[..., None] - rule.beta * negative / z_neg[..., None]


@pytest.mark.parametrize("rule", [Rule("epsilon", epsilon=0.1), Rule("alpha_beta", alpha=1.0),
                                  Rule("alpha_beta", alpha=2.0, epsilon=0.01)])
def test_two_layers_match_the_hand_computation(rule):
    model, x, labels = two_layers()
    first, second = model[0], model[2]
    hidden = (x @ first.weight.T + first.bias).relu().detach()
    logits = (hidden @ second.weight.T + second.bias).detach()
    # relevance starts at the labelled logit; the identity rule passes it through the ReLU unchanged
    r_out = torch.zeros_like(logits).scatter(1, labels[:, None], logits.gather(1, labels[:, None]))
    second_terms = shares(hidden, second.weight.detach(), second.bias.detach(), rule) * r_out[..., None]
    r_hidden = second_terms.sum(1)
    first_terms = shares(x, first.weight.detach(), first.bias.detach(), rule) * r_hidden[..., None]

    with propagation(model, rule):
        got = explain(model, {"input": x, "labels": labels}, [first, second])
    assert float(got.start) == pytest.approx(float(r_out.sum()), rel=1e-6)
    torch.testing.assert_close(got.inputs["input"], first_terms.sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.weights[second], second_terms.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.weights[first], first_terms.sum(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- conservation
# Without biases and with tiny epsilon the input relevance must add up to the start value. In float32 the sums
# carry rounding of about 1e-7 times the size of their terms (hundreds to thousands of them), so the tolerance is
# 1e-5 of the summed |relevance|, not of the start value, which is itself a sum of terms of both signs.
TINY = Rule("epsilon", epsilon=1e-9)


def assert_conserved(total, terms):
    assert float(total) == pytest.approx(float(terms.sum()), abs=1e-5 * float(terms.abs().sum()))


def test_a_bias_free_mlp_conserves_relevance_at_every_layer():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16, bias=False), nn.GELU(), nn.Linear(16, 16, bias=False), nn.Tanh(),
              nn.Linear(16, 5, bias=False)]
    model = nn.Sequential(*layers)
    with propagation(model, TINY):
        got = explain(model, {"input": torch.randn(6, 8)}, [layers[0], layers[2], layers[4]])
    assert_conserved(got.start, got.inputs["input"])
    for layer in (layers[0], layers[2], layers[4]):  # a chain: all of the relevance passes every layer
        assert_conserved(got.start, got.weights[layer])


def test_a_bias_free_llama_conserves_relevance_and_splits_it_by_the_rules():
    model = tiny("llama")
    ids = calibration_for("llama", n=2)
    block = model.model.layers[1]
    mlp, attention = block.mlp, block.self_attn
    outputs = {}

    def keep(name):
        def hook(module, args, output):  # registered after the rules' hooks: sees the output they return
            output.register_hook(lambda grad: outputs.__setitem__(name, output.detach() * grad))
        return hook

    with propagation(model, TINY):
        handles = [mlp.down_proj.register_forward_hook(keep("down")), attention.o_proj.register_forward_hook(keep("o"))]
        got = explain(model, {"input_ids": ids}, [mlp.gate_proj, mlp.up_proj, mlp.down_proj, attention.q_proj,
                                                  attention.k_proj, attention.v_proj, attention.o_proj])
        for handle in handles:
            handle.remove()
    assert_conserved(got.start, got.inputs["embeddings"])
    # per weight, summed over the in dimension: the layer's output relevance (no bias, epsilon negligible)
    for name, layer in (("down", mlp.down_proj), ("o", attention.o_proj)):
        per_output = outputs[name].reshape(-1, outputs[name].shape[-1]).sum(0)
        torch.testing.assert_close(got.weights[layer].sum(1), per_output, rtol=1e-4,
                                   atol=1e-5 * float(per_output.abs().sum()))
    # uniform rule: act(gate) and up each get half of down_proj's input relevance (the identity rule passes the
    # activation); AH-rule: relevance reaches v_proj and o_proj alike, queries and keys get none
    half = got.weights[mlp.down_proj].sum() / 2
    for layer in (mlp.gate_proj, mlp.up_proj):
        assert_conserved(half, got.weights[layer])
    assert_conserved(got.weights[attention.o_proj].sum(), got.weights[attention.v_proj])
    assert not got.weights[attention.q_proj].any() and not got.weights[attention.k_proj].any()


# ------------------------------------------------------------------------------- tiny models, left unchanged

def state(model):
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "flags": [p.requires_grad for p in model.parameters()], "training": model.training,
            "attention": model.config._attn_implementation,
            "functions": (F.softmax, torch.softmax, "softmax" in vars(torch.Tensor), F.scaled_dot_product_attention),
            "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())}


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for key in before["weights"]:
        assert torch.equal(before["weights"][key], after["weights"][key]), key
    assert [before[k] for k in before if k != "weights"] == [after[k] for k in after if k != "weights"]


@pytest.mark.parametrize("family, options", [
    ("llama", {}),
    ("bert", {"start": lambda model, batch: model(**batch).pooler_output.sum()}),
    ("vit", {"rule": "alpha_beta", "alpha": 2.0}),
])
def test_runs_on_tiny_models_and_leaves_them_as_they_were(family, options):
    model = tiny(family).train()  # the pass runs in eval mode and must give the training flag back
    next(model.parameters()).requires_grad_(False)  # and every requires_grad flag, whatever it was
    batches = as_batches(calibration_for(family, n=4), model)
    targets = find_targets(model)
    key = "last_hidden_state" if family == "bert" else "logits"
    with torch.no_grad():
        expected = getattr(model.eval()(**batches[0]), key)
    model.train()
    before = state(model)
    estimator = ESTIMATORS.create("lrp", **options)
    with pytest.warns(UserWarning, match="no relevance reached"):  # queries and keys, by the AH-rule
        stats = estimator.gather(model, targets, batches, progress=False)
    assert_same_state(before, state(model))
    with torch.no_grad():
        assert torch.equal(getattr(model.eval()(**batches[0]), key), expected)
    shares = [estimator.layer_score(t.weight, stats[t.module]) for t in targets]
    assert sum(shares) == pytest.approx(1.0)
    for t in targets:
        assert stats[t.module].weights.shape == t.shape and torch.isfinite(stats[t.module].weights).all()
    assert any(stats[t.module].weights.any() for t in targets)


def test_eager_constant_attention_inside_the_pass_only():
    model = tiny("llama")
    with propagation(model):
        assert model.config._attn_implementation == "eager"
        x = torch.randn(3, 4, requires_grad=True)
        assert not F.softmax(x, -1).requires_grad and not x.softmax(-1).requires_grad
    assert model.config._attn_implementation == "sdpa" and F.softmax(x, -1).requires_grad


@pytest.mark.parametrize("kind", ["causal", "bool", "float", "gqa"])
def test_written_out_attention_matches_torch_and_passes_values_only(kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, requires_grad=True) for _ in range(3))
    kwargs = {"causal": {"is_causal": True}, "bool": {"attn_mask": torch.rand(5, 5) > 0.3},
              "float": {"attn_mask": torch.randn(5, 5)}, "gqa": {"enable_gqa": True}}[kind]
    if kind == "gqa":
        k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(2))
    if kind == "bool":
        kwargs["attn_mask"][:, 0] = True  # no fully masked row
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    with propagation(nn.Identity()):
        got = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    dq, dk, dv = torch.autograd.grad(got.sum(), (q, k, v), allow_unused=True)
    assert dq is None and dk is None and dv.abs().sum() > 0


# ----------------------------------------------------------------------------------------- pruning, errors

def test_prune_removes_exactly_half_of_the_targeted_weights():
    model = tiny("llama")
    with pytest.warns(UserWarning, match="q_proj"):
        report = prunekit.prune(model, 0.5, importance="lrp", calibration=calibration_for("llama", n=4),
                                progress=False)
    targets = find_targets(model)
    kept = sum(int(t.module._buffers[BUFFER].sum()) for t in targets)
    total = sum(t.numel for t in targets)
    assert report.pruned == total // 2 and kept == total - total // 2 and report.exact


def test_a_model_without_logits_needs_a_start():
    model = tiny("bert")
    with pytest.raises(CalibrationError, match="start=fn"):
        LRP().gather(model, find_targets(model), as_batches(calibration_for("bert", n=2), model), progress=False)


def test_a_norm_it_cannot_recompute_is_refused_by_name():
    class OffsetRMSNorm(nn.Module):  # Gemma-style (1 + weight): not the formula the LN-rule recomputes
        def __init__(self):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.full((4,), 0.5)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    model = nn.Sequential(nn.Linear(4, 4), OffsetRMSNorm(), nn.Linear(4, 2))
    with pytest.raises(PrunekitError, match="OffsetRMSNorm"), propagation(model):
        explain(model, {"input": torch.randn(2, 4)}, [model[0]])
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("options", [{"rule": "z_plus"}, {"epsilon": 0}, {"alpha": 0.5}, {"samples": 0}])
def test_bad_options_are_refused(options):
    with pytest.raises(PrunekitError):
        ESTIMATORS.create("lrp", **options)
