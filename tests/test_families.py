"""Targets and pruning on a tiny model of every supported family."""
import pytest
import torch

import prunekit
from conftest import BLOCK_LAYERS, FAMILIES, calibration_for, tiny
from prunekit.targets import find_targets

PREFIX = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gpt2": "transformer.h",
          "opt": "model.decoder.layers", "bert": "encoder.layer"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_targets_are_the_linears_of_the_blocks(family):
    model = tiny(family)
    names = [t.name for t in find_targets(model)]
    if family == "vit":  # module names differ across transformers 5.x releases
        assert len(names) == 12 and all(".layer" in n for n in names)
    else:
        assert names == [f"{PREFIX[family]}.{b}.{layer}" for b in range(2) for layer in BLOCK_LAYERS[family]]
    assert not any(word in n for n in names for word in ("embed", "lm_head", "pooler", "classifier", "wte"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("importance", ["wanda", "sparsegpt"])
def test_two_four_is_valid_in_every_group(family, importance):
    model = tiny(family)
    report = prunekit.prune(model, "2:4", importance=importance, calibration=calibration_for(family),
                            progress=False)
    assert report.sparsity == 0.5
    for t in find_targets(model):
        weight = t.weight  # [out, in] even for GPT-2's Conv1D
        groups = (weight != 0).view(weight.shape[0], -1, 4).sum(-1)
        assert (groups <= 2).all(), t.name
        keep = prunekit.masks(model)[t.name]
        assert keep.shape == t.module.weight.shape  # stored in the module's own layout
    with torch.no_grad():
        batch = calibration_for(family)
        out = model(**batch[0]) if isinstance(batch, list) else model(input_ids=batch)
    assert torch.isfinite(out[0]).all()


def test_include_and_exclude():
    model = tiny("llama")
    names = [t.name for t in find_targets(model, exclude=r"down_proj|\.1\.")]
    assert len(names) == 6 and not any("down_proj" in n for n in names)
    assert [t.name for t in find_targets(model, include=r"lm_head")] == ["lm_head"]


def test_a_layer_outside_the_blocks_is_calibrated_on_the_pruned_model():
    """lm_head included: Wanda on it uses the final hidden states of the model with its blocks already pruned."""
    model = tiny("llama")
    x = calibration_for("llama")
    w = model.lm_head.weight.detach().clone()
    report = prunekit.prune(model, prunekit.Budget(sparsity=0.5, include=r"layers\.\d+\.|lm_head"),
                            importance="wanda", calibration=x, progress=False)
    assert report.layers[-1].name == "lm_head" and report.exact
    seen = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0]) and None)
    prunekit.remove_masks(model)
    with torch.no_grad():  # lm_head's zeros do not change its inputs
        model(input_ids=x)
    handle.remove()
    score = w.abs() * seen[0].reshape(-1, w.shape[1]).pow(2).sum(0).sqrt()
    expect = torch.ones_like(w, dtype=torch.bool).scatter_(1, score.argsort(1)[:, : w.shape[1] // 2], False)
    assert torch.equal(model.lm_head.weight != 0, expect & (w != 0))


def test_tied_weights_are_refused():
    model = tiny("gpt2")  # lm_head shares wte's weight
    with pytest.raises(prunekit.TargetError, match="shared with transformer.wte"):
        find_targets(model, include="lm_head")
