"""The dispatch's choice logic with injected timings (so that it is checked without a GPU): modes, device keys, the
margin, and the kernel plan the thin CUDA operator caches per batch-size bucket."""
import dataclasses
import functools
import re
from pathlib import Path

import pytest
import torch

from conftest import compiles_to_one_graph
from prunekit.errors import PrunekitError
from prunekit.kernels import dispatch
from prunekit.kernels import launch as plan
from prunekit.kernels.layout import BlockLayout
from prunekit.kernels.native import SCHEMA, Native, stand_in

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh():
    dispatch.forget()
    yield
    dispatch.forget()
    dispatch.set_mode("eager")


def problem(rows=1, mode="eager"):
    return dataclasses.replace(dispatch.Problem.of("bsr", (4096, 4096), 32, 0.3, torch.bfloat16, CPU, rows), mode=mode)


def injected(monkeypatch, eager: dict, graph: dict, capture_fails=()):
    """Timings per candidate name: `eager` for bursts of eager calls, `graph` for graph replays."""
    monkeypatch.setattr(dispatch, "measure", lambda fn, device: eager[fn()])

    def graphed(fn, device):
        name = fn()
        if name in capture_fails:
            raise RuntimeError(f"{name} synchronises the host and cannot be captured")
        return lambda: graph[name]

    monkeypatch.setattr(dispatch, "graphed", graphed)


def candidates(*names):
    return {name: (lambda name=name: name) for name in names}


def test_the_choice_follows_the_mode_it_was_measured_in(monkeypatch):
    # the H200 probe at one row, 70% of 32x32 blocks: eager wall 23.3 / 71.8 us, graph replay 10.6 / 5.3 us
    injected(monkeypatch, eager={"dense": 23.3e-6, "cuda_ext": 71.8e-6}, graph={"dense": 10.6e-6, "cuda_ext": 5.3e-6})
    eager = dispatch.choose(problem(), candidates("dense", "cuda_ext"), CPU)
    graph = dispatch.choose(problem(mode="graph"), candidates("dense", "cuda_ext"), CPU)
    assert eager.winner == "dense" and graph.winner == "cuda_ext"
    assert graph.seconds == {"dense": 10.6e-6, "cuda_ext": 5.3e-6}
    assert set(dispatch.decisions()) == {problem(), problem(mode="graph")}  # both kept, neither overwrote the other


def test_graph_mode_excludes_what_cannot_be_captured_and_keeps_the_margin(monkeypatch):
    injected(monkeypatch, eager={"dense": 1.0, "torch": 0.5, "cuda_ext": 0.97},
             graph={"dense": 1.0, "torch": 0.1, "cuda_ext": 0.96}, capture_fails=("torch",))
    graph = dispatch.choose(problem(mode="graph"), candidates("dense", "torch", "cuda_ext"), CPU)
    assert graph.winner == "dense" and "cannot be captured" in graph.errors["torch"]  # 4% faster: within the margin
    assert dispatch.choose(problem(), candidates("dense", "torch", "cuda_ext"), CPU).winner == "torch"


def test_dense_that_cannot_be_captured_is_an_error(monkeypatch):
    injected(monkeypatch, eager={}, graph={"x": 1.0}, capture_fails=("dense",))
    with pytest.raises(RuntimeError, match="cannot be captured"):
        dispatch.choose(problem(mode="graph"), candidates("dense", "x"), CPU)


def test_before_runs_ahead_of_every_sample_and_never_of_a_warm_up(monkeypatch):
    events = []
    monkeypatch.setattr(dispatch, "measure", lambda fn, device: (fn(), events.append("sample"), 1.0)[2])
    found = {name: (lambda name=name: events.append(name)) for name in ("dense", "cpu")}
    dispatch.timings(found, CPU, min_seconds=0, before=lambda: events.append("evict"))
    assert events[:4] == ["dense", "cpu"] * 2  # the two warm-up calls each, nothing evicted
    assert events[4:] == ["evict", "dense", "sample", "evict", "cpu", "sample"] * 3


def test_a_floor_is_sampled_in_turns_after_the_rounds_and_is_the_least_a_candidate_is_credited(monkeypatch):
    """On a GPU a layer timed alone keeps its weights in L2, where a model's layers read them from memory: each
    candidate's time is at least the median of FLOOR_SAMPLES samples of `floor` (pick: cold_device), taken in turns
    after the rounds. Here the kernel replays at half of dense's time in cache but not from memory, and loses."""
    monkeypatch.setattr(dispatch, "measure", lambda fn, device: {"dense": 1.0, "cuda_ext": 0.5}[fn()])
    floors, sampled = {"dense": [0.9, 0.2, 0.95], "cuda_ext": [0.99, 0.98, 5.0]}, []

    def floor(fn):
        name = fn()
        sampled.append(name)
        return floors[name][sampled.count(name) - 1]

    seconds, _ = dispatch.timings(candidates("dense", "cuda_ext"), CPU, min_seconds=0, floor=floor)
    assert sampled == ["dense", "cuda_ext"] * dispatch.FLOOR_SAMPLES
    assert seconds == {"dense": 1.0, "cuda_ext": 0.99}  # medians: 0.9 under dense's 1.0; 0.99 over 0.5
    sampled.clear()
    assert dispatch.choose(problem(), candidates("dense", "cuda_ext"), CPU, floor=floor).winner == "dense"
    assert dispatch.choose(problem(rows=4), candidates("dense", "cuda_ext"), CPU).winner == "cuda_ext"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_layer_is_timed_with_its_weight_from_memory():
    """cold_device flushes the L2 before the call it times: a 16 MiB bf16 weight, which an H100's or H200's L2
    holds, then takes longer than it does timed the same way in cache, and at least its bytes at 6 TB/s (above
    an H200's 4.8)."""
    weight = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    call = lambda: torch.nn.functional.linear(x, weight)
    cold = sorted(dispatch.cold_device(weight.device)(call) for _ in range(5))[2]

    def in_cache() -> float:  # (the same timing without the flush)
        call()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(dispatch.SLEEP_CYCLES)
        begin.record()
        call()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    hot = sorted(in_cache() for _ in range(5))[2]
    assert weight.nbytes / 6e12 < cold < 1e-3 and hot < cold


def test_the_cpu_times_a_layer_with_its_own_tensors_evicted_before_each_sample(monkeypatch):
    """In a model, a layer's weights come from memory; timed alone they would sit in the cache (flattering dense,
    which reads the most bytes). Each sample on the CPU starts with the layer's tensors flushed: its compressed
    weight, index and bias, and the dense copy a kept layer times dense on, made in the warm-up."""
    from prunekit.kernels import BitmaskLinear, cpu

    flushed = []
    monkeypatch.setattr(cpu, "evict", lambda tensors: flushed.append({t.data_ptr() for t in tensors}) or True)
    samples = []
    monkeypatch.setattr(dispatch, "measure", lambda fn, device: (fn(), samples.append(1), 1.0)[2])
    linear, keep = torch.nn.Linear(64, 32), torch.rand(32, 64) > 0.5
    layer = BitmaskLinear.from_dense(linear, keep, "auto", keep_dense=True).requires_grad_(False)
    with torch.no_grad():
        layer.choose(torch.randn(1, 64))
    assert layer.dense_copy is not None  # a tie: dense won, so the copy made in the warm-up stays
    own = {layer.values.data_ptr(), layer.bitmask.data_ptr(), layer.row_offsets.data_ptr(), layer.bias.data_ptr(),
           layer.dense_copy.data_ptr()}
    assert len(flushed) == len(samples) >= 6 and len(samples) % 2 == 0
    assert flushed == [own] * len(samples)


def test_mode_is_set_scoped_and_checked():
    assert dispatch.current_mode() == "eager"
    with dispatch.mode("graph"):
        assert dispatch.current_mode() == "graph"
        assert dispatch.Problem.of("bsr", (8, 8), 16, 1, torch.float32, CPU, 1).mode == "eager"  # no graphs on a CPU
    assert dispatch.current_mode() == "eager"
    with pytest.raises(ValueError, match="unknown dispatch mode 'compiled'"):
        dispatch.set_mode("compiled")


def test_pick_remembers_per_mode_on_the_module(monkeypatch):
    seen = []
    monkeypatch.setattr(dispatch, "_mode_on", lambda cuda: dispatch.current_mode())  # as on a GPU

    def choose(problem, found, device, **_):
        seen.append(problem.mode)
        return dispatch.Choice("cuda_ext" if problem.mode == "graph" else "dense")

    monkeypatch.setattr(dispatch, "choose", choose)
    module, x = torch.nn.Module(), torch.randn(1, 8)
    assert dispatch.pick(module, x, "bsr", (8, 8), 16, 1.0, lambda x2: {}) == "dense"
    with dispatch.mode("graph"):
        assert dispatch.pick(module, x, "bsr", (8, 8), 16, 1.0, lambda x2: {}) == "cuda_ext"
    assert dispatch.pick(module, x, "bsr", (8, 8), 16, 1.0, lambda x2: {}) == "dense"
    assert seen == ["eager", "graph"]  # the third call was the module's memo


def test_a_gpu_is_one_key_with_or_without_its_index(monkeypatch):
    """The benchmark looked its choice up under torch.device("cuda") while the layer recorded it under the input's
    "cuda:0": a KeyError on the H200. Both name the same GPU now."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    of = lambda device: dispatch.Problem.of("bsr", (8, 8), 16, 1, torch.bfloat16, torch.device(device), 3)
    assert of("cuda") == of("cuda:0") and of("cuda").device == "cuda:0:NVIDIA H200"
    assert of("cuda:1") != of("cuda:0")


def test_the_operator_plan_is_the_planner_s_for_every_row_count_of_a_bucket():
    """The thin operator takes the kernel once per batch-size bucket and number of block rows: that must be the
    kernel, tile and split the planner chooses for each row count inside the bucket (past 2048 rows, where tc's tiles
    of 256 begin at 1025), on layers whose one-row kernel splits block rows 4, 2 and 1 ways, and on 128 block rows,
    where bt's split counted the rows' tiles and so changed inside the bucket of 64 (2 ways at 33 rows, 1 at 64)."""
    names = sorted({plan.forward(r, n, b, dt, (9, 0)).name for r in range(1, 2200) for n in (4, 128, 300, 600)
                    for b in (16, 32, 64) for dt in (torch.float32, torch.bfloat16)})
    native = Native("table", launcher=None, capability=lambda device: (9, 0), kernel_index=names.index)
    for b in (16, 32, 64):
        for block_rows in (4, 128, 300, 600):
            layout = BlockLayout.from_mask(torch.ones(block_rows * b, 2 * b, dtype=torch.bool), b)
            for dtype in (torch.float32, torch.bfloat16):
                for rows in range(1, 2200):
                    launch = plan.forward(rows, block_rows, b, dtype, (9, 0))
                    x = torch.empty(rows, 0, dtype=dtype)  # (only its rows, dtype and device are read)
                    kernel, tile, threads, split = native.operator_plan(x, None, layout, None)
                    assert (names[kernel], threads) == (launch.name, launch.block[0])
                    assert -(-rows // tile) == launch.grid[1] and block_rows * split == launch.grid[0]


def test_few_block_rows_are_split_among_more_thread_blocks():
    """About launch.THREAD_BLOCKS thread blocks in all: at one row 4096 outputs in 32-wide blocks (the H200's 1.9x
    layer) get four a block row, 11008 (its 3.7x layer) two, wider layers and 16-wide blocks none; bt counts its row
    tiles too and splits 32-wide blocks at most in two."""
    ways = lambda rows, out_features, b: plan.forward(rows, -(-out_features // b), b, torch.bfloat16, (9, 0)).split
    assert (ways(1, 4096, 32), ways(1, 11008, 32), ways(1, 32768, 32)) == (4, 2, 1)
    assert (ways(1, 4096, 64), ways(1, 11008, 64), ways(1, 4096, 16)) == (4, 4, 1)
    assert (ways(16, 4096, 32), ways(16, 4096, 64), ways(64, 4096, 64), ways(64, 11008, 32)) == (2, 4, 2, 1)
    assert plan.forward(2, 128, 32, torch.float32, (9, 0)).split == 1  # fp32's 4- and 16-row tiles do not split
    one, bt = plan.forward(1, 128, 32, torch.bfloat16, (9, 0)), plan.forward(16, 64, 64, torch.bfloat16, (9, 0))
    assert (one.name, one.grid, bt.name, bt.grid) == ("pk_skinny_bf16_b32_m1_s4", (512, 1, 1), "pk_bt_bf16_b64_s4",
                                                      (256, 1, 1))


GRAPH = {"pk_tc_bf16_b64_m128_n": 4.0, "pk_tc_bf16_b64_m256_n": 3.0, "pk_tcw_bf16_b64_m128": 2.0,
         "pk_tcw_bf16_b64_m256": 1.0}  # graph-mode seconds of the tc and tcw variants (tcw 256 will fail to run)


def tuning(monkeypatch, floor: dict):
    """A recording backend on an sm_90 "GPU" whose variants replay in GRAPH's times (eager: the other way round), tcw
    at 256 rows failing to run, and whose device time with L2 flushed is `floor`'s (0 where absent); returns
    (native, the launches so far, run(rows), busy: a flag standing for a graph being captured, its values, layout)."""
    from prunekit.kernels import native as native_module

    launched = []
    native = Native("recorder", lambda name, grid, block, params, stream: launched.append((name, grid)),
                    capability=lambda device: (9, 0), stream=lambda device: 0, wgmma=lambda device: True)

    def graphed(fn, device):
        fn()
        name = launched[-1][0]
        if name == "pk_tcw_bf16_b64_m256":
            raise RuntimeError("launch failed")  # the fastest, but it does not run: not chosen
        return lambda: GRAPH[name]

    def measure(fn, device):
        fn()
        return 5.0 - GRAPH[launched[-1][0]]

    busy = [False]
    monkeypatch.setattr(dispatch, "graphed", graphed)
    monkeypatch.setattr(dispatch, "measure", measure)
    monkeypatch.setattr(dispatch, "cold_device", lambda device: lambda fn: (fn(), floor.get(launched[-1][0], 0))[1])
    monkeypatch.setattr(native_module, "tunes", lambda x: True)
    monkeypatch.setattr(dispatch, "busy", lambda: busy[0])
    layout = BlockLayout.from_mask(torch.ones(4 * 64, 2 * 64, dtype=torch.bool), 64)
    values = torch.zeros(layout.nnzb, 64, 64, dtype=torch.bfloat16)
    run = lambda rows: native.forward(torch.zeros(rows, 128, dtype=torch.bfloat16), values, layout, None)
    return native, launched, run, busy, values, layout


def test_a_gpu_tunes_the_kernel_once_per_bucket_to_the_fastest_variant_as_graphs_replay(monkeypatch):
    """On a GPU the first forward of a batch-size bucket times every variant of the planned kernel (here tc and tcw,
    tiles of 128 and 256 rows) in graph mode and keeps the fastest that runs, for every row count of the bucket and
    for the thin operator too; it waits while a graph is captured, and dispatch.forget() forgets it. Eager timings
    rank the variants the other way round, so tuning in the wrong mode fails here."""
    native, launched, run, busy, values, layout = tuning(monkeypatch, floor={})
    run(300)
    assert {name for name, _ in launched} == set(GRAPH) and launched[-1] == ("pk_tcw_bf16_b64_m128", (4, 3, 1))
    launched.clear()
    run(500)  # the same bucket (512 rows): no timing, the tuned kernel over 4 tiles of rows
    assert launched == [("pk_tcw_bf16_b64_m128", (4, 4, 1))]
    names = sorted(GRAPH)
    native.kernel_index = names.index
    x = torch.zeros(400, 128, dtype=torch.bfloat16)
    assert native.operator_plan(x, values, layout, None) == (names.index("pk_tcw_bf16_b64_m128"), 128, 128, 1)
    native.kernel_index = None

    launched.clear()
    busy[0] = True
    run(1100)  # a new bucket while a graph is captured: the planner's kernel, remembered for nothing
    assert launched == [("pk_tc_bf16_b64_m256_n", (4, 5, 1))]
    busy[0] = False
    run(1100)
    assert len(launched) > 2 and launched[-1] == ("pk_tcw_bf16_b64_m128", (4, 9, 1))

    dispatch.forget()
    launched.clear()
    run(300)
    assert len(launched) > 1 and launched[-1][0] == "pk_tcw_bf16_b64_m128"


def test_tuning_holds_each_variant_to_its_device_time_with_the_l2_flushed(monkeypatch):
    """A variant replayed in a loop keeps its weights in L2; in a model they come from memory. Here tcw at 128 rows
    replays fastest (2.0) but takes 3.5 with L2 flushed: tc at 256 rows (3.0) is kept."""
    native, launched, run, *_ = tuning(monkeypatch, floor={"pk_tcw_bf16_b64_m128": 3.5})
    run(300)
    assert launched[-1][0] == "pk_tc_bf16_b64_m256_n"


def test_tuning_is_for_gpus_and_can_be_turned_off(monkeypatch):
    from prunekit.kernels.native import tunes

    assert not tunes(torch.zeros(1))
    cuda = type("FakeCudaTensor", (), {"device": torch.device("cuda")})()
    assert tunes(cuda)
    monkeypatch.setenv("PRUNEKIT_TUNE", "0")
    assert not tunes(cuda)


def standin_operator(calls: list):
    """prunekit::bsr_linear's signature and product (leading dimensions of x are rows), computed densely from the
    blocks it is given, recording each call."""
    def bsr_linear(x, values, row_ptr, col_idx, bias, out_features, kernel, tile_rows, threads, split):
        calls.append((tuple(x.shape), kernel, tile_rows, threads, split))
        b = values.shape[-1]
        weight = torch.zeros((row_ptr.numel() - 1) * b, (int(col_idx.max()) + 1) * b, dtype=values.dtype)
        for r in range(row_ptr.numel() - 1):
            for j in range(int(row_ptr[r]), int(row_ptr[r + 1])):
                c = int(col_idx[j])
                weight[r * b:(r + 1) * b, c * b:(c + 1) * b] = values[j]
        y = x @ weight[:out_features, :x.shape[-1]].t()
        return y if bias is None else y + bias

    return bsr_linear


@functools.lru_cache(maxsize=None)
def standin_library() -> tuple:
    """standin_operator as the torch operator prunekit_test::bsr_linear (once a process), and its record of calls."""
    calls = []
    return stand_in("prunekit_test", standin_operator(calls)), calls


@pytest.fixture
def standin(monkeypatch):
    """(the registered stand-in backend, its calls, the kernel names its indices count)."""
    from prunekit.kernels import backends

    _, calls = standin_library()
    calls.clear()
    names = sorted({v.name for r in (1, 6, 40) for v in plan.variants(r, 3, 32, torch.float32, (9, 0))})
    native = Native("standin", launcher=None, device_type="cpu", capability=lambda device: (9, 0),
                    kernel_index=names.index, operator=torch.ops.prunekit_test.bsr_linear)
    monkeypatch.setitem(backends._loaded, "standin", native)
    return native, calls, names


def ragged_layer(backend: str):
    """(a BlockSparseLinear 90 -> 80 of 32x32 blocks, some pruned, on `backend`; the dense reference x -> y)."""
    from prunekit.kernels.linear import BlockSparseLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(90, 80)
    keep = torch.rand(3, 3).repeat_interleave(32, 0)[:80].repeat_interleave(32, 1)[:, :90] > 0.4
    weight, bias = (linear.weight * keep).detach(), linear.bias.detach()
    return BlockSparseLinear.from_dense(linear, keep, 32, backend=backend), lambda x: x @ weight.t() + bias


def test_the_stand_in_has_the_operators_schema():
    """The stand-in (tests, benchmarks/call_overhead.py) is declared from native.SCHEMA: the same as op.cpp's."""
    source = (Path(__file__).parents[1] / "cuda_ext" / "op.cpp").read_text()
    declared = "".join(re.findall(r'"([^"]*)"', re.search(r"m\.def\(([^;]*)\);", source).group(1)))
    assert declared == SCHEMA
    standin_library()
    assert str(torch.ops.prunekit_test.bsr_linear.default._schema) == "prunekit_test::" + SCHEMA


def test_an_inference_call_after_the_first_is_the_operator_alone(monkeypatch, standin):
    """BlockSparseLinear remembers, per batch-size bucket, a function that is the operator with everything but the
    input fixed (Native.bind), and hands it [batch, tokens, features] as it came: no choice, plan or reshape per call.
    What it remembered goes when the weights, the bias or the backend change, and does not travel with a copy."""
    import copy

    from prunekit.kernels.linear import BlockSparseLinear

    _, calls, names = standin
    module, reference = ragged_layer("standin")
    bias = module.bias.detach().clone()
    x = torch.randn(2, 3, 90)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x))
        launch = plan.forward(6, 3, 32, torch.float32, (9, 0))
        assert calls == [((2, 3, 90), names.index(launch.name), launch.tile, launch.block[0], launch.split)]

        with monkeypatch.context() as m:  # the same bucket (8 rows) again: nothing is chosen or planned
            m.setattr(BlockSparseLinear, "choose", lambda *a: pytest.fail("chose again"))
            m.setattr(Native, "operator_plan", lambda *a: pytest.fail("planned again"))
            seven = torch.randn(7, 90)
            torch.testing.assert_close(module(seven), reference(seven))
            with pytest.raises(PrunekitError, match="input has 91 features, this layer takes 90"):
                module(torch.randn(2, 3, 91))  # (the operator would read past the rows)
        with pytest.raises(PrunekitError, match="input has 91 features, this layer takes 90"):
            module(torch.randn(40, 91))  # nor is it measured on
        assert module(torch.randn(0, 90)).shape == (0, 80)

        twin = copy.deepcopy(module)
        twin.values.mul_(2)
        twin.bias.zero_()
        torch.testing.assert_close(twin(x), 2 * reference(x) - 2 * bias)  # its own tensors, not module's
        torch.testing.assert_close(module(x), reference(x))
        module.bias = torch.nn.Parameter(torch.zeros(80))
        torch.testing.assert_close(module(x), reference(x) - bias)
        calls.clear()
        module.backend = "dense"
        torch.testing.assert_close(module(x), reference(x) - bias)
        assert calls == []

        module.backend = "standin"
        known = dict(dispatch.memo(module, dispatch.RUNS))
        monkeypatch.setattr(dispatch, "busy", lambda: True)  # captured or traced: run, but remember nothing
        forty = torch.randn(40, 90)
        module(forty)
        module(forty)
        assert len(calls) == 2 and dispatch.memo(module, dispatch.RUNS) == known


@pytest.mark.parametrize("warm", [True, False], ids=["after an eager call", "first call compiled"])
def test_a_layer_on_the_operator_compiles_to_one_graph(standin, warm):
    """torch.compile(fullgraph=True) of a BlockSparseLinear whose backend has an operator: one graph, no break,
    whether the layer's run was remembered eagerly first or is built while tracing (not remembered then), and the
    same numbers as eager."""
    module, reference = ragged_layer("standin")
    compiles_to_one_graph(module, reference, torch.randn(2, 3, 90), warm)
    assert bool(dispatch.memo(module, dispatch.RUNS)) == warm


def test_auto_times_each_backend_as_inference_runs_it(monkeypatch, standin):
    """The eager measurement decides between paths whose host costs differ by several microseconds at one row, so
    the sparse candidate is timed as inference runs it, the bound operator (planned once, not per call, and not
    through the autograd function), and the winner is what then runs."""
    from prunekit.kernels import backends

    native, calls, names = standin
    monkeypatch.setattr(backends, "usable", lambda device, dtype, block: ["standin"])
    monkeypatch.setattr(Native, "forward", lambda *a: pytest.fail("timed through the autograd function"))
    planned = []
    monkeypatch.setattr(Native, "operator_plan", lambda self, x, *a: planned.append(x.shape) or (0, 64, 128, 1))

    def timings(candidates, device, mode="eager", **kw):
        assert set(candidates) == {"dense", "standin"}
        for _ in range(3):
            candidates["standin"]()
        assert len(calls) == 3 and len(planned) == 1  # three calls of the operator, one plan
        return {"dense": 1.0, "standin": 0.5}, {}

    monkeypatch.setattr(dispatch, "timings", timings)
    module, reference = ragged_layer("auto")
    x = torch.randn(5, 90)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x))
    assert len(calls) == 4 and planned == [(5, 90), (5, 90)]  # the winner, bound for the module
