"""How a compressed layer runs dense (prunekit/kernels/sparse_layer.py): on a weight rebuilt for each call by default, or
on a copy kept with keep_dense, which follows every change to the compressed weight, is counted and is not saved;
and the dispatch times dense the way the layer runs it."""
import copy

import pytest
import torch
from torch import nn

from conftest import compiles_to_one_graph
from prunekit.errors import PrunekitError
from prunekit.kernels import BitmaskLinear, BlockSparseLinear, SemiStructuredLinear, backends, dispatch
from prunekit.kernels.convert import stored_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
KINDS = ("bitmask", "block")


@pytest.fixture(autouse=True)
def fresh():
    dispatch.forget()
    yield
    dispatch.forget()


def masked_linear(kind: str):
    """(an nn.Linear 96 -> 64, its keep-mask: unstructured for the bitmask, 32x32 blocks for the block layout)."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 64)
    if kind == "bitmask":
        return linear, torch.rand(64, 96) > 0.6
    return linear, (torch.rand(2, 3) > 0.4).repeat_interleave(32, 0).repeat_interleave(32, 1)


def layer(kind: str, keep_dense: bool, backend: str = "dense"):
    linear, keep = masked_linear(kind)
    if kind == "bitmask":
        return BitmaskLinear.from_dense(linear, keep, backend, keep_dense=keep_dense)
    return BlockSparseLinear.from_dense(linear, keep, 32, backend, keep_dense=keep_dense)


def reference(kind: str):
    linear, keep = masked_linear(kind)
    weight, bias = (linear.weight * keep).detach(), linear.bias.detach()
    return weight, lambda x: x @ weight.t() + bias


@pytest.mark.parametrize("kind", KINDS)
def test_the_dense_weight_is_kept_only_when_asked_counted_and_not_saved(kind):
    weight, expected = reference(kind)
    lean, kept = layer(kind, False), layer(kind, True)
    small = stored_bytes(lean)
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(lean(x), expected(x))
        torch.testing.assert_close(kept(x), expected(x))
    assert lean.dense_copy is None and stored_bytes(lean) == small
    assert torch.equal(kept.dense_copy, weight) and stored_bytes(kept) == small + weight.numel() * 4
    assert "dense_copy" not in kept.state_dict() and "keep_dense=True" in repr(kept)
    assert "keep_dense" not in repr(lean)
    with pytest.raises(PrunekitError, match="keep_dense must be True or False"):
        kept.keep_dense = "yes"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_a_trainable_bias_beside_frozen_weights_gets_its_gradient(kind, backend):
    """Fine-tuning only the biases (BitFit) of a converted model: the bitmask layer ran its kernel, which has no
    backward, whenever its values were frozen, so the bias silently got no gradient."""
    weight, _ = reference(kind)
    sparse = layer(kind, False, backend)
    sparse.values.requires_grad_(False)
    x = torch.randn(5, 96)
    y = sparse(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(y, x @ weight.t() + sparse.bias.detach())
    torch.testing.assert_close(sparse.bias.grad, dy.sum(0))
    assert sparse.values.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_remembered_kernel_run_reads_no_parameter_and_follows_every_change(monkeypatch, kind):
    """A call after the first of a bucket runs the kernel on tensors bound to its run: each read of a parameter or
    buffer goes through nn.Module.__getattr__, about half a microsecond, and decoding makes hundreds of calls per
    token. The run still follows the layer: weights changed in place or given new memory through .data, every bound
    attribute replaced (a new mask), .to() another dtype."""
    sparse = layer(kind, False, "cpu")
    _, expected = reference(kind)
    bias = sparse.bias.detach().clone()
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), expected(x))
        with monkeypatch.context() as m:
            m.setattr(type(sparse), "__getattr__", lambda self, name: pytest.fail(f"read {name} through __getattr__"))
            torch.testing.assert_close(sparse(x), expected(x))
        sparse.values.mul_(2)
        torch.testing.assert_close(sparse(x), 2 * (expected(x) - bias) + bias)
        sparse.values.data = sparse.values.data / 2  # (new memory under the same Parameter)
        torch.testing.assert_close(sparse(x), expected(x))

        linear, keep = masked_linear(kind)
        other = type(sparse).from_dense(linear, ~keep, *(() if kind == "bitmask" else (32,)), "cpu")
        for name in type(sparse).BINDS:
            setattr(sparse, name, getattr(other, name))
        torch.testing.assert_close(sparse(x), x @ (linear.weight * ~keep).t() + linear.bias)

        sparse.to(torch.bfloat16)
        torch.testing.assert_close(sparse(x.bfloat16()), other(x.bfloat16()))
        assert sparse(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("keep_dense", [False, True])
def test_frozen_layers_pass_the_input_gradient_through_two_of_them(kind, keep_dense):
    """Gradients through frozen compressed layers (an adapter or a prompt trained before them): the block layer ran
    dense on the workspace every layer shares, autograd kept it for the input's gradient, and the next layer's call
    overwrote it (a RuntimeError at backward). Two layers on the dense path, against the masked dense product."""
    weight, _ = reference(kind)
    first, second = layer(kind, keep_dense, "dense"), layer(kind, keep_dense, "dense")
    for module in (first, second):
        module.values.requires_grad_(False)
    bias = first.bias.detach()
    with torch.no_grad():  # the second maps 96 -> 64: feed it through a 64 -> 96 view of the first's output
        lift = torch.randn(64, 96)
    x = torch.randn(5, 96, requires_grad=True)
    second(first(x) @ lift).sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    (((reference_x @ weight.t() + bias) @ lift) @ weight.t() + bias).sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_the_kept_copy_follows_every_change_to_the_weights(kind):
    """An in-place change, an optimizer step (masked, after a differentiable forward that does not use the copy), a
    load_state_dict, a new values tensor and a deep copy: each time the kept layer computes what the lean one, which
    rebuilds its weight for every call, computes."""
    lean, kept = layer(kind, False), layer(kind, True)
    x = torch.randn(5, 96)

    def agree():
        with torch.no_grad():
            torch.testing.assert_close(kept(x), lean(x), rtol=0, atol=0)

    agree()
    with torch.no_grad():
        for module in (lean, kept):
            module.values.mul_(2)
    agree()
    for module in (lean, kept):  # a training step on each, from the same weights and input
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
        module(x).square().sum().backward()
        optimizer.step()
    agree()
    other = layer(kind, False).state_dict()
    lean.load_state_dict(other)
    kept.load_state_dict(other)
    agree()
    for module in (lean, kept):  # a new tensor (where the old one's id may come round again)
        module.values = nn.Parameter(module.values.detach() * 3)
    agree()
    twin = copy.deepcopy(kept)
    with torch.no_grad():
        twin.values.zero_()
        torch.testing.assert_close(twin(x), twin.bias.expand(5, -1))  # its own tensors, not kept's copy
    agree()


def test_auto_times_dense_as_the_layer_runs_it_and_keeps_a_copy_only_where_dense_won(monkeypatch):
    """A sparse path that wins at one row and loses at 16. The kept layer's copy, built to time dense, is dropped where
    the sparse path won and stays once a batch size runs dense; a lean layer of the same shape is measured apart
    (dense costs it the rebuild), a kept layer that reuses a measurement makes its copy all the same, and changing
    keep_dense forgets what the layer chose."""
    monkeypatch.setattr(backends, "usable", lambda device, dtype, block: ["torch"])
    measured = []

    def timings(candidates, device, mode="eager", **_):
        rows = candidates["dense"]().shape[0]
        measured.append((rows, sorted(candidates)))
        return {"dense": 1.0, "torch": 0.5 if rows == 1 else 2.0}, {}

    monkeypatch.setattr(dispatch, "timings", timings)
    kept, lean = layer("block", True, "auto"), layer("block", False, "auto")
    one, many = torch.randn(1, 96), torch.randn(16, 96)
    with torch.no_grad():
        assert kept.choose(one) == "torch" and kept.dense_copy is None
        assert kept.choose(many) == "dense" and kept.dense_copy is not None
        assert kept.choose(one) == "torch" and kept.dense_copy is not None  # 16 rows will run dense again
        assert lean.choose(many) == "dense" and lean.dense_copy is None
        other = layer("block", True, "auto")  # the kept layer's measurement, reused: its copy is made all the same
        assert other.choose(many) == "dense" and other.dense_copy is not None
    assert measured == [(1, ["dense", "torch"]), (16, ["dense", "torch"]), (16, ["dense", "torch"])]
    assert sorted(p.dense for p in dispatch.decisions()) == ["kept", "kept", "rebuilt"]
    kept.keep_dense = False
    assert kept.dense_copy is None and not dispatch.memo(kept) and not dispatch.memo(kept, dispatch.RUNS)
    with torch.no_grad():
        assert kept.choose(many) == "dense" and kept.dense_copy is None  # the lean layer's measurement
    assert len(measured) == 3


def test_no_copy_is_made_while_a_cuda_graph_is_captured(monkeypatch):
    """Captured kernels do not run until the graph replays, so a copy made during capture would hold no weights for
    the eager calls after it: the layer runs on a weight built for the graph, and makes its copy on an eager call."""
    kept = layer("block", True)
    _, expected = reference("block")
    x = torch.randn(5, 96)
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(dispatch, "busy", lambda: True)
        torch.testing.assert_close(kept(x), expected(x))
        assert kept.dense_copy is None
    with torch.no_grad():
        torch.testing.assert_close(kept(x), expected(x))
    assert kept.dense_copy is not None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["cpu", "dense"])
@pytest.mark.parametrize("warm", [True, False], ids=["after an eager call", "first call compiled"])
def test_a_layer_on_the_cpu_kernel_or_rebuilt_dense_compiles_to_one_graph(kind, backend, warm):
    """The CPU kernels take raw pointers, which torch.compile cannot follow: in a compiled graph the layer calls its
    product as an operator (prunekit_cpu::bitmask_linear, ::block_linear) and decompresses with torch ops, so a
    compiled model is one graph, not one between every two compressed layers. Eager calls skip the operator's
    dispatcher."""
    compiles_to_one_graph(layer(kind, False, backend), reference(kind)[1], torch.randn(2, 3, 96), warm)


def test_auto_says_to_run_eagerly_first_where_a_whole_graph_is_compiled_before_it_measured():
    """Auto measures on a layer's first call at a batch size, which a trace cannot do: compiled with fullgraph=True
    before any eager call, the error says so (it was dynamo's "Unsupported method call"); without fullgraph the
    measurement runs eagerly between graphs, as before."""
    sparse = layer("bitmask", False, "auto")
    x = torch.randn(2, 3, 96)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="run the model once eagerly at this batch size"):
        torch.compile(sparse, fullgraph=True)(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(sparse)(x), reference("bitmask")[1](x))
    assert dispatch.decisions()


@pytest.mark.parametrize("warm", [True, False], ids=["after an eager call", "first call compiled"])
def test_a_kept_dense_layer_compiles_to_one_graph(warm):
    kept = layer("block", True)
    compiles_to_one_graph(kept, reference("block")[1], torch.randn(2, 3, 96), warm)
    assert (kept.dense_copy is not None) == warm  # a trace uses a copy that is there, and stores none


@pytest.mark.parametrize("kind", KINDS)
def test_a_call_after_the_first_of_a_bucket_chooses_nothing(monkeypatch, kind):
    """Inference remembers per backend setting and batch-size bucket what runs; a copy remembers nothing of it."""
    monkeypatch.setattr(backends, "usable", lambda device, dtype, block: ["torch"])
    monkeypatch.setattr(dispatch, "timings", lambda candidates, device, mode="eager", **_: (
        {name: 1.0 if name == "dense" else 0.5 for name in candidates}, {}))
    auto = layer(kind, False, "auto")
    _, expected = reference(kind)
    x = torch.randn(2, 3, 96)
    with torch.no_grad():
        torch.testing.assert_close(auto(x), expected(x))
        with monkeypatch.context() as m:
            m.setattr(type(auto), "choose", lambda *a: pytest.fail("chose again"))
            five = x.reshape(6, 96)[:5]  # the bucket of six rows
            torch.testing.assert_close(auto(five), expected(five))
            auto.backend = "dense"
            torch.testing.assert_close(auto(x), expected(x))
            auto.backend = "auto"
            torch.testing.assert_close(auto(x), expected(x))
        assert len(dispatch.memo(auto, dispatch.RUNS)) == 2
        assert not dispatch.memo(copy.deepcopy(auto), dispatch.RUNS)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unknown_backend_is_refused_when_made_or_set_and_the_old_one_stays(kind):
    name = type(layer(kind, False)).__name__
    taken = {"bitmask": "auto, cpu, dense", "block": "auto, cuda_ext, cupy, cpu, torch, dense"}[kind]
    with pytest.raises(PrunekitError, match=f"unknown backend 'fast' for a {name}; choose from {taken}$"):
        layer(kind, False, backend="fast")
    made = layer(kind, False)
    with pytest.raises(PrunekitError, match="unknown backend 'fast'"):
        made.backend = "fast"
    assert made.backend == "dense"
    made.backend = "auto"
    assert made.backend == "auto"


def test_a_2_4_layer_checks_its_backend_before_anything_else():  # (and so on a CPU, where it cannot be made)
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0]]).repeat(64, 16)
    with pytest.raises(PrunekitError, match="unknown backend 'cpu' for a SemiStructuredLinear; choose from auto, "
                                            "semi_structured, dense$"):
        SemiStructuredLinear(weight, None, backend="cpu")


def test_a_block_layer_takes_a_backend_registered_after_it_was_made(monkeypatch):
    made = layer("block", False)
    with pytest.raises(PrunekitError, match="unknown backend 'mine'"):
        made.backend = "mine"
    monkeypatch.setattr(backends, "_loaded", {**backends._loaded, "mine": object()})
    made.backend = "mine"
    assert made.backend == "mine"
