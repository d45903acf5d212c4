"""The block-by-block runner reproduces the model's own forward, and feeds pruned outputs forward."""
import pytest
import torch
import transformers as tf

import prunekit
from conftest import VOCAB, calibration_for, tiny
from prunekit.calibration import as_batches, sequential
from prunekit.targets import find_blocks


def runner_outputs(model, batches):
    _, blocks = find_blocks(model)
    outs = []
    for step in sequential(model, blocks, batches, progress=False):
        step.run(keep_outputs=True)
        outs.append([o.clone() for o in step.outputs])
    return outs


def reference_hidden(model, batch, block):
    """Input of block+1 in the model's own forward, caught with a hook."""
    _, blocks = find_blocks(model)
    seen = {}

    def catch(module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    handle = blocks[block + 1].register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert", "vit"])
def test_runner_reproduces_the_models_forward(family):
    model = tiny(family)
    batches = as_batches(calibration_for(family), model)
    outs = runner_outputs(model, batches)
    for b, batch in enumerate(batches):
        torch.testing.assert_close(outs[0][b], reference_hidden(model, batch, 0))


def test_runner_uses_each_blocks_own_arguments():
    """Qwen2 with sliding-window attention from layer 1 on: blocks get different masks."""
    torch.manual_seed(0)
    config = tf.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                            max_window_layers=1, max_position_embeddings=64)
    model = tf.Qwen2ForCausalLM(config).eval()
    assert len(set(config.layer_types)) == 2
    batches = as_batches(torch.randint(0, VOCAB, (2, 24)), model)
    outs = runner_outputs(model, batches)
    torch.testing.assert_close(outs[1][0], reference_hidden(model, batches[0], 1))


def test_padded_batches_reproduce_the_forward():
    model = tiny("llama")
    ids = torch.randint(0, VOCAB, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 7:] = 0
    mask[2, :2] = 0  # left padding too
    batches = as_batches([{"input_ids": ids, "attention_mask": mask}], model)
    outs = runner_outputs(model, batches)
    torch.testing.assert_close(outs[0][0], reference_hidden(model, batches[0], 0))


def test_pruned_outputs_feed_the_next_block():
    """Sequential pruning: block 1 is calibrated on block 0's pruned outputs, not its dense ones."""
    model, dense = tiny("llama"), tiny("llama")
    x = calibration_for("llama")
    layer = lambda m: find_blocks(m)[1][1].self_attn.q_proj  # noqa: E731
    during = []
    handle = layer(model).register_forward_pre_hook(lambda m, args: during.append(args[0].clone()) and None)
    prunekit.prune(model, 0.5, importance="wanda", calibration=x, progress=False)
    handle.remove()
    after, before = [], []
    for m, store in ((model, after), (dense, before)):
        handle = layer(m).register_forward_pre_hook(lambda m, args, store=store: store.append(args[0].clone()) and None)
        with torch.no_grad():
            m(input_ids=x)
        handle.remove()
    # What the statistics saw is what the pruned model feeds that layer, and not what the dense model does.
    torch.testing.assert_close(during[0], after[0])
    assert not torch.allclose(during[0], before[0], atol=1e-3)


def test_layers_fed_one_tensor_share_statistics_and_passes_stop_early():
    from prunekit.calibration import LayerStats, Needs

    model = tiny("llama")
    x = calibration_for("llama", n=8, length=16)
    _, blocks = find_blocks(model)
    attn, mlp = blocks[0].self_attn, blocks[0].mlp
    layers = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    stats = {m: LayerStats(Needs.HESSIAN, m.in_features) for m in layers}
    ran = []
    handle = mlp.down_proj.register_forward_hook(lambda *a: ran.append(1) and None)
    for step in sequential(model, blocks, as_batches(x, model), progress=False):
        if step.index == 0:
            step.run(stats)
            assert ran == []  # the statistics pass stopped at down_proj's input
    handle.remove()
    assert stats[attn.q_proj] is stats[attn.k_proj] is stats[attn.v_proj]
    assert stats[mlp.gate_proj] is stats[mlp.up_proj] and stats[mlp.up_proj] is not stats[mlp.down_proj]
    assert stats[attn.q_proj].count == 8 * 16  # counted once, not three times
    assert ran == [1]  # block 0's output pass; the last block gets none
