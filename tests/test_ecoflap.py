"""ECoFLaP: zeroth-order scores against true gradient norms, the water-filling rule by hand, memory."""
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import prunekit
from prunekit.allocation.ecoflap import ECoFLaP, zeroth_order_scores
from prunekit.calibration import as_batches
from prunekit.calibration.dense import DenseModel
from prunekit.targets import find_targets


class Chain(nn.Module):
    """Linear blocks without activations: the loss ||f(x) - y||^2 is quadratic in each block's weight."""

    def __init__(self, scales):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8, bias=False)) for _ in scales)
        with torch.no_grad():
            for block, scale in zip(self.blocks, scales):
                block[0].weight.copy_(torch.eye(8) + scale * torch.randn(8, 8))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def quadratic(target):
    def loss(model, batch):
        return (model(batch["input"]) - target).square().mean()
    return loss


def setup():
    torch.manual_seed(0)
    model = Chain([0.02, 0.3, 0.05, 0.15])
    x, y = torch.randn(64, 8), torch.randn(64, 8)
    dense = DenseModel(model, find_targets(model), as_batches({"input": x}, model), estimator=None, progress=False)
    return model, dense, quadratic(y)


def true_gradient_norms(model, dense, loss):
    weights = [t.module.weight for t in dense.targets]
    grads = torch.autograd.grad(loss(model, dense.batches[0]), weights)
    return [float(g.norm()) for g in grads]


def test_zeroth_order_scores_follow_the_true_gradient_norms():
    model, dense, loss = setup()
    truth = true_gradient_norms(model, dense, loss)
    noises = 400
    scores = zeroth_order_scores(dense, samples=64, noises=noises, eps=1e-3, seed=0, loss=loss)
    got = [scores[i] for i in range(4)]
    assert sorted(range(4), key=got.__getitem__) == sorted(range(4), key=truth.__getitem__)
    # E|z . g| = sqrt(2/pi) |g| for z ~ N(0, I); 400 draws put the mean within a few percent
    for value, norm in zip(got, truth):
        assert value / (noises * math.sqrt(2 / math.pi) * norm) == pytest.approx(1.0, abs=0.12)


def test_zeroth_order_scores_repeat_with_the_seed_and_leave_the_model_as_it_was():
    model, dense, loss = setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = zeroth_order_scores(dense, samples=64, noises=3, eps=1e-3, seed=7, loss=loss)
    b = zeroth_order_scores(dense, samples=64, noises=3, eps=1e-3, seed=7, loss=loss)
    c = zeroth_order_scores(dense, samples=64, noises=3, eps=1e-3, seed=8, loss=loss)
    assert a == b and a != c
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_water_filling_by_hand():
    ecoflap = ECoFLaP(max_sparsity=0.6)
    # floors keep 40 each (120 of the 150 to keep); the other 30 split 1 : 2 : 5
    out = ecoflap.allocate([100] * 3, [1.0] * 3, prunekit.Budget(sparsity=0.5), [(0, 1.0), (1, 2.0), (2, 5.0)])
    assert out == pytest.approx([1 - 43.75 / 100, 1 - 47.5 / 100, 1 - 58.75 / 100])
    # keep 210: group 2 fills up to 100 and its overflow goes to the others, 15 each on top of their 40
    out = ecoflap.allocate([100] * 3, [1.0] * 3, prunekit.Budget(sparsity=0.3), [(0, 1.0), (1, 1.0), (2, 100.0)])
    assert out == pytest.approx([0.45, 0.45, 0.0])
    # two layers of one group share its sparsity; the group's extra is by score, not score times size
    out = ECoFLaP(max_sparsity=0.8).allocate([100, 100, 200], [1.0] * 3, prunekit.Budget(sparsity=0.6),
                                             [("a", 1.0), ("a", 1.0), ("b", 1.0)])
    # floors 40 + 40 = 80 of 160 to keep; 40 + 40 more each; keep a = 80 of 200, b = 80 of 200
    assert out == pytest.approx([0.6, 0.6, 0.6])
    # default cap: the budget + 0.1
    out = ECoFLaP().allocate([100] * 2, [1.0] * 2, prunekit.Budget(sparsity=0.5), [(0, 0.0001), (1, 1.0)])
    assert out[0] == pytest.approx(0.6, abs=1e-3)
    with pytest.raises(prunekit.BudgetError, match="below the budget"):
        ECoFLaP(max_sparsity=0.4).allocate([100] * 2, [1.0] * 2, prunekit.Budget(sparsity=0.5), [(0, 1.0), (1, 1.0)])


MEMORY_PROBE = textwrap.dedent("""
    import json, sys, torch, transformers as tf
    from prunekit.calibration.dense import DenseModel
    from prunekit.allocation.ecoflap import first_order_scores, zeroth_order_scores
    from prunekit.calibration.loss import model_loss
    from prunekit.calibration import as_batches
    from prunekit.targets import find_targets
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(config).eval()
    x = torch.randint(0, 512, (8, 256))
    dense = DenseModel(model, find_targets(model), as_batches({"input_ids": x}, model), estimator=None,
                       progress=False)
    def mib(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024
    # Reset the peak to what is resident now (weights and inputs): building the model may have peaked higher.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = mib("VmRSS:")
    mode = sys.argv[1]
    if mode == "forward":
        with torch.no_grad():
            model_loss(model, dense.batches[0])
    elif mode == "zeroth":
        zeroth_order_scores(dense, samples=8, noises=2, eps=1e-3, seed=0, loss=model_loss)
    else:
        first_order_scores(dense, samples=8, loss=model_loss)
    print(json.dumps(mib("VmHWM:") - start))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS reset needs Linux /proc")
def test_zeroth_order_scoring_needs_about_the_memory_of_one_forward():
    """Peak RSS (VmHWM, reset once the model is built) above the model's own weights and inputs, each in a fresh
    process whose large allocations are mapped and returned at once (so RSS follows live memory). Measured (MiB,
    runs in two environments): one forward with the loss 40.6-41.0; zeroth-order scoring 59.1-59.4, i.e. one forward
    plus its fixed costs (every block's input for one batch, 12.6, and a copy of one block's weights, 4.2);
    first-order scoring 318.5, the activations of a whole backward pass. ru_maxrss would not do: with some
    transformers versions building the model peaks higher."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

    def peak(mode):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, mode], capture_output=True, text=True, check=True,
                             env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    forward, zeroth, first = peak("forward"), peak("zeroth"), peak("first")
    fixed = 6 * 8 * 256 * 256 * 4 / 2**20 + (256 * 1024 * 3 + 4 * 256 * 256) * 4 / 2**20
    assert zeroth <= forward + fixed + 8, (forward, zeroth, first)
    assert first > 4 * zeroth, (forward, zeroth, first)


def test_any_estimators_layer_scores_can_drive_the_allocation():
    from conftest import calibration_for, tiny

    model = tiny("llama")
    windows = calibration_for("llama", n=4)
    expected = prunekit.score(model, "fisher", windows, progress=False).layers()
    report = prunekit.prune(model, 0.5, importance="wanda", allocator=ECoFLaP(method="fisher", per="layer"),
                            calibration=windows, progress=False)
    assert [score for _, score in report.measured] == pytest.approx(list(expected.values()), rel=1e-5)
    assert report.sparsity == pytest.approx(0.5, abs=1e-4)
    with pytest.raises(prunekit.PrunekitError, match="unknown importance 'fishr'"):
        ECoFLaP(method="fishr")
