"""backend="auto": time every candidate once per problem and keep the fastest, never one slower than dense.

A problem is (kind, weight shape, block, stored density to 1/20, dtype, device, torch's CPU thread count, rows rounded
up to a power of two):
layers of one shape and sparsity share one measurement, and a new batch size only costs a measurement when it
falls in a new bucket. Sparse wins only when it beats dense by `MARGIN`, so timing noise can not make a layer
slower than it was dense; what wins depends on the machine (on a 2-core CPU, BSR wins only at small batch and high
sparsity), which is why it is measured and not assumed.
"""
from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch

MARGIN = 0.95  # sparse must take under 95% of dense's time
MIN_SECONDS = 0.05  # timing per candidate: at least this long ...
MAX_REPEATS = 50  # ... and at most this many rounds after the warm-up


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

    @classmethod
    def of(cls, kind: str, shape, block: int, density: float, dtype, device: torch.device, rows: int) -> "Problem":
        name = str(device) if device.type == "cpu" else f"{device}:{torch.cuda.get_device_name(device)}"
        return cls(kind, tuple(shape), block, round(density * 20) / 20, dtype, name, _threads(device.type == "cpu"),
                   bucket(rows))


@dataclass
class Choice:
    winner: str
    seconds: dict[str, float] = field(default_factory=dict)  # median per call, per candidate
    errors: dict[str, str] = field(default_factory=dict)  # candidates that failed to run


_cache: dict[Problem, Choice] = {}
_generation = uuid.uuid4().hex  # renewed by forget(); a module's remembered choices (copied, pickled) need this one
_MEMO = "_prunekit_dispatch"


def bucket(rows: int) -> int:
    return 1 << max(0, int(rows) - 1).bit_length()


def _threads(on_cpu: bool) -> int:
    return torch.get_num_threads() if on_cpu else 0


def pick(module: torch.nn.Module, x: torch.Tensor, kind: str, shape, block: int, density: float,
         candidates: Callable[[torch.Tensor], dict[str, Callable[[], object]]]) -> str:
    """The backend `module` runs `x` on: remembered per module and batch-size bucket, so that a forward after the
    first costs one dictionary lookup; otherwise the problem's choice, measuring candidates(x as 2-D rows) (which
    must include "dense") if the problem is new."""
    rows = x.numel() // shape[1]
    key = (bucket(rows), x.dtype, _threads(x.is_cpu))
    memo = module.__dict__.get(_MEMO)
    if memo is None or memo[0] != _generation:  # first call, or measurements forgotten, or from another process
        memo = module.__dict__[_MEMO] = (_generation, {})
    winner = memo[1].get(key)
    if winner is None:
        problem = Problem.of(kind, shape, block, density, x.dtype, x.device, rows)
        choice = known(problem)
        if choice is None:
            choice = choose(problem, candidates(x.detach().reshape(-1, shape[1]).contiguous()), x.device)
        memo[1][key] = winner = choice.winner
    return winner


def measure(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call (CUDA events on a GPU)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    clock = time.perf_counter()
    fn()
    return time.perf_counter() - clock


def timings(candidates: dict[str, Callable[[], object]], device: torch.device, min_seconds: float = MIN_SECONDS,
            max_rounds: int = MAX_REPEATS) -> tuple[dict, dict]:
    """(median seconds per call, errors) per candidate. After two warm-up calls each (first calls pay for lazy compilation
    and first-use allocations; with one, a short measurement once saw PyTorch's BSR at 3x its settled time), the
    candidates take turns call by call, so that a burst of load from elsewhere on the machine
    slows all of them alike instead of whichever was being timed; at least 3 rounds, then until `min_seconds` per
    candidate or `max_rounds`."""
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
    spent, rounds = 0.0, 0
    while rounds < 3 or (spent < min_seconds * len(samples) and rounds < max_rounds):
        for name in list(samples):
            attempt(name, lambda: samples[name].append(measure(candidates[name], device)))
            spent += samples[name][-1] if name in samples else 0.0
        rounds += 1
    return {name: statistics.median(times) for name, times in samples.items()}, errors


def choose(problem: Problem, candidates: dict[str, Callable[[], object]], device: torch.device) -> Choice:
    """The cached choice for `problem`, measuring `candidates` (which must include "dense") the first time."""
    if problem in _cache:
        return _cache[problem]
    if "dense" not in candidates:
        raise ValueError("the candidates must include 'dense', the baseline nothing may be slower than")
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"no measurement yet for {problem} and a CUDA graph is being captured; run the model "
                           f"once at this batch size before capturing, or choose a backend explicitly")
    with torch.no_grad():
        seconds, errors = timings(candidates, device)
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
