"""backend="auto": time every candidate once per problem and keep the fastest, never one slower than dense as the
layer runs dense (sparse_layer.py: on a weight rebuilt per call, the default, which keeps the layer small; or, with
keep_dense, on a kept copy, exactly dense).

On a GPU what is fastest depends on how the model runs. Called eagerly, every layer pays its host-side launch
cost (tens of microseconds through Python), so at one row dense cuBLAS often wins although the sparse kernel is
faster on the device; replayed as a CUDA graph (or compiled), only device time counts. So choices are made per
*mode*: "eager" times bursts of calls by the wall clock, "graph" times replays of a captured CUDA graph. Set the mode
the model will run in before its first forward (`with dispatch.mode("graph"): model(x)` as the warm-up before
capturing); on the CPU there is only "eager".

On the CPU each sample starts with the layer's own tensors flushed from the caches (cpu.evict, clflushopt on x86;
elsewhere they stay): in a model a layer's weights come from memory, since the layers in between push them out,
while a layer timed alone keeps them in cache, which flatters dense, the path that reads the most bytes. Timed in
cache on an Intel host (300 MiB L3), the kept dense copies of SmolLM2's 576x576 and 192x576 projections ran at one
row: the bitmask kernel tied (41.0 against 41.1 us, inside the margin) or lost (20.6 against 17.9), and decoding with
keep_dense fell from 1.39x to 1.2-1.3x dense; flushed, dense took 95 and 37 us and lost. A GPU's L2 cannot be
flushed of one layer's tensors alone, nor between the calls of a burst or a graph, so there each candidate's time is
at least its device time with the whole L2 flushed first (cold_device, a few samples per candidate): a 4096x4096
bf16 weight fits in an H100's or H200's 50 MB L2, where a layer timed alone in a loop keeps it.

A problem is (kind, weight shape, block, stored density to 1/20, dtype, device, torch's CPU thread count, rows rounded
up to a power of two, mode, how dense runs):
layers of one shape and sparsity share one measurement, and a new batch size only costs a measurement when it
falls in a new bucket. Sparse wins only when it beats dense by `MARGIN`, so timing noise can not make a layer
slower than it was dense; what wins depends on the machine (on a 2-core CPU, BSR wins only at small batch and high
sparsity), which is why it is measured and not assumed.
"""
from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

from .launch import bucket  # one definition of the buckets, shared with the kernel planner

MARGIN = 0.95  # sparse must take under 95% of dense's time
MIN_SECONDS = 0.05  # timing per candidate: at least this long ...
MAX_REPEATS = 50  # ... and at most this many rounds after the warm-up
BURST = 10  # GPU calls per sample: a burst (eager) or a captured graph (graph) of this many
FLOOR_SAMPLES = 3  # on a GPU, samples per candidate of its device time with L2 flushed (cold_device)
SLEEP_CYCLES = 1_000_000  # about 0.5 ms of GPU clock: the device waits while the host queues what cold_device times
MODES = ("eager", "graph")


@dataclass(frozen=True)
class Problem:
    kind: str  # "bsr", "bitmask" or "2:4"
    shape: tuple[int, int]
    block: int
    density: float
    dtype: torch.dtype
    device: str
    threads: int  # torch's CPU threads (0 on a GPU): what wins on one core may lose on two
    rows: int  # bucket: rows rounded up to a power of two
    mode: str = "eager"  # how the model runs: "eager" or "graph" (CUDA graphs, torch.compile's cudagraphs)
    dense: str = "rebuilt"  # how the layer runs dense (sparse_layer.py): on a weight "rebuilt" per call, or "kept"

    @classmethod
    def of(cls, kind: str, shape, block: int, density: float, dtype, device: torch.device, rows: int,
           dense: str = "rebuilt") -> "Problem":
        return cls(kind, tuple(shape), block, round(density * 20) / 20, dtype, device_name(device),
                   _threads(device.type == "cpu"), bucket(rows), _mode_on(device.type == "cuda"), dense)


@dataclass
class Choice:
    winner: str
    seconds: dict[str, float] = field(default_factory=dict)  # median per call, per candidate
    errors: dict[str, str] = field(default_factory=dict)  # candidates that failed to run


_cache: dict[Problem, Choice] = {}
_mode = "eager"
_generation = uuid.uuid4().hex  # renewed by forget(); a module's remembered choices (copied, pickled) need this one
_MEMO = "_prunekit_dispatch"
RUNS = "_prunekit_runs"  # a module's memo of what runs each batch-size bucket at inference (remembered)


def device_name(device: torch.device) -> str:
    """"cpu", or "cuda:<index>:<GPU name>" with the index filled in (torch.device("cuda") and "cuda:0" are one GPU)."""
    if device.type == "cpu":
        return "cpu"
    index = torch.cuda.current_device() if device.index is None else device.index
    return f"{device.type}:{index}:{torch.cuda.get_device_name(index)}"


def generation() -> str:
    """Renewed by forget(): what other remembered measurements (a backend's tuned kernels) are checked against."""
    return _generation


def current_mode() -> str:
    return _mode


def set_mode(name: str) -> str:
    """Sets how models run from now on ("eager" or "graph"), for choices not made yet; returns the previous mode."""
    global _mode
    if name not in MODES:
        raise ValueError(f"unknown dispatch mode {name!r}; choose from {', '.join(MODES)}")
    previous, _mode = _mode, name
    return previous


@contextlib.contextmanager
def mode(name: str):
    """`with dispatch.mode("graph"): model(x)`: choices made inside are timed as CUDA-graph replays."""
    previous = set_mode(name)
    try:
        yield
    finally:
        set_mode(previous)


def _mode_on(cuda: bool) -> str:
    return _mode if cuda else "eager"  # the CPU has no graphs to replay


def _threads(on_cpu: bool) -> int:
    return _cpu_threads() if on_cpu else 0


@torch.compiler.assume_constant_result  # (torch.compile cannot trace it: its value at tracing goes into the graph)
def _cpu_threads() -> int:
    return torch.get_num_threads()


def key(x: torch.Tensor, in_features: int) -> tuple:
    """What a module remembers its choices by: the bucket of x's rows, x's dtype, torch's CPU threads, the mode."""
    # (not x.device, which makes an object per call)
    return bucket(x.numel() // in_features), x.dtype, _threads(x.is_cpu), _mode_on(x.is_cuda)


def memo(module: torch.nn.Module, name: str = _MEMO) -> dict:
    """A dict kept on `module` for the measurements of now: empty again after forget(), and in a module copied to
    another process (whose measurements start afresh)."""
    found = module.__dict__.get(name)
    if found is None or found[0] != _generation:
        found = module.__dict__[name] = (_generation, {})
    return found[1]


def remembered(module: torch.nn.Module, x: torch.Tensor, in_features: int, backend: str,
               build: Callable[[], Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that runs `x` through `module` at inference, remembered per backend setting and `key` in
    memo(module, RUNS), so that a call after the first is one lookup; build() makes it the first time (choosing, and
    measuring if the problem is new). Nothing is remembered for an empty input (its bucket is one row's, which decode
    will measure) or while busy()."""
    runs, k = memo(module, RUNS), (backend, *key(x, in_features))
    run = runs.get(k)
    if run is None:
        run = build()
        if x.numel() and not busy():
            runs[k] = run
    return run


def busy() -> bool:
    """Whether a CUDA graph is being captured or torch.compile is tracing: nothing can be measured, and what is
    decided meanwhile is not remembered (a later eager call decides for good)."""
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def pick(module: torch.nn.Module, x: torch.Tensor, kind: str, shape, block: int, density: float,
         candidates: Callable[[torch.Tensor], dict[str, Callable[[], object]]], dense: str = "rebuilt") -> str:
    """The backend `module` runs `x` on: remembered per module and `key`, so that a forward after the first costs
    one dictionary lookup; otherwise the problem's choice, measuring candidates(x as 2-D rows) (which must include
    "dense", run as Problem.dense says) if the problem is new, on the CPU with `module`'s tensors evicted before each
    sample."""
    winners, k = memo(module), key(x, shape[1])
    winner = winners.get(k)
    if winner is None:
        problem = Problem.of(kind, shape, block, density, x.dtype, x.device, x.numel() // shape[1], dense)
        choice = known(problem)
        if choice is None:
            cpu = x.device.type == "cpu"
            choice = choose(problem, candidates(x.detach().reshape(-1, shape[1]).contiguous()), x.device,
                            before=_cold(module) if cpu else None, floor=None if cpu else cold_device(x.device))
        winners[k] = winner = choice.winner
    return winner


def _cold(module: torch.nn.Module) -> Callable[[], object]:
    """Evicts the tensors `module` holds (its own parameters and buffers: the compressed weight, its index, a kept
    dense copy) from the CPU's caches: what pick runs before each sample on the CPU."""
    from . import cpu

    return lambda: cpu.evict([*module.parameters(recurse=False), *module.buffers(recurse=False)])


def measure(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds per call as an eager model pays them: one call on the CPU; on a GPU, the wall time of a burst of
    BURST calls from an idle device, so that host-side launch costs count where they exceed the kernel's time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        clock = time.perf_counter()
        for _ in range(BURST):
            fn()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - clock) / BURST
    clock = time.perf_counter()
    fn()
    return time.perf_counter() - clock


def cold_device(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A sampler of the device seconds of one call of fn with the GPU's L2 flushed just before it, as a model's layer
    reads its weights from memory: the layers in between push them out. The flush reads twice the L2's size, so it
    leaves clean lines (a write would leave dirty ones, whose write-back the call would pay). The device then sleeps
    while the host queues the call, so that no host-side gap between its kernels is timed (a floor: what eager
    launches add, measure sees)."""
    size, flush = 2 * torch.cuda.get_device_properties(device).L2_cache_size, None

    def sample(fn: Callable[[], object]) -> float:
        nonlocal flush
        with torch.cuda.device(device):
            if flush is None:  # (on first use: choose may yet refuse to measure, under graph capture)
                flush = torch.zeros(size, dtype=torch.uint8, device=device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            flush.amax()
            torch.cuda._sleep(SLEEP_CYCLES)
            begin.record()
            fn()
            end.record()
            end.synchronize()
        return begin.elapsed_time(end) / 1e3

    return sample


def graphed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """fn captured BURST times in a CUDA graph (on a side stream, after a warm-up there); returns a sampler giving
    seconds per call of a replay, timed with CUDA events. Raises what capture raises for paths that cannot be
    captured (host synchronisation, allocations outside the graph pool)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(BURST):
            fn()

    def sample() -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / BURST

    return sample


def timings(candidates: dict[str, Callable[[], object]], device: torch.device, min_seconds: float = MIN_SECONDS,
            max_rounds: int = MAX_REPEATS, mode: str = "eager", before: Callable[[], object] | None = None,
            floor: Callable[[Callable[[], object]], float] | None = None) -> tuple[dict, dict]:
    """(median seconds per call, errors) per candidate, in `mode` (measure: eager; graphed: CUDA-graph replays). After
    two warm-up calls each (first calls pay for lazy compilation and first-use allocations; with one, a short
    measurement once saw PyTorch's BSR at 3x its settled time), the candidates take turns sample by sample, so that
    a burst of load from elsewhere on the machine slows all of them alike instead of whichever was being timed; at
    least 3 rounds, then until `min_seconds` per candidate or `max_rounds`. `before()`, if given, runs before every
    sample, untimed (pick: the layer's weights evicted from the caches). `floor(fn)`, if given, samples a time
    a call takes at least (pick on a GPU: cold_device), FLOOR_SAMPLES times per candidate in turns after the rounds;
    a candidate's time is then the larger of the two medians."""
    errors: dict[str, str] = {}
    samples: dict[str, list[float]] = {name: [] for name in candidates}

    def attempt(name: str, run: Callable[[], object]) -> None:
        try:
            run()
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run here is simply not chosen
            if name == "dense":
                raise
            errors[name] = f"{type(e).__name__}: {e}"
            samples.pop(name)

    for _ in range(2):
        for name in list(samples):
            attempt(name, candidates[name])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samplers: dict[str, Callable[[], float]] = {}
    for name in list(samples):
        if mode == "graph":
            attempt(name, lambda: samplers.__setitem__(name, graphed(candidates[name], device)))
        else:
            samplers[name] = lambda fn=candidates[name]: measure(fn, device)
    spent, rounds = 0.0, 0
    while rounds < 3 or (spent < min_seconds * len(samples) and rounds < max_rounds):
        for name in list(samples):
            if before is not None:
                before()
            attempt(name, lambda: samples[name].append(samplers[name]()))
            spent += samples[name][-1] if name in samples else 0.0
        rounds += 1
    seconds = {name: statistics.median(times) for name, times in samples.items()}
    if floor is not None:
        floors: dict[str, list[float]] = {name: [] for name in seconds}
        for _ in range(FLOOR_SAMPLES):
            for name in floors:
                floors[name].append(floor(candidates[name]))
        seconds = {name: max(t, statistics.median(floors[name])) for name, t in seconds.items()}
    return seconds, errors


def choose(problem: Problem, candidates: dict[str, Callable[[], object]], device: torch.device,
           before: Callable[[], object] | None = None,
           floor: Callable[[Callable[[], object]], float] | None = None) -> Choice:
    """The cached choice for `problem`, measuring `candidates` (which must include "dense") the first time, each
    sample after `before()`, none faster than `floor` says (see timings)."""
    if problem in _cache:
        return _cache[problem]
    if "dense" not in candidates:
        raise ValueError("the candidates must include 'dense', the baseline nothing may be slower than")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"no measurement yet for {problem} and a CUDA graph is being captured; warm the model "
                           f"up at this batch size before capturing (inside `with prunekit.kernels.dispatch.mode("
                           f"'graph'):` so that it is timed as graphs replay), or choose a backend explicitly")
    if torch.compiler.is_compiling():  # (where the graph may break, torch.compile then runs this eagerly: it measures)
        raise RuntimeError(f"no measurement yet for a {problem.kind} layer {problem.shape} at {problem.rows} rows "
                           f"and torch.compile is tracing with fullgraph=True; run "
                           f"the model once eagerly at this batch size before compiling it, so that auto measures "
                           f"then, or choose a backend explicitly")
    with torch.no_grad():
        seconds, errors = timings(candidates, device, mode=problem.mode, before=before, floor=floor)
    choice = Choice("dense", seconds, errors)
    sparse = {n: t for n, t in seconds.items() if n != "dense"}
    if sparse:
        best = min(sparse, key=sparse.get)
        if sparse[best] < MARGIN * seconds["dense"]:
            choice.winner = best
    _cache[problem] = choice
    return choice


def known(problem: Problem) -> Choice | None:
    """The choice made for `problem`, if it was measured (cheap: what every forward after the first asks)."""
    return _cache.get(problem)


def decisions() -> dict[Problem, Choice]:
    """Every measurement so far (for a look, or a report)."""
    return dict(_cache)


def forget() -> None:
    """Drops every measurement (after a driver or clock change, say)."""
    global _generation
    _cache.clear()
    _generation = uuid.uuid4().hex
