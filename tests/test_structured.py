"""Structured pruning: heads, MLP channels and conv filters physically removed, checked against counts and attention
computed by hand from the configs."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
import transformers as tf
from torch import nn

import prunekit
from conftest import VOCAB, calibration_for, tiny
from prunekit import Budget, BudgetError, TargetError
from prunekit.importance import ESTIMATORS
from prunekit.importance.base import StructurePart
from prunekit.importance.hessian import GradientStats, StructuralHessian
from prunekit.structured import EstimatorImportance, register_pruner
from prunekit.structured import graph as structured_graph

pytestmark = pytest.mark.usefixtures("one_thread")

H, INTER, HEADS, KV, HD = 32, 64, 4, 2, 8  # conftest's decoder configs


def structured(sparsity=0.4, **options) -> Budget:
    return Budget(sparsity=sparsity, granularity="structured", **options)


def first_batch(family):
    x = calibration_for(family)
    return x[0] if isinstance(x, list) else {"input_ids": x[:2]}


def decoder_params(layers, heads, kv, inter, bias=False, tied=False) -> int:
    """Parameters of a conftest Llama/Qwen2/Mistral config with these widths, written out from the architecture."""
    attn = H * heads * HD + 2 * H * kv * HD + heads * HD * H + ((heads + 2 * kv) * HD if bias else 0)
    per_layer = attn + 3 * H * inter + 2 * H  # q, k, v, o; gate, up, down; two RMSNorms
    return VOCAB * H * (1 if tied else 2) + layers * per_layer + H


def targeted_weights(model) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decoders_lose_heads_and_channels_and_keep_their_outputs(family):
    model = tiny(family)
    batch = first_batch(family)
    report = prunekit.prune(model, structured(0.4), importance="wanda", calibration=calibration_for(family),
                            progress=False)
    cfg = model.config
    # GQA: the same number of query heads left in each of the 2 KV groups, KV heads intact
    assert cfg.num_key_value_heads == KV and cfg.num_attention_heads % KV == 0 and cfg.head_dim == HD
    assert cfg.num_attention_heads < HEADS and cfg.intermediate_size < INTER
    for layer in model.model.layers:
        a = layer.self_attn
        assert a.q_proj.out_features == cfg.num_attention_heads * HD == a.o_proj.in_features
        assert a.num_key_value_groups == cfg.num_attention_heads // KV
        assert layer.mlp.up_proj.out_features == layer.mlp.gate_proj.out_features == cfg.intermediate_size
        assert layer.mlp.down_proj.in_features == cfg.intermediate_size
    expected = decoder_params(2, cfg.num_attention_heads, KV, cfg.intermediate_size, bias=family == "qwen2")
    assert sum(p.numel() for p in model.parameters()) == expected == report.size["params"][1]
    with torch.no_grad():
        out = model(**batch).logits
    assert out.shape == (2, 16, VOCAB) and torch.isfinite(out).all()
    assert report.size["reload"] == "from_pretrained"


def unit_weights(report) -> int:
    return sum(r.unit_weights for r in report.structures)


@pytest.mark.parametrize("sparsity", [0.2, 0.45, 0.6])
def test_params_budget_is_met_within_one_unit_per_structure(sparsity):
    model = tiny("llama")
    total = targeted_weights(model)
    report = prunekit.prune(model, structured(sparsity, uniform=False), importance="magnitude",
                            calibration=calibration_for("llama"), progress=False)
    removed = total - targeted_weights(model)
    # one unit: a query head from each KV group (q rows and o columns) or one MLP channel (gate, up, down), per layer
    slack = 2 * (2 * KV * HD * H + 3 * H)
    assert unit_weights(report) == slack
    assert abs(removed - sparsity * total) <= slack and removed == report.pruned and report.exact


def test_uniform_widths_and_round_to():
    model = tiny("llama")
    prunekit.prune(model, structured(0.3, round_to=8), importance="magnitude", calibration=calibration_for("llama"),
                   progress=False)
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    assert len(widths) == 1 and widths.pop() % 8 == 0
    assert len({layer.self_attn.q_proj.out_features for layer in model.model.layers}) == 1


def test_save_and_reload_through_plain_from_pretrained(tmp_path):
    model = tiny("llama")
    prunekit.prune(model, structured(0.4, heads="kv"), importance="magnitude", calibration=calibration_for("llama"),
                   progress=False)
    assert model.config.num_key_value_heads == 1  # heads="kv": a whole KV group went with its query heads
    model.save_pretrained(tmp_path)
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(plain) is type(model) and plain.config.intermediate_size == model.config.intermediate_size
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    x = calibration_for("llama")[:2]
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-5)


def test_vit_reloads_through_from_pretrained(tmp_path):
    model = tiny("vit")
    report = prunekit.prune(model, structured(0.4), importance="magnitude", calibration=calibration_for("vit"),
                            progress=False)
    assert report.size["reload"] == "from_pretrained" and model.config.num_attention_heads < 4
    model.save_pretrained(tmp_path)
    plain = tf.ViTForImageClassification.from_pretrained(tmp_path).eval()
    pixels = first_batch("vit")["pixel_values"]
    with torch.no_grad():
        assert plain(pixel_values=pixels).logits.shape == (4, 5)
        assert torch.allclose(model(pixel_values=pixels).logits, plain(pixel_values=pixels).logits, atol=1e-5)


def test_bert_heads_go_but_the_report_says_its_config_cannot_hold_them():
    model = tiny("bert")
    report = prunekit.prune(model, structured(0.4, heads="kv"), importance="magnitude",
                            calibration=calibration_for("bert"), progress=False)
    attention = model.encoder.layer[0].attention.self
    assert attention.query.out_features == attention.num_attention_heads * 8 < 32
    assert "load_pruned only" in report.size["reload"] and "head size" in report.size["reload"]
    with torch.no_grad():
        assert model(**first_batch("bert")).last_hidden_state.shape == (2, 16, 32)


def reference_attention(attn, x, cos, sin):
    """Causal grouped-query attention of a Llama layer written out: query head h reads KV head h // group."""
    b, t, _ = x.shape
    heads, kv = attn.q_proj.out_features // HD, attn.k_proj.out_features // HD
    q = (x @ attn.q_proj.weight.t()).view(b, t, heads, HD).transpose(1, 2)
    k = (x @ attn.k_proj.weight.t()).view(b, t, kv, HD).transpose(1, 2)
    v = (x @ attn.v_proj.weight.t()).view(b, t, kv, HD).transpose(1, 2)
    rotate = lambda z: torch.cat([-z[..., HD // 2:], z[..., :HD // 2]], -1)  # noqa: E731
    q, k = q * cos[:, None] + rotate(q) * sin[:, None], k * cos[:, None] + rotate(k) * sin[:, None]
    out = torch.empty(b, heads, t, HD)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for h in range(heads):
        g = h // (heads // kv)
        scores = (q[:, h] @ k[:, g].transpose(1, 2)) / math.sqrt(HD)
        out[:, h] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, g]
    return out.transpose(1, 2).reshape(b, t, heads * HD) @ attn.o_proj.weight.t()


def test_gqa_query_heads_removed_match_the_explicit_attention_and_generation_works():
    model = tiny("llama")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    a0 = model.model.layers[0].self_attn
    q, o = a0.q_proj.weight.detach().clone(), a0.o_proj.weight.detach().clone()
    # magnitude per query head: its q rows and o columns; the lower of each KV group's two goes
    score = q.abs().view(HEADS, HD, H).sum((1, 2)) + o.abs().view(H, HEADS, HD).sum((0, 2))
    keep = [g * 2 + int(torch.argmax(score[g * 2:g * 2 + 2])) for g in range(KV)]
    report = prunekit.prune(model, structured(0.3, heads="query", refit=False), importance="magnitude",
                            calibration=calibration_for("llama"), progress=False)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == KV
    assert report.structures[0].detail == "2 heads"
    rows = torch.cat([torch.arange(h * HD, (h + 1) * HD) for h in keep])
    assert torch.equal(a0.q_proj.weight, q[rows]) and torch.equal(a0.o_proj.weight, o[:, rows])
    assert torch.equal(a0.k_proj.weight, dense["model.layers.0.self_attn.k_proj.weight"])
    x = torch.randn(2, 10, H, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(10).unsqueeze(0)
    cos, sin = model.model.rotary_emb(x, positions)
    causal = torch.zeros(1, 1, 10, 10).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
    for implementation in ("eager", "sdpa"):
        model.config._attn_implementation = implementation
        with torch.no_grad():
            got, _ = a0(x, position_embeddings=(cos, sin), attention_mask=causal)
            assert torch.allclose(got, reference_attention(a0, x, cos, sin), atol=1e-5), implementation
    prompt = calibration_for("llama")[:1, :6]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    with torch.no_grad():  # the cached generation is what full forwards choose
        for t in range(5):
            logits = model(input_ids=out[:, :6 + t], use_cache=False).logits
            assert int(logits[0, -1].argmax()) == int(out[0, 6 + t])


def test_pruned_model_runs_under_torch_compile():
    model = tiny("llama")
    prunekit.prune(model, structured(0.4), importance="magnitude", calibration=calibration_for("llama"),
                   progress=False)
    x = calibration_for("llama")[:2]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        assert torch.allclose(compiled(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)


class Block(nn.Module):
    """A residual block: conv1 -> bn -> relu -> conv2 -> bn, plus its input (the inner filters are prunable)."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.conv2, self.bn2 = nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stage1 = nn.Sequential(Block(c), Block(c))
        self.down = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(Block(c), Block(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def cnn():
    torch.manual_seed(0)
    return TinyResNet().eval()


def images(n=4):
    return [{"input": torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))}]


def conv_macs(model, hw1=16, hw2=8) -> dict:
    """Per conv of the blocks, MACs for one 16x16 image: positions (16x16 in stage 1, 8x8 after the stride) times
    weights."""
    return {m: (hw1 * hw1 if ".stage1." in f".{n}" else hw2 * hw2) * m.weight.numel()
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("stage")}


def test_cnn_inner_filters_go_and_the_flops_budget_is_met():
    model = cnn()
    dense_macs = sum(conv_macs(model).values())
    x = images()[0]["input"]
    report = prunekit.prune(model, Budget(flops=0.7, granularity="structured"), importance="magnitude",
                            calibration=images(), progress=False)
    assert {r.unit for r in report.structures} == {"filter"} and len(report.structures) == 4
    macs = sum(conv_macs(model).values())
    # one filter of block b: conv1's filter (3x3x8) and conv2's input slice (8x3x3), at that stage's positions
    slack = sum(2 * 72 * p for p in (256, 256, 64, 64))
    assert abs((dense_macs - macs) - 0.3 * dense_macs) <= slack
    for block in (*model.stage1, *model.stage2):
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels
        assert block.conv2.out_channels == 8  # the residual stream stays
    assert model.stem.out_channels == 8 and model(x).shape == (4, 10)
    assert report.exact and "calibration 1 batches / 4 samples" in report.summary()  # images: no tokens to count


@pytest.mark.parametrize("budget", [Budget(sparsity=0.5, granularity="structured"),
                                    Budget(flops=0.4, granularity="structured"),
                                    Budget(flops=0.6, granularity="structured", uniform=False)])
def test_layers_cut_from_both_sides_count_their_crossings_once(budget):
    """A plain CNN: conv2 loses filters to its own structure and input channels to conv1's; the weights at the
    crossings go once, and the budget is met on what the layers really lose (counted on the pruned model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    batches = [{"input": torch.randn(4, 3, 8, 8)}]
    convs = [model[0], model[2], model[4], model[7]]
    positions = [64, 64, 64, 1]  # output positions per image: MACs = positions x weights
    cost = (lambda ms: sum(p * m.weight.numel() for m, p in zip(ms, positions))) if budget.metric == "flops" else \
        (lambda ms: sum(m.weight.numel() for m in ms))
    dense = cost(convs)
    report = prunekit.prune(model, budget, importance="magnitude", calibration=batches, progress=False)
    removed = dense - cost(convs)
    # one unit at most per structure: conv1's filter with conv2's input slice, and so on
    slack = max(p * (m.weight.numel() // m.weight.shape[0]) for m, p in zip(convs, positions)) * 3 * 2
    assert abs(removed - budget.sparsity * dense) <= slack
    assert report.exact
    weights_before = [16 * 27, 24 * 144, 32 * 216, 10 * 2048]
    assert [row.pruned for row in report.layers] == [b - m.weight.numel() for b, m in zip(weights_before, convs)]
    assert model(batches[0]["input"]).shape == (4, 10)


def test_estimator_importance_is_torch_pruning_magnitude_for_plain_linears():
    model = tiny("llama")
    graph = structured_graph.build_graph(model, {"input_ids": calibration_for("llama")[:1]})
    up = model.model.layers[0].mlp.up_proj
    group = graph.get_pruning_group(up, tp.prune_linear_out_channels, list(range(INTER)))
    ours = EstimatorImportance(ESTIMATORS.create("magnitude"), {m: None for m in model.modules()
                                                                if isinstance(m, nn.Linear)})(group)
    theirs = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="sum", normalizer=None)(group)
    assert torch.allclose(ours, theirs, rtol=1e-5)
    mlp = model.model.layers[0].mlp
    by_hand = mlp.up_proj.weight.abs().sum(1) + mlp.gate_proj.weight.abs().sum(1) + mlp.down_proj.weight.abs().sum(0)
    assert torch.allclose(ours, by_hand.detach(), rtol=1e-5)


def test_structural_hessian_squares_the_per_sample_sum_across_layers():
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 3, generator=g), torch.randn(5, 4, generator=g)
    s1, s2 = GradientStats(w1), GradientStats(w2)
    grads = [(torch.randn(4, 3, generator=g), torch.randn(5, 4, generator=g)) for _ in range(6)]
    for a, b in grads:
        s1.add(a, w1)
        s2.add(b, w2)
    parts = [StructurePart(w1, s1, 1, 0, torch.arange(4)), StructurePart(w2, s2, 1, 1, torch.arange(4))]
    got = StructuralHessian().structure_scores(parts, 4)
    per_sample = torch.stack([(a * w1).sum(1) + (b * w2).sum(0) for a, b in grads])  # rows of layer 1, columns of 2
    assert torch.allclose(got, (per_sample.double().square().mean(0) / 2), rtol=1e-6)


def test_budgets_that_cannot_be_met_fail_before_the_model_changes():
    model = tiny("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(BudgetError, match="would lose every head or channel"):
        prunekit.prune(model, structured(0.9), importance="magnitude", calibration=calibration_for("llama"),
                       progress=False)
    with pytest.raises(BudgetError, match="model.layers.0.self_attn has a single KV group"):
        torch.manual_seed(0)
        mqa = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=INTER,
                                                 num_hidden_layers=2, num_attention_heads=HEADS,
                                                 num_key_value_heads=1, max_position_embeddings=64))
        prunekit.prune(mqa, structured(0.3, heads="kv"), importance="magnitude",
                       calibration=calibration_for("llama"), progress=False)
    with pytest.raises(BudgetError, match="encoder.layer.0.attention has one query head per KV head"):
        prunekit.prune(tiny("bert"), structured(0.3, heads="query"), importance="magnitude",
                       calibration=calibration_for("bert"), progress=False)
    with pytest.raises(BudgetError, match="does not apply to granularity='structured'"):
        prunekit.prune(model, structured(0.3), importance="magnitude", allocator="dp",
                       calibration=calibration_for("llama"), progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert model.config.intermediate_size == INTER


def test_structured_options_are_validated():
    with pytest.raises(BudgetError, match="only apply to granularity='structured'"):
        Budget(sparsity=0.5, round_to=8)
    with pytest.raises(BudgetError, match="round_to must be"):
        structured(round_to=0)
    with pytest.raises(BudgetError, match="heads must be one of"):
        structured(heads="some")


class ScaledLinear(nn.Module):
    """A custom layer the dependency graph does not know: its weight is used through F.linear."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = None

    def forward(self, x):
        return F.linear(x, self.weight) * 2


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), ScaledLinear(16, 8)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


def test_unknown_layers_are_named_with_the_hook_to_register(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(MLP(), MLP())
    batches = [{"input": torch.randn(4, 8)}]
    with pytest.raises(TargetError, match=r"0\.fc2\.weight is a weight of .*ScaledLinear.*register_pruner\("
                                          r"ScaledLinear, pruner\)"):
        prunekit.prune(model, structured(0.3), importance="magnitude", calibration=batches, progress=False)
    monkeypatch.setattr(structured_graph, "PRUNERS", {})
    register_pruner(ScaledLinear, tp.pruner.function.LinearPruner())
    report = prunekit.prune(model, structured(0.3), importance="magnitude", calibration=batches, progress=False)
    assert model[0].fc1.out_features == model[0].fc2.in_features == 16 - report.structures[0].removed < 16
    assert model(batches[0]["input"]).shape == (4, 8)


def test_an_error_while_removing_restores_every_module(monkeypatch):
    from prunekit.structured import units

    model = tiny("llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    calls = []
    original = units.Channels.remove

    def failing(self, chosen):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        original(self, chosen)

    monkeypatch.setattr(units.Channels, "remove", failing)
    with pytest.raises(KeyboardInterrupt):
        prunekit.prune(model, structured(0.4), importance="magnitude", calibration=calibration_for("llama"),
                       progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert model.model.layers[0].mlp.up_proj.out_features == INTER and model.config.num_attention_heads == HEADS
    with torch.no_grad():
        model(input_ids=calibration_for("llama")[:1])


def test_allocators_choose_per_structure_when_widths_are_free():
    model = tiny("llama")
    report = prunekit.prune(model, structured(0.4, uniform=False), importance="wanda", allocator="owl",
                            calibration=calibration_for("llama"), progress=False)
    assert report.exact and report.size["uniform"] is False
    widths = {layer.mlp.up_proj.out_features for layer in model.model.layers}
    heads = {layer.self_attn.q_proj.out_features for layer in model.model.layers}
    if len(widths) > 1:  # the config holds one intermediate_size: only load_pruned can rebuild this
        assert "different MLP widths" in report.size["reload"]
    if len(heads) > 1:
        assert "different head counts" in report.size["reload"]
    assert len(widths) > 1 or len(heads) > 1 or report.size["reload"] == "from_pretrained"
    text = str(report)
    assert "model.layers.1.mlp" in text and "parameters ->" not in text and " -> " in text


def zeroed_like(original: nn.Module, pruned: nn.Module) -> nn.Module:
    """The original model with every removed output channel zeroed instead: each kept row of a Conv2d, Linear or
    BatchNorm with fewer outputs is found in the original by exact equality, and the rows not found are zeroed
    (weight and bias; a BatchNorm's affine pair). A removed channel then outputs exactly zero (a zeroed head's
    values are zero whatever its attention), so the layers reading it see what they see when it is gone: an
    independent reference for the physically smaller model."""
    reference = original
    pruned_modules = dict(pruned.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            small = pruned_modules.get(name)
            if not isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) or small is None:
                continue
            def rows(m):
                if isinstance(m, nn.BatchNorm2d):
                    return torch.stack([m.weight, m.bias, m.running_mean, m.running_var], 1)
                return m.weight.flatten(1)
            big_rows, small_rows = rows(module), rows(small)
            if small_rows.shape[0] == big_rows.shape[0]:
                continue
            assert small_rows.shape[1:] == big_rows.shape[1:], f"{name} lost inputs and outputs: not covered here"
            kept = []
            for row in small_rows:
                hits = [i for i, big in enumerate(big_rows) if torch.equal(big, row)]
                assert len(hits) == 1, f"{name}: a kept row of the pruned model is not one row of the original"
                kept.append(hits[0])
            drop = torch.ones(big_rows.shape[0], dtype=torch.bool)
            drop[kept] = False
            module.weight[drop] = 0
            if module.bias is not None:
                module.bias[drop] = 0
    return reference


def test_torchvision_resnet():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # distinct batch-norm channels, so that kept channels can be told apart
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.normal_()
                m.running_var.uniform_(0.5, 2)
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    report = prunekit.prune(model, structured(0.3, refit=False), importance="magnitude", calibration=[{"input": x}],
                            progress=False)
    assert report.exact and model(x).shape == (2, 10)
    assert model.layer1[0].conv1.out_channels < 64 and model.layer1[0].conv2.out_channels == 64  # inner filters only
    torch.testing.assert_close(model(x), zeroed_like(original, model)(x), rtol=1e-4, atol=1e-4)


def test_timm_vit():
    try:
        import timm
    except ImportError as e:  # timm imports torchvision, which may not load beside this torch
        pytest.skip(f"timm does not import here: {e}")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=5).eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    report = prunekit.prune(model, structured(0.3, refit=False), importance="magnitude", calibration=[{"input": x}],
                            progress=False)
    assert report.exact and model(x).shape == (2, 5)
    assert all(block.attn.qkv.out_features == 3 * block.attn.num_heads * block.attn.head_dim
               for block in model.blocks)
    assert all(block.attn.num_heads < 3 and block.attn.head_dim == 64 for block in model.blocks)  # whole heads
    torch.testing.assert_close(model(x), zeroed_like(original, model)(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,options", [("bert", {}), ("llama", {"uniform": False}), ("llama", {})])
def test_save_pruned_and_load_pruned_round_trip(tmp_path, family, options):
    model = tiny(family)
    report = prunekit.prune(model, structured(0.4, **options), importance="magnitude",
                            calibration=calibration_for(family), progress=False)
    prunekit.save_pruned(model, tmp_path, report)
    loaded = prunekit.load_pruned(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    batch = first_batch(family)
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0], loaded(**batch)[0], atol=1e-6)
    if report.size["reload"] != "from_pretrained":  # its config cannot say the widths: plain loading refuses
        with pytest.raises(Exception, match="size|shape"):
            type(model).from_pretrained(tmp_path)
    assert str(prunekit.PruneReport.load(tmp_path)) == str(report)


def test_plain_modules_reload_into_a_fresh_instance(tmp_path):
    model = cnn()
    report = prunekit.prune(model, structured(0.4), importance="magnitude", calibration=images(), progress=False)
    prunekit.save_pruned(model, tmp_path, report)
    loaded = prunekit.load_pruned(tmp_path, model=TinyResNet().eval())
    x = images()[0]["input"]
    assert loaded.stage1[0].conv1.out_channels == model.stage1[0].conv1.out_channels < 16
    assert torch.equal(loaded(x), model(x))


def test_refit_is_least_squares_on_the_calibration_inputs():
    model = tiny("llama")
    x = calibration_for("llama")
    down = model.model.layers[0].mlp.down_proj
    up = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    w = down.weight.detach().clone()
    seen = []
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, INTER)))
    with torch.no_grad():
        model(input_ids=x)
    handle.remove()
    inputs = torch.cat(seen).double()
    prunekit.prune(model, structured(0.4, refit=True), importance="magnitude", calibration=x, progress=False)
    new_up = model.model.layers[0].mlp.up_proj.weight.detach()
    kept = torch.tensor([int((up == row).all(1).nonzero()) for row in new_up])  # rows of up are never changed
    # ridge least squares, as SparseGPT damps: H = 2 X^T X / n plus 1% of its mean diagonal
    h = 2 * inputs.t() @ inputs / len(inputs)
    damp = 0.01 * torch.diagonal(h).mean()
    hk = h[kept][:, kept] + damp * torch.eye(len(kept), dtype=torch.float64)
    expected = (w.double() @ h[:, kept] + damp * w.double()[:, kept]) @ torch.linalg.inv(hk)
    assert torch.allclose(down.weight.double(), expected, atol=1e-4)
    error = lambda v, cols: (inputs @ w.double().t() - inputs[:, cols] @ v.t()).norm()  # noqa: E731
    assert error(down.weight.double(), kept) < 0.8 * error(w.double()[:, kept], kept)  # the output moves less


class FusedAttention(nn.Module):
    """timm's Attention layout: one qkv Linear (q, k, v rows, each heads x head_dim), proj, num_heads, head_dim."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = heads, dim // heads, dim
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.attn_dim))


class FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc1, self.fc2 = FusedAttention(), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_fused_qkv_heads_are_cut_in_all_three_sections():
    torch.manual_seed(0)
    model = nn.Sequential(FusedBlock(), FusedBlock()).eval()
    a = model[0].attn
    qkv, bias, proj = a.qkv.weight.detach().clone(), a.qkv.bias.detach().clone(), a.proj.weight.detach().clone()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    prunekit.prune(model, structured(0.3, refit=False), importance="magnitude", calibration=[{"input": x}],
                   progress=False)
    heads = a.num_heads
    assert heads < 4 and a.qkv.out_features == 3 * heads * 4 and a.proj.in_features == heads * 4 == a.attn_dim
    # the kept heads are the best by magnitude over their q, k, v rows and proj columns
    score = qkv.abs().view(3, 4, 4, 16).sum((0, 2, 3)) + proj.abs().view(16, 4, 4).sum((0, 2))
    kept = sorted(torch.argsort(score, descending=True)[:heads].tolist())
    rows = torch.cat([torch.arange(s * 16 + h * 4, s * 16 + h * 4 + 4) for s in range(3) for h in kept])
    assert torch.equal(a.qkv.weight, qkv[rows]) and torch.equal(a.qkv.bias, bias[rows])
    cols = torch.cat([torch.arange(h * 4, h * 4 + 4) for h in kept])
    assert torch.equal(a.proj.weight, proj[:, cols])
    with torch.no_grad():  # attention of the kept heads, written out from the original weights
        y = x @ qkv[rows].t() + bias[rows]
        q, k, v = y.view(2, 5, 3, heads, 4).permute(2, 0, 3, 1, 4)
        out = ((q @ k.transpose(-1, -2)) / 2).softmax(-1) @ v
        expected = out.transpose(1, 2).reshape(2, 5, heads * 4) @ proj[:, cols].t() + a.proj.bias
        assert torch.allclose(a(x), expected, atol=1e-5)


def test_global_ranking_takes_the_cheapest_importance_per_cost_first():
    from prunekit.allocation.global_rank import Global

    scores = [torch.tensor([0.1, 0.2, 5.0]), torch.tensor([0.15, 0.3, 0.4])]
    # equal costs: 0.1 (first), 0.15 (second), 0.2 (first) are the three least important units
    assert Global().allocate_units(scores, [1.0, 1.0], [[0, 1, 2], [0, 1, 2]], 3.0) == [2, 1]
    # the first structure's units cost 4 each: per cost 0.025, 0.05, 1.25 against 0.15, 0.3, 0.4
    assert Global().allocate_units(scores, [4.0, 1.0], [[0, 1, 2], [0, 1, 2]], 9.0) == [2, 1]


def test_global_allocation_differs_per_layer_and_meets_the_budget():
    model = tiny("llama")
    x = calibration_for("llama")
    report = prunekit.prune(model, structured(0.4, uniform=False), importance="fisher", allocator="global",
                            calibration=x, progress=False)
    assert report.exact and len({(r.kind, r.removed) for r in report.structures}) > 2
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x[:2]).logits).all()


def test_input_statistics_do_not_apply_to_convolutions():
    with pytest.raises(TargetError, match="importance 'wanda' read per-feature input statistics"):
        prunekit.prune(cnn(), structured(0.3), importance="wanda", calibration=images(), progress=False)


@pytest.mark.parametrize("widths", [{"": {"forward": "a string"}}, {"bert.encoder.layer.0.attention.self":
                                                                     {"num_attention_heads": "2"}},
                                    {"bert.no.such.module": {"num_attention_heads": 1}},
                                    {"bert.encoder.layer.0.attention.self": {"query": 3}}])
def test_a_manifest_can_set_only_the_widths_prunekit_records(tmp_path, widths):
    """Issue 26: `structured.widths` could set any attribute of any module (model.forward became a string)."""
    import json

    model = tiny("bert")
    report = prunekit.prune(model, structured(0.4, heads="kv"), importance="magnitude",
                            calibration=calibration_for("bert"), progress=False)
    prunekit.save_pruned(model, tmp_path, report, compressed=False)
    manifest = json.loads((tmp_path / "prunekit.json").read_text())
    assert manifest["structured"]["reload"] != "from_pretrained"  # the loader restores the widths itself
    manifest["structured"]["widths"].update(widths)
    del manifest["integrity"]  # an edit an older directory could carry unchecked
    (tmp_path / "prunekit.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="cannot be verified"), \
            pytest.raises(prunekit.MaskMismatchError, match="which is not a width prunekit records"):
        prunekit.load_pruned(tmp_path)


def test_input_rows_are_a_convolutions_patches():
    """hooks.input_rows against patches cut out by hand, and the product it makes a convolution into."""
    from prunekit.calibration.hooks import input_rows

    conv = nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), bias=False)
    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(0))
    rows = input_rows(conv, x)
    padded = F.pad(x, (0, 0, 1, 1))
    expected = [padded[n, :, oy * 2:oy * 2 + 3, ox:ox + 2].reshape(-1)
                for n in range(2) for oy in range(4) for ox in range(5)]
    assert torch.equal(rows, torch.stack(expected))
    y = (rows @ conv.weight.detach().reshape(5, -1).t()).reshape(2, 4, 5, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, conv(x).detach())
    with pytest.raises(ValueError, match="groups=1"):
        input_rows(nn.Conv2d(4, 4, 3, groups=4), torch.randn(1, 4, 5, 5))


def test_conv_refit_is_least_squares_on_the_input_patches():
    """Refit on a convolution reading removed filters: the kept columns (input channel x 3 x 3 patch positions)
    are the damped least squares on its calibration patches, as for a Linear."""
    model, x = cnn(), images()
    block = model.stage1[0]
    conv1, w = block.conv1.weight.detach().clone(), block.conv2.weight.detach().clone()
    seen = []
    handle = block.conv2.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x[0]["input"])
    handle.remove()
    patches = F.unfold(seen[0], 3, padding=1).transpose(1, 2).reshape(-1, 16 * 9).double()
    prunekit.prune(model, Budget(flops=0.7, granularity="structured", refit=True), importance="magnitude",
                   calibration=x, progress=False)
    kept = torch.tensor([int((conv1 == f).flatten(1).all(1).nonzero()) for f in block.conv1.weight.detach()])
    assert 0 < len(kept) < 16
    cols = (kept[:, None] * 9 + torch.arange(9)).flatten()
    w2 = w.reshape(8, -1).double()
    h = 2 * patches.t() @ patches / len(patches)
    damp = 0.01 * torch.diagonal(h).mean()
    expected = (w2 @ h[:, cols] + damp * w2[:, cols]) @ torch.linalg.inv(h[cols][:, cols] + damp * torch.eye(len(cols),
                                                                                              dtype=torch.float64))
    torch.testing.assert_close(block.conv2.weight.detach().reshape(8, -1).double(), expected, atol=1e-4, rtol=1e-4)


def test_batch_norms_get_the_calibration_statistics_back():
    """recalibrate: each BatchNorm's running mean and variance become the average of its per-batch statistics
    (computed here from the layers before it), with dropout off; train flags and momenta come back."""
    from prunekit.structured.batchnorm import recalibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)).eval()
    model[4].train()  # a flag to come back as it was
    g = torch.Generator().manual_seed(1)
    batches = [{"input": torch.randn(3, 3, 6, 6, generator=g)} for _ in range(3)]
    assert recalibrate(model, batches) == 2
    with torch.no_grad():
        first = [model[0](b["input"]) for b in batches]
        second = [model[4](F.relu((a - a.mean((0, 2, 3), keepdim=True))
                                  / (a.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
                                  * model[1].weight[:, None, None] + model[1].bias[:, None, None])) for a in first]
    for bn, inputs in ((model[1], first), (model[5], second)):
        torch.testing.assert_close(bn.running_mean, torch.stack([a.mean((0, 2, 3)) for a in inputs]).mean(0))
        torch.testing.assert_close(bn.running_var, torch.stack([a.var((0, 2, 3)) for a in inputs]).mean(0))
    assert model[1].momentum == 0.3 and model[5].momentum == 0.1
    assert [m.training for m in model] == [False, False, False, False, True, False]


def test_the_defaults_keep_a_bert_reloadable_and_refit_it(tmp_path):
    """Budget(granularity="structured") alone on BERT: attention stays (its config cannot hold fewer heads of the
    same size), MLP channels go, the kept columns are refit, and plain from_pretrained reloads it; the report
    says which configuration ran and why."""
    model = tiny("bert")
    batches = calibration_for("bert")
    dense_down = [layer.output.dense.weight.detach().clone() for layer in model.encoder.layer]
    report = prunekit.prune(model, structured(0.3), calibration=batches, progress=False)
    assert report.importance == "Wanda()" and report.size["reload"] == "from_pretrained"
    assert {r.kind for r in report.structures} == {"channels"}
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size < 64
    assert "heads none" in str(report) and "refit by SparseGPT least squares" in str(report)
    assert "attention left alone" in str(report) and "head size" in str(report)
    for layer, dense in zip(model.encoder.layer, dense_down):  # refit: no kept column is the dense one any more
        assert layer.output.dense.weight.shape[1] == model.config.intermediate_size
        assert not any(torch.equal(layer.output.dense.weight[:, :1], dense[:, i:i + 1]) for i in range(64))
    model.save_pretrained(tmp_path)
    plain = tf.AutoModel.from_pretrained(tmp_path).eval()
    batch = first_batch("bert")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_the_default_importance_for_convolutions_is_lrp_with_its_cnn_rule():
    report = prunekit.prune(cnn(), Budget(flops=0.7, granularity="structured"), calibration=images(),
                            progress=False)
    assert report.importance.startswith("LRP(rule='alpha_beta'") and report.exact

    def same_padded():  # the second convolution's input patches are not ones refit can take (padding="same")
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding="same"), nn.Flatten(),
                             nn.Linear(8 * 14 * 14, 4))

    model, x = same_padded(), images()[0]["input"]
    with pytest.raises(TargetError, match="grouped or Conv2d"):  # an explicit refit where it cannot run: refused
        prunekit.prune(model, Budget(sparsity=0.3, granularity="structured", refit=True), importance="magnitude",
                       calibration=images(), progress=False)
    assert torch.equal(model(x), same_padded()(x))  # before anything changed
    report = prunekit.prune(model, Budget(sparsity=0.3, granularity="structured"), importance="magnitude",
                            calibration=images(), progress=False)  # the default refit steps aside and says why
    assert "refit off" in str(report) and "no refit: refit solves least squares" in str(report)
