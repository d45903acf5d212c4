"""prunekit.score: measurements on the dense model, read per weight, per group and per layer."""
import pytest
import torch

import prunekit
from conftest import calibration_for, tiny
from prunekit.calibration import as_batches
from prunekit.importance.base import group_sum


def test_wanda_scores_match_input_norms_taken_by_a_hook_and_leave_the_model_alone():
    model = tiny("llama")
    windows = calibration_for("llama", n=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in as_batches(windows, model):
            model(**batch)
    handle.remove()
    norms = torch.cat(seen).square().sum(0).sqrt()
    scores = prunekit.score(model, "wanda", windows, progress=False)
    expected = layer.weight.detach().abs() * norms
    assert torch.allclose(scores.weights(name), expected, rtol=1e-4)
    assert torch.allclose(scores.groups(name, size=4), group_sum(expected, 4, 0), rtol=1e-4)
    assert torch.allclose(scores.groups(name, size=8, dim=1), expected.view(32, 8, 8).sum((0, 2)), rtol=1e-4)
    assert scores.layers()[name] == pytest.approx(float(expected.mean()), rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_layer_and_missing_data_are_clear_errors():
    model = tiny("llama")
    scores = prunekit.score(model, "magnitude", progress=False)
    with pytest.raises(KeyError, match="not a scored layer"):
        scores.weights("model.embed_tokens")
    with pytest.raises(prunekit.CalibrationError, match="need calibration data"):
        prunekit.score(model, "fisher")
