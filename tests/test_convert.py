"""convert / revert on a tiny LLM, the auto dispatch's decisions (with measurements replaced by given numbers, so
nothing here is timed), and the errors raised before any layer is swapped."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from conftest import VOCAB, tiny
from prunekit import Budget, PrunekitError
from prunekit.kernels import (
    BlockSparseLinear,
    SemiStructuredLinear,
    backends,
    choose_block,
    convert,
    dispatch,
    is_2_4,
    revert,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pruned():
    model = tiny("llama")
    prunekit.prune(model, Budget(sparsity=0.7, granularity="block16x16"), importance="magnitude", progress=False)
    return model


@pytest.fixture(autouse=True)
def fresh_measurements():
    dispatch.forget()
    yield
    dispatch.forget()


def logits(model):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


def test_convert_keeps_outputs_and_revert_restores_the_masks(pruned):
    before, masks = logits(pruned), {k: v.clone() for k, v in prunekit.masks(pruned).items()}
    report = convert(pruned, backend="torch")
    assert report.converted == 14 and all(c.became == "BlockSparseLinear" for c in report)
    assert all("block 16x16" in c.pattern for c in report)  # 16x16 tiles read back from the masks
    layer = pruned.model.layers[0].mlp.up_proj
    assert isinstance(layer, BlockSparseLinear) and layer.block == 16 and layer.backend == "torch"
    torch.testing.assert_close(logits(pruned), before, rtol=1e-4, atol=1e-4)
    assert revert(pruned) == 14
    assert {k: v for k, v in prunekit.masks(pruned).items()}.keys() == masks.keys()
    assert all(torch.equal(prunekit.masks(pruned)[k], masks[k]) for k in masks)
    torch.testing.assert_close(logits(pruned), before, rtol=1e-5, atol=1e-5)


def test_convert_onto_the_cuda_kernels_run_by_the_emulator(pruned, tmp_path_factory):
    from cuda_emu.build import compiler, registered

    if compiler() is None:
        pytest.skip("no host C++ compiler to build the kernel emulator")
    registered(tmp_path_factory)
    before = logits(pruned)
    assert convert(pruned, backend="emulated").converted == 14
    torch.testing.assert_close(logits(pruned), before, rtol=1e-4, atol=1e-4)


def test_converted_model_fine_tunes_and_pruned_weights_stay_zero(pruned):
    convert(pruned, backend="torch")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    for _ in range(2):
        pruned(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    revert(pruned)
    for name, keep in prunekit.masks(pruned).items():
        assert bool((pruned.get_submodule(name).weight[~keep] == 0).all()), name


def test_report_states_the_bytes_each_layer_holds(pruned):
    masks = {name: keep.clone() for name, keep in prunekit.masks(pruned).items()}
    report = convert(pruned, backend="torch")
    for c in report:  # float32 16 x 16 blocks (every one wholly kept) and six int32 index lists
        out_features, in_features = c.shape
        nnzb = int(masks[c.name].view(out_features // 16, 16, in_features // 16, 16).any(3).any(1).sum())
        indices = 4 * (4 * nnzb + out_features // 16 + in_features // 16 + 2)
        assert (c.dense_bytes, c.stored_bytes) == (4 * out_features * in_features, nnzb * 16 * 16 * 4 + indices)


def test_a_wrapper_tensor_counts_the_tensors_inside_it():
    from torch.testing._internal.two_tensor import TwoTensor  # a tensor subclass built like 2:4's compressed weight

    from prunekit.kernels.convert import stored_bytes

    layer = nn.Linear(8, 4, bias=False)
    layer.weight = nn.Parameter(TwoTensor(torch.zeros(4, 8), torch.zeros(4, 8)))
    assert stored_bytes(layer) == 2 * 4 * 8 * 4  # both inner tensors, not one of the dense shape


def test_auto_swaps_only_where_sparse_beats_dense_and_falls_back_per_batch(pruned, monkeypatch):
    before = logits(pruned)
    seconds = {}

    def measure(fn, device):
        rows = fn().shape[0]
        name = measure.current
        return seconds.get(name, lambda rows: 9.0)(rows)  # a backend another test registered: slow

    # torch's BSR "wins" at one row, loses at 512; dense is 1.0 everywhere
    seconds.update({"dense": lambda rows: 1.0, "torch": lambda rows: 0.5 if rows == 1 else 2.0})
    original = dispatch.choose

    def choose(problem, candidates, device, **kw):
        wrapped = {}
        for name, fn in candidates.items():
            def run(fn=fn, name=name):
                measure.current = name
                return fn()
            wrapped[name] = run
        return original(problem, wrapped, device, **kw)

    monkeypatch.setattr(dispatch, "measure", lambda fn, device: measure(fn, device))
    monkeypatch.setattr(dispatch, "choose", choose)
    report = convert(pruned, rows=(1, 512))
    assert report.converted == 14 and all(c.choices == {1: "torch", 512: "dense"} for c in report)
    layer = pruned.model.layers[1].self_attn.q_proj
    assert isinstance(layer, BlockSparseLinear) and layer.backend == "auto"
    assert layer.choose(torch.randn(1, 32)) == "torch" and layer.choose(torch.randn(300, 32)) == "dense"
    torch.testing.assert_close(logits(pruned), before, rtol=1e-4, atol=1e-4)  # 24 rows: measured now, dense


@pytest.mark.parametrize("keep_dense", [False, True])
def test_keep_dense_holds_the_dense_weight_where_auto_runs_dense_and_the_report_counts_it(pruned, monkeypatch, keep_dense):
    masks = {name: keep.clone() for name, keep in prunekit.masks(pruned).items()}
    before = logits(pruned)

    def timings(candidates, device, mode="eager", **_):  # a sparse path wins at one row, dense at 512
        rows = candidates["dense"]().shape[0]
        return {name: 1.0 if name == "dense" else 0.5 if rows == 1 else 2.0 for name in candidates}, {}

    monkeypatch.setattr(dispatch, "timings", timings)
    report = convert(pruned, rows=(1, 512), keep_dense=keep_dense)
    assert report.converted == 14
    for c in report:
        layer = pruned.get_submodule(c.name)
        assert c.choices[512] == "dense" and layer.keep_dense == keep_dense
        out_features, in_features = c.shape
        nnzb = int(masks[c.name].view(out_features // 16, 16, in_features // 16, 16).any(3).any(1).sum())
        blocks = nnzb * 16 * 16 * 4 + 4 * (4 * nnzb + out_features // 16 + in_features // 16 + 2)
        assert c.stored_bytes == blocks + (c.dense_bytes if keep_dense else 0)
        assert c.copy_bytes == (c.dense_bytes if keep_dense else 0)
    assert ("of that is the dense weight 14 layers keep where they run dense" in report.summary()) == keep_dense
    torch.testing.assert_close(logits(pruned), before, rtol=1e-4, atol=1e-4)


def test_auto_leaves_a_layer_dense_when_nothing_beats_it(pruned, monkeypatch):
    monkeypatch.setattr(dispatch, "measure", lambda fn, device: 1.0 if fn().dtype else 0)  # all tie: dense wins
    report = convert(pruned, rows=(1,))
    assert report.converted == 0 and all(c.became == "dense" for c in report)
    assert isinstance(pruned.model.layers[0].mlp.up_proj, nn.Linear)
    assert "dense" in str(report) and "up_proj" in str(report)


def test_dispatch_needs_a_margin_records_failures_and_caches(monkeypatch):
    times = {"dense": 1.0, "a": 0.97, "b": 0.5}
    calls = []

    def measure(fn, device):
        name = fn()
        calls.append(name)
        return times[name]

    monkeypatch.setattr(dispatch, "measure", measure)
    problem = dispatch.Problem.of("bsr", (8, 8), 16, 0.33, torch.float32, torch.device("cpu"), 5)
    assert problem.rows == 8 and problem.density == 0.35
    cpu = torch.device("cpu")
    near = dispatch.choose(problem, {"dense": lambda: "dense", "a": lambda: "a"}, cpu)
    assert near.winner == "dense"  # 3% faster is within the margin: not worth the risk of being slower
    other = dispatch.Problem.of("bsr", (8, 8), 16, 0.33, torch.float32, cpu, 9)

    def broken():
        raise RuntimeError("no kernel")

    choice = dispatch.choose(other, {"dense": lambda: "dense", "b": lambda: "b", "c": broken}, cpu)
    assert choice.winner == "b" and "no kernel" in choice.errors["c"]
    calls.clear()
    assert dispatch.choose(other, {"dense": lambda: "dense"}, cpu) is choice and calls == []
    with pytest.raises(ValueError, match="must include 'dense'"):
        dispatch.choose(dispatch.Problem.of("bsr", (1, 1), 16, 1, torch.float32, cpu, 1), {"x": lambda: 0}, cpu)


def test_explicit_backends_are_checked_before_any_swap(pruned):
    before = logits(pruned)
    with pytest.raises(PrunekitError, match="cuda_ext runs on CUDA devices"):
        convert(pruned, backend="cuda_ext")
    with pytest.raises(PrunekitError, match="its mask is not 2:4"):
        convert(pruned, backend="semi_structured")
    with pytest.raises(PrunekitError, match="unknown backend 'fast'"):
        convert(pruned, backend="fast")
    with pytest.raises(PrunekitError, match="block must be one of"):
        convert(pruned, backend="cupy", block=8)
    with pytest.raises(PrunekitError, match="keep_dense must be True or False, got 'yes'"):
        convert(pruned, keep_dense="yes")
    assert not any(isinstance(m, BlockSparseLinear) for m in pruned.modules())
    torch.testing.assert_close(logits(pruned), before)
    with pytest.raises(PrunekitError, match="no masked Linear"):
        convert(tiny("llama"))


def test_float16_on_the_cpu_stays_dense_and_2_4_needs_a_gpu():
    model = tiny("llama").to(torch.float16)
    prunekit.prune(model, "2:4", importance="magnitude", progress=False)
    keep = model.model.layers[0].mlp.up_proj.prune_mask
    assert is_2_4(keep) and not is_2_4(torch.ones_like(keep))
    report = convert(model)  # no sparse path for fp16 on a CPU: nothing is measured, nothing swapped
    assert report.converted == 0 and all(c.pattern == "2:4" and not c.choices for c in report)
    with pytest.raises(PrunekitError, match="2:4 semi-structured sparsity runs on CUDA devices"):
        convert(model, backend="semi_structured")
    with pytest.raises(PrunekitError, match="take float32 or bfloat16 weights, not torch.float16"):
        convert(model, backend="cpu")
    with pytest.raises(PrunekitError, match="runs on CUDA devices"):
        SemiStructuredLinear(model.model.layers[0].mlp.up_proj.weight.detach(), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_matches_the_masked_dense_product_on_a_gpu():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 128, generator=g)
    keep = torch.zeros(128, 32, 4, dtype=torch.bool)
    keep[..., :2] = True
    weight = (weight * keep.view(128, 128)).half().cuda()
    layer = SemiStructuredLinear(weight, None, backend="semi_structured")
    x = torch.randn(64, 128, generator=g).half().cuda()
    torch.testing.assert_close(layer(x).float(), (x.float() @ weight.float().t()), rtol=2e-3, atol=2e-2)


def _timed(table):
    """dispatch.timings with given seconds per candidate and row count, for the choice logic on a GPU."""
    def timings(candidates, device, mode="eager", **_):
        rows = candidates["dense"]().shape[0]
        return {name: table[name](rows) for name in candidates}, {}
    return timings


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_block_layer_that_runs_dense_keeps_no_dense_copy_on_a_gpu_unless_asked():
    linear = nn.Linear(256, 512, device="cuda", dtype=torch.float16)
    keep = torch.rand(512 // 32, 1, 256 // 32, 1, device="cuda") < 0.3
    layer = BlockSparseLinear.from_dense(linear, keep.expand(-1, 32, -1, 32).reshape(512, 256), 32, "dense")
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    expected = F.linear(x, layer.layout.scatter(layer.values.detach()), layer.bias)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == held  # the dense weight it ran on went back to the allocator
    layer.keep_dense = True  # unless asked to keep it: then it holds the dense bytes, once
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer(x), expected)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - held == 512 * 256 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_2_4_layer_keeps_its_dense_copy_only_where_dense_runs_and_counts_it(monkeypatch):
    from prunekit.kernels.convert import stored_bytes

    keep = torch.zeros(256, 64, 4, dtype=torch.bool)
    keep[..., 1:3] = True
    weight = (torch.randn(256, 256) * keep.view(256, 256)).half().cuda()
    monkeypatch.setattr(dispatch, "timings", _timed({"dense": lambda rows: 1.0,
                                                      "semi_structured": lambda rows: 0.5 if rows > 8 else 2.0}))
    layer = SemiStructuredLinear(weight, None)
    compressed = stored_bytes(layer)
    assert compressed < 0.6 * weight.numel() * 2  # half the values and their 2-bit positions, not the dense shape
    x = torch.randn(16, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        assert layer.choose(x) == "semi_structured" and layer.dense_copy is None  # built to time dense, then dropped
        assert layer.choose(x[:1]) == "dense" and stored_bytes(layer) == compressed + weight.numel() * 2
        assert layer.choose(x) == "semi_structured" and layer.dense_copy is not None  # one row will run dense again
        torch.testing.assert_close(layer(x[:1]).float(), x[:1].float() @ weight.float().t(), rtol=2e-3, atol=2e-2)
    assert "dense_copy" not in layer.state_dict()
    with pytest.raises(PrunekitError, match="always keeps its dense weight"):
        layer.keep_dense = False


@pytest.mark.parametrize("granularity", ["unstructured", "block16x16"])
def test_a_model_converted_for_the_cpu_kernels_compiles_to_one_graph(granularity):
    """torch.compile(fullgraph=True) of a converted model: every compressed layer is an operator call in one graph
    (before, the kernels' raw pointers broke it at each layer: 18 graphs for this model), with the eager logits."""
    model = tiny("llama")
    prunekit.prune(model, Budget(sparsity=0.5, granularity=granularity), importance="magnitude", progress=False)
    report = convert(model, backend="cpu")
    assert report.converted > 0
    eager = logits(model)
    torch._dynamo.reset()
    torch.testing.assert_close(logits(torch.compile(model, fullgraph=True)), eager)


def test_gpt2_conv1d_layers_convert_and_revert():
    model = tiny("gpt2")
    prunekit.prune(model, Budget(sparsity=0.5, granularity="block16x16"), importance="magnitude", progress=False)
    before = logits(model)
    report = convert(model, backend="torch")
    assert report.converted == 8
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-4)
    revert(model)
    from transformers.pytorch_utils import Conv1D

    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=1e-5)


def test_choose_block_reads_the_tile_size_from_the_mask():
    tiles = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    assert choose_block(tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)) == 32
    assert choose_block(tiles.repeat_interleave(16, 0).repeat_interleave(16, 1)) == 16
    assert choose_block(torch.rand(128, 128, generator=torch.Generator().manual_seed(1)) < 0.5) == 64
    with pytest.raises(PrunekitError, match="does not fit the weight"):
        BlockSparseLinear.from_dense(nn.Linear(8, 4), torch.ones(8, 4, dtype=torch.bool))
    assert "unknown backend" in backends.unavailable("nope", torch.device("cpu"), torch.float32, 16)
