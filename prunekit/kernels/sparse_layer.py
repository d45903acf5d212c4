"""What the compressed layers (BitmaskLinear, BlockSparseLinear, SemiStructuredLinear) share: the path each batch
size runs on, chosen by the dispatch and remembered, and how they run dense where they do.

Path: with backend="auto" the first inference call of a batch-size bucket asks the dispatch (measuring if the problem
is new); the function that then runs (`runner`: the kernel with the layer's tensors bound) is remembered per bucket
(dispatch.remembered), so that a call after the first is a lookup and that function. Setting a bound attribute, or
.to(), forgets it.

Dense: "auto" runs a batch size dense when dense beat every sparse path there (backend="dense" always does), on a
dense weight made from the compressed one. By default that weight is rebuilt for each call and given back after it,
so the layer stays as small as its mask, and dense costs the rebuild on top of the product: on the CPU, 10-26% more
than a 512-row fp32 product of LLaMA-7B's shapes, and 1.5-5.3x dense's time at one row, where the product itself is
short (benchmarks/results/kernels_cpu.md, "rebuilt"). With `keep_dense=True` the layer builds it once, where a batch size
is first chosen to run dense, and keeps it beside the compressed weight: never slower than dense, holding the dense
bytes as well (a non-persistent buffer, `dense_copy`: convert's report counts it, state_dict leaves it out). The
dispatch times dense the way the layer runs it, so its choices follow the setting. A 2:4 layer always keeps its
copy: decompressing a semi-structured weight is a product of its own.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

from ..errors import PrunekitError
from . import dispatch
from .function import needs_grad


def check_keep_dense(keep) -> None:
    if not isinstance(keep, bool):
        raise PrunekitError(f"keep_dense must be True or False, got {keep!r}")


class SparseLayer:
    """Mixin of the compressed layers: an nn.Module with `in_features` and `choose(x)` that names the backends it
    takes (BACKENDS, or `takes` where it takes more), sets `backend`, calls `init_fallback` and defines `runner`,
    `build_dense` and `dense_sources` (and, to use `trains`, `values` and `bias`)."""

    REBUILDS = True  # whether the layer can rebuild its dense weight per call at a sensible cost
    BACKENDS: tuple[str, ...] = ()  # what `backend` may name, "auto" first
    BINDS: tuple[str, ...] = ()  # the attributes a run from `runner` holds: setting one forgets the runs

    def runner(self, name: str, x2: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """What inference runs on path `name` for the bucket of x2's rows (x2 2-D): a function of the input alone,
        with this layer's tensors bound, so that a call reads no module attribute (each read of a parameter or
        buffer goes through nn.Module.__getattr__, about half a microsecond, and decoding makes hundreds of calls
        per token)."""
        raise NotImplementedError

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """forward at inference: the run remembered for x's batch-size bucket (made the first time: auto's choice,
        measured if the problem is new)."""
        return dispatch.remembered(self, x, self.in_features, self.backend,
                                   lambda: self.runner(self.path(x), x.reshape(-1, self.in_features)))(x)

    def trains(self, x: torch.Tensor) -> bool:
        """Whether a forward of x builds an autograd graph (function.needs_grad); under no_grad without reading a
        parameter (see runner)."""
        return torch.is_grad_enabled() and needs_grad(x, self.values, self.bias)

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): new tensors, which bound runs do not hold
        self.__dict__.pop(dispatch.RUNS, None)
        return super()._apply(fn, recurse)

    def __setattr__(self, name, value):
        if name in self.BINDS:
            self.__dict__.pop(dispatch.RUNS, None)
        super().__setattr__(name, value)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if not self.takes(name):
            raise PrunekitError(f"unknown backend {name!r} for a {type(self).__name__}; "
                                f"choose from {', '.join(self.BACKENDS)}")
        self._backend = name

    @classmethod
    def takes(cls, name: str) -> bool:
        return name in cls.BACKENDS

    def init_fallback(self, keep_dense: bool) -> None:
        self.register_buffer("dense_copy", None, persistent=False)
        self.keep_dense = keep_dense

    @property
    def keep_dense(self) -> bool:
        return self._keep_dense

    @keep_dense.setter
    def keep_dense(self, keep: bool) -> None:
        check_keep_dense(keep)
        if not keep and not self.REBUILDS:
            raise PrunekitError(f"a {type(self).__name__} always keeps its dense weight where it runs dense: "
                                f"rebuilding it per call would cost a product of its own")
        self._keep_dense = keep
        self.dense_copy = None
        self.forget_choices()  # they were timed with dense run the other way

    def forget_choices(self) -> None:
        dispatch.memo(self).clear()
        dispatch.memo(self, dispatch.RUNS).clear()

    def __getstate__(self):  # a copy makes its own runs (they may be bound to this module's tensors) and dense copy
        state = super().__getstate__()
        state.pop(dispatch.RUNS, None)
        state.pop("_made_from", None)
        return state

    def path(self, x: torch.Tensor) -> str:
        """The path forward runs `x` on: the named backend, or auto's choice."""
        return self.choose(x) if self.backend == "auto" else self.backend

    def build_dense(self, scratch: bool) -> torch.Tensor:
        """The dense [out, in] weight, detached; scratch: it may live in memory the next call reuses."""
        raise NotImplementedError

    def dense_sources(self) -> tuple[torch.Tensor, ...]:
        """The tensors build_dense reads: a copy made from them is stale once one is changed or replaced."""
        raise NotImplementedError

    def fallback_weight(self, saved: bool = False) -> torch.Tensor:
        """The dense weight inference runs on: without keep_dense, built for this call; with it, the kept copy, made
        again where the compressed weight changed since (an optimizer step, load_state_dict, a new tensor).
        saved: autograd keeps the weight for the input's gradient, so it must not be scratch that the next layer's
        call overwrites."""
        if not self._keep_dense:
            return self.build_dense(scratch=not saved)
        if torch.compiler.is_compiling():  # (what a trace reads must not be checked or stored)
            return self.dense_copy if self.dense_copy is not None else self.build_dense(scratch=False)
        sources = self.dense_sources()
        made_from = self.__dict__.get("_made_from", ())  # (weak reference, version) of each source, at the copy
        if self.dense_copy is not None and len(made_from) == len(sources) and all(
                ref() is t and version == t._version for (ref, version), t in zip(made_from, sources)):
            return self.dense_copy
        if dispatch.busy():  # a CUDA graph being captured runs nothing now: a copy made here would hold no weights yet
            return self.build_dense(scratch=False)
        self.dense_copy = self.build_dense(scratch=False)
        self.__dict__["_made_from"] = tuple((weakref.ref(t), t._version) for t in sources)
        return self.dense_copy

    def pick(self, x: torch.Tensor, kind: str, shape, block: int, density: float, candidates) -> str:
        """dispatch.pick for this layer, dense timed as it runs here. With keep_dense the copy exists from the moment a
        batch size is chosen to run dense (so that what the layer holds does not depend on whether it measured or
        reused another layer's measurement); one made only to time dense against, where a sparse path won, goes."""
        had_copy = self.dense_copy is not None
        winner = dispatch.pick(self, x, kind, shape, block, density, candidates,
                               dense="kept" if self.keep_dense else "rebuilt")
        if winner == "dense" and self.keep_dense:
            self.fallback_weight()
        elif winner != "dense" and not had_copy:
            self.dense_copy = None
        return winner
