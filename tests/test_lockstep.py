"""order="layer": each layer calibrated on the inputs it gets with the layers before it already pruned."""
import threading

import pytest
import torch
from torch import nn

import prunekit
from conftest import calibration_for, tiny
from prunekit.targets import find_targets


def input_sq_norms(model, x):
    """Per target: sum over tokens of x_j^2 of the input it receives in `model`'s own forward."""
    sq, hooks = {}, []
    for t in find_targets(model):
        hooks.append(t.module.register_forward_pre_hook(
            lambda m, args, name=t.name: sq.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]).pow(2).sum(0))
            and None))
    with torch.no_grad():
        model(**x) if isinstance(x, dict) else model(input_ids=x)
    for h in hooks:
        h.remove()
    return sq


def wanda_mask(w, sq):
    score = w.abs() * sq.sqrt()
    return torch.ones_like(w, dtype=torch.bool).scatter_(1, score.argsort(1)[:, : w.shape[1] // 2], False)


def test_layer_order_calibrates_every_layer_on_the_pruned_models_inputs():
    """A layer's input never depends on layers pruned after it, so every mask equals Wanda's formula (dense
    weights) on the inputs the final pruned model itself feeds that layer."""
    model, x = tiny("llama"), calibration_for("llama")
    dense = {t.name: t.weight.clone() for t in find_targets(model)}
    prunekit.prune(model, 0.5, importance="wanda", calibration=x, order="layer", progress=False)
    sq = input_sq_norms(model, x)
    for name, keep in prunekit.masks(model).items():
        assert torch.equal(keep, wanda_mask(dense[name], sq[name])), name


def test_block_order_calibrates_every_layer_of_a_block_on_the_dense_block():
    model, x = tiny("llama"), calibration_for("llama")
    sq = input_sq_norms(model, x)  # the dense model: block 0's layers see these in block order
    dense = {t.name: t.weight.clone() for t in find_targets(model)}
    prunekit.prune(model, 0.5, importance="wanda", calibration=x, order="block", progress=False)
    for t in find_targets(model):
        if t.block == 0:
            assert torch.equal(prunekit.masks(model)[t.name], wanda_mask(dense[t.name], sq[t.name])), t.name
    # and the orders really differ after the first layers of a block
    other = tiny("llama")
    prunekit.prune(other, 0.5, importance="wanda", calibration=x, order="layer", progress=False)
    down = "model.layers.0.mlp.down_proj"
    assert not torch.equal(prunekit.masks(model)[down], prunekit.masks(other)[down])


class Routed(nn.Module):
    """Sends the whole batch through one of two layers depending on the data (like a mixture of experts)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x) if x.mean() > 0 else self.b(x)
        return x + self.out(torch.relu(h))


def test_batches_that_take_different_routes_fall_back_to_block_order():
    batches = [{"input": torch.randn(16, 8) + 3}, {"input": torch.randn(16, 8) - 3}]
    results = {}
    for order in ("layer", "block"):
        torch.manual_seed(0)
        model = nn.Sequential(Routed(), Routed())
        report = prunekit.prune(model, 0.5, importance="sparsegpt", calibration=batches, order=order, progress=False)
        assert report.exact and len(report.layers) == 6
        results[order] = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(results["layer"][k], results["block"][k]) for k in results["block"])


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        if (h > 1e3).any():
            raise FloatingPointError("activation overflow")
        return x + self.b(h)


def test_an_error_inside_a_batch_thread_reaches_the_caller_and_rolls_back():
    torch.manual_seed(0)
    model = nn.Sequential(Exploding(), Exploding())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    threads = threading.active_count()
    batches = [{"input": torch.randn(4, 8)}, {"input": torch.full((4, 8), 1e6)}]
    with pytest.raises(FloatingPointError, match="activation overflow"):
        prunekit.prune(model, 0.5, importance="wanda", calibration=batches, progress=False)
    assert prunekit.masks(model) == {}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert threading.active_count() == threads  # no batch thread left behind


def test_unknown_order_is_refused():
    with pytest.raises(prunekit.PrunekitError, match="order must be 'layer' or 'block'"):
        prunekit.prune(tiny("llama"), 0.5, importance="magnitude", order="column")
