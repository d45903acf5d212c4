"""save_pruned / load_pruned round trips bit for bit in both layouts (compressed, the default, and dense), and
refuses what does not fit. The compressed layout itself: tests/test_compressed.py."""
import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from torch import nn

import prunekit
from conftest import calibration_for, tiny, without_checksums
from prunekit.bits import pack_bits, unpack_bits
from prunekit.io import MANIFEST


def test_bit_packing_round_trips():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (3, 5), (16, 33), (2, 3, 4)]:
        mask = torch.rand(shape, generator=g) > 0.5
        packed = pack_bits(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert torch.equal(unpack_bits(packed, shape), mask)


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "dense"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_is_bit_exact(tmp_path, family, compressed):
    model = tiny(family)
    x = calibration_for(family)
    report = prunekit.prune(model, 0.6, importance="sparsegpt", calibration=x, progress=False)
    prunekit.save_pruned(model, tmp_path, report, compressed=compressed)
    loaded = prunekit.load_pruned(tmp_path)
    assert type(loaded) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    original, restored = prunekit.masks(model), prunekit.masks(loaded)
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[n], restored[n]) for n in original)
    assert str(prunekit.PruneReport.load(tmp_path)) == str(report)
    # masks are enforced again after loading
    loaded.train()
    optimizer = torch.optim.AdamW(loaded.parameters(), lr=1e-2)
    loaded(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    assert all((loaded.get_submodule(n).weight[~k] == 0).all() for n, k in restored.items())


def test_a_dense_directory_is_a_plain_hugging_face_model(tmp_path):
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    prunekit.save_pruned(model, tmp_path, compressed=False)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(plain.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "dense"])
def test_plain_modules_round_trip_into_a_given_model(tmp_path, compressed):
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    model = build()
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    prunekit.save_pruned(model, tmp_path, compressed=compressed)
    loaded = prunekit.load_pruned(tmp_path, model=build())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert prunekit.masks(loaded).keys() == {"0", "2"}
    with pytest.raises(prunekit.MaskMismatchError, match="does not match the saved weights|has no module of that name"):
        prunekit.load_pruned(tmp_path, model=nn.Sequential(nn.Linear(8, 16)))


def test_load_refuses_a_directory_that_is_not_a_pruned_model(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(prunekit.PrunekitError, match="not a pruned model written by prunekit.save_pruned"):
        prunekit.load_pruned(tmp_path)


def save_pruned_tiny(path) -> None:
    model = tiny("llama")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    prunekit.save_pruned(model, path, compressed=False)


def test_load_refuses_weights_that_no_longer_fit_their_masks(tmp_path):
    save_pruned_tiny(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] += 1.0  # pruned entries no longer zero
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(prunekit.MaskMismatchError, match="model.safetensors differs from what save_pruned wrote"):
        prunekit.load_pruned(tmp_path)
    without_checksums(tmp_path)  # as an older prunekit wrote it: the masks still catch the change
    with pytest.warns(UserWarning, match="cannot be verified"), \
            pytest.raises(prunekit.MaskMismatchError, match="entries of model.layers.1.mlp.up_proj that the mask prunes"):
        prunekit.load_pruned(tmp_path)


def test_load_refuses_masks_of_another_shape(tmp_path):
    save_pruned_tiny(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["masks"]["model.layers.0.mlp.up_proj"] = [32, 64]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(prunekit.MaskMismatchError, match="has shape \\[32, 64\\] but the weight is \\[64, 32\\]"):
        prunekit.load_pruned(tmp_path)


def test_saving_an_unpruned_model_is_refused(tmp_path):
    with pytest.raises(prunekit.PrunekitError, match="no prunekit masks"):
        prunekit.save_pruned(tiny("llama"), tmp_path)


def test_a_gguf_marker_is_cleared_on_save_and_said(tmp_path):
    """A model loaded from GGUF by hand keeps transformers' quantization marker although its weights are floats:
    save_pruned drops it (save_pretrained would refuse) and warns; the bundled loader drops it on load."""
    model = tiny("llama")
    model.config.quantization_config = {"quant_method": "gguf"}
    model.is_quantized = True
    report = prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    with pytest.warns(UserWarning, match="GGUF quantization marker"):
        prunekit.save_pruned(model, tmp_path, report)
    assert getattr(model.config, "quantization_config", None) is None and model.is_quantized is False
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert prunekit.load_pruned(tmp_path).config.num_hidden_layers == model.config.num_hidden_layers
