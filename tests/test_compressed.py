"""The compressed checkpoint (prunekit/compressed.py): compressed-tensors itself decompresses it to the masked dense
weights; a plain from_pretrained refuses it naming prunekit.load_pruned; load_pruned brings back the modules that
were saved (masked, BitmaskLinear, BlockSparseLinear, GPT-2 Conv1D) bit for bit, or all sparse, or all dense; and it
refuses entries that disagree before anything changes."""
import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import prunekit
from conftest import VOCAB, calibration_for, tiny, without_checksums
from prunekit import Budget, compressed
from prunekit.checkpoint import MANIFEST, SAFETENSORS_METADATA
from prunekit.kernels import BitmaskLinear, BlockSparseLinear, convert

pytestmark = pytest.mark.usefixtures("one_thread")


def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(ids()).logits


def pruned_llama(budget=0.5):
    model = tiny("llama")
    report = prunekit.prune(model, budget, importance="wanda", calibration=calibration_for("llama"), progress=False)
    return model, report


def shard(path):
    return path / compressed.SHARD.format(1, 1)


def test_compressed_tensors_decompresses_the_checkpoint_to_the_masked_weights(tmp_path):
    ct = pytest.importorskip("compressed_tensors.compressors.sparse_compressors.sparse_bitmask")
    from compressed_tensors.config import BitmaskConfig

    model, report = pruned_llama()
    prunekit.save_pruned(model, tmp_path, report)
    masked = {f"{name}.weight": model.get_submodule(name).weight.detach() for name in prunekit.masks(model)}
    decompressed = dict(ct.BitmaskCompressor(config=BitmaskConfig()).decompress(str(shard(tmp_path))))
    state = model.state_dict()  # every weight: the masked ones decompressed, the rest as stored
    assert decompressed.keys() == state.keys()
    for name, weight in state.items():
        assert torch.equal(decompressed[name], weight), name
    assert all(torch.equal(decompressed[name], weight) for name, weight in masked.items())
    with safe_open(str(shard(tmp_path)), "pt") as f:  # and one tensor by hand, with its own class
        entries = {s: f.get_tensor(f"model.layers.0.mlp.up_proj.{s}") for s in compressed.SUFFIXES}
    assert torch.equal(ct.BitmaskTensor(**entries).decompress(), masked["model.layers.0.mlp.up_proj.weight"])


def test_a_compressed_directory_is_a_fraction_of_the_dense_one(tmp_path):
    model, report = pruned_llama(0.7)
    prunekit.save_pruned(model, tmp_path / "c", report)
    prunekit.save_pruned(model, tmp_path / "d", report, compressed=False)
    weights = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731 (masks included)
    masked = {f"{n}.weight": model.get_submodule(n).weight for n in prunekit.masks(model)}
    rest = sum(t.numel() for k, t in model.state_dict().items() if k not in masked)
    # 30% of the masked weights' values, a bit each, 8 bytes a row; the rest dense; the safetensors header
    expected = sum(4 * 0.3 * w.numel() + w.numel() / 8 + 8 * w.shape[0] for w in masked.values()) + 4 * rest
    assert expected < weights(tmp_path / "c") < expected + 12_000
    assert weights(tmp_path / "c") < 0.62 * weights(tmp_path / "d")  # this tiny model is mostly embeddings
    assert not (tmp_path / "c" / "prunekit_masks.safetensors").exists()  # the bitmasks are the masks


def test_plain_from_pretrained_refuses_it_naming_load_pruned(tmp_path):
    model, report = pruned_llama()
    prunekit.save_pruned(model, tmp_path, report)
    with pytest.raises(OSError, match="prunekit.load_pruned"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    index = json.loads((tmp_path / compressed.INDEX).read_text())["weight_map"]
    assert index["model.layers.0.mlp.up_proj.weight"] == compressed.SENTINEL
    assert index["model.embed_tokens.weight"] == compressed.SHARD.format(1, 1)


def test_converted_layers_come_back_as_they_were(tmp_path):
    """Bitmask and block layers (a block-pruned MLP, unstructured attention) and a layer left masked: saved and
    loaded as the same modules, with the same tensors, and outputs equal to the masked dense model's."""
    model = tiny("llama")
    prunekit.prune(model, Budget(sparsity=0.5, granularity="block16x16", include=r"mlp"), importance="magnitude",
                   progress=False)
    prunekit.prune(model, Budget(sparsity=0.5, include=r"self_attn\.[qkv]_proj"), importance="magnitude",
                   progress=False)
    twin = tiny("llama")
    twin.load_state_dict(model.state_dict())
    expected = logits(model)
    convert(model, backend="cpu")
    model.model.layers[1].self_attn.v_proj = model.model.layers[1].self_attn.v_proj.to_dense()  # one stays masked
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith(("proj",))}
    prunekit.save_pruned(model, tmp_path)
    loaded = prunekit.load_pruned(tmp_path)
    assert {n: type(m).__name__ for n, m in loaded.named_modules() if n.endswith(("proj",))} == kinds
    assert kinds["model.layers.0.mlp.up_proj"] == "BlockSparseLinear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "BitmaskLinear"
    assert kinds["model.layers.1.self_attn.v_proj"] == "Linear" and kinds["model.layers.0.self_attn.o_proj"] == "Linear"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    for m in loaded.modules():  # the dense path: bit for bit the masked dense model's product
        if isinstance(m, (BitmaskLinear, BlockSparseLinear)):
            m.backend = "dense"
    assert torch.equal(logits(loaded), expected)
    for m in loaded.modules():
        if isinstance(m, (BitmaskLinear, BlockSparseLinear)):
            m.backend = "cpu"
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)


def test_sparse_true_loads_every_masked_layer_compressed_and_false_all_dense(tmp_path):
    model, report = pruned_llama()
    expected = logits(model)
    prunekit.save_pruned(model, tmp_path, report)
    sparse = prunekit.load_pruned(tmp_path, sparse=True)
    layers = [m for m in sparse.modules() if isinstance(m, BitmaskLinear)]
    assert len(layers) == 14 and not prunekit.masks(sparse)
    torch.testing.assert_close(logits(sparse), expected, rtol=1e-5, atol=1e-5)
    assert all(m.values.numel() == int(prunekit.masks(model)[n].sum()) for n, m in sparse.named_modules()
               if isinstance(m, BitmaskLinear))
    prunekit.save_pruned(sparse, tmp_path / "again")  # a BitmaskLinear is written from its own tensors
    assert load_file(shard(tmp_path / "again")).keys() == load_file(shard(tmp_path)).keys()
    dense = prunekit.load_pruned(tmp_path / "again", sparse=False)
    assert not any(isinstance(m, BitmaskLinear) for m in dense.modules())
    assert torch.equal(logits(dense), expected)
    assert all(torch.equal(prunekit.masks(dense)[n], k) for n, k in prunekit.masks(model).items())


def test_gpt2_conv1d_layers_round_trip(tmp_path):
    model = tiny("gpt2")
    prunekit.prune(model, 0.5, importance="magnitude", progress=False)
    expected = logits(model)
    prunekit.save_pruned(model, tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["masks"]["transformer.h.0.attn.c_attn"] == [32, 96]  # as the parameter is stored, [in, out]
    assert torch.equal(logits(prunekit.load_pruned(tmp_path)), expected)
    sparse = prunekit.load_pruned(tmp_path, sparse=True)
    assert isinstance(sparse.transformer.h[0].attn.c_attn, BitmaskLinear)
    torch.testing.assert_close(logits(sparse), expected, rtol=1e-5, atol=1e-5)
    prunekit.save_pruned(sparse, tmp_path / "again")
    assert torch.equal(logits(prunekit.load_pruned(tmp_path / "again", sparse=False)), expected)


def test_bf16_weights_stay_bf16(tmp_path):
    model = tiny("llama").to(torch.bfloat16)
    prunekit.prune(model, "2:4", importance="magnitude", progress=False)
    prunekit.save_pruned(model, tmp_path)
    loaded = prunekit.load_pruned(tmp_path, sparse=True)
    layer = loaded.model.layers[0].mlp.up_proj
    assert layer.values.dtype == torch.bfloat16 and layer.density == 0.5
    assert torch.equal(layer.dense_weight(), model.model.layers[0].mlp.up_proj.weight)


def test_entries_that_disagree_are_refused_before_anything_changes(tmp_path):
    model, report = pruned_llama()
    prunekit.save_pruned(model, tmp_path, report)
    tensors = load_file(shard(tmp_path))
    key = "model.layers.1.mlp.down_proj.compressed"
    tensors[key] = tensors[key][:-1]  # one value short of what the bitmask keeps
    save_file(tensors, shard(tmp_path), metadata=SAFETENSORS_METADATA)
    target = tiny("llama")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(prunekit.MaskMismatchError, match="model-00001-of-00001.safetensors differs from what"):
        prunekit.load_pruned(tmp_path, model=target)
    without_checksums(tmp_path)  # as an older prunekit wrote it: the entries' own check still refuses
    with pytest.warns(UserWarning, match="cannot be verified"), \
            pytest.raises(prunekit.MaskMismatchError, match="model.layers.1.mlp.down_proj: the bitmask keeps"):
        prunekit.load_pruned(tmp_path, model=target)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    del tensors["model.layers.1.mlp.down_proj.bitmask"]
    save_file(tensors, shard(tmp_path), metadata=SAFETENSORS_METADATA)
    with pytest.warns(UserWarning), \
            pytest.raises(prunekit.MaskMismatchError, match="lacks model.layers.1.mlp.down_proj.bitmask"):
        prunekit.load_pruned(tmp_path)


def test_converting_twice_or_nan_weights_are_refused_before_any_swap():
    model, _ = pruned_llama()
    with torch.no_grad():
        layer = model.model.layers[1].mlp.up_proj
        layer.weight[layer.prune_mask.nonzero()[0].tolist()[0], layer.prune_mask.nonzero()[0].tolist()[1]] = float("nan")
    with pytest.raises(prunekit.PrunekitError, match="up_proj: its kept weights hold NaN or Inf"):
        convert(model)
    assert not any(isinstance(m, BitmaskLinear) for m in model.modules())
    model, _ = pruned_llama()
    convert(model, backend="cpu")
    with pytest.raises(prunekit.PrunekitError, match="converted already .*revert"):
        convert(model)
