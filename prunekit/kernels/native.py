"""BSR products on the kernels of cuda_ext/bsr_kernels.cuh, through any launcher: the compiled extension
(prunekit._cuda_ext), CuPy's NVRTC module (cupy_loader.py), or the tests' CPU emulator. A launcher is
`launch(name, grid, block, params: bytes, stream: int)`; launch.py decides the kernel and grid."""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from . import dispatch
from . import launch as plan
from .layout import KERNEL_BLOCKS, BlockLayout

Launcher = Callable[[str, tuple, tuple, bytes, int], None]
TUNE_SECONDS = 0.01  # graph replays per variant when tuning (each replay runs dispatch.BURST calls)


def tunes(x: torch.Tensor) -> bool:
    """Whether the kernel for x is tuned: on a GPU, unless PRUNEKIT_TUNE=0."""
    return x.device.type == "cuda" and os.environ.get("PRUNEKIT_TUNE") != "0"


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class Native:
    """One BSR backend: forward, input gradient and block gradient for fp32/fp16/bf16 and blocks 16/32/64.

    kernel_index and operator: where the launcher is the compiled extension, its table's index of a kernel name and
    its prunekit::bsr_linear operator (op.cpp; tests pass a stand-in of the same signature); then the inference
    forward is one call of the operator with the kernel chosen once per batch-size bucket, instead of the Python
    route through pack() and the launcher.
    wgmma(device): whether the kernels loaded for that device were built with wgmma (sm_90a), so tcw may run
    (PRUNEKIT_WGMMA=0 says no, whatever was built).

    On a GPU the forward's kernel is tuned: where the planner's kernel has variants (launch.variants: each way of
    splitting block rows, both tc tiles, tcw), the first call of a batch-size bucket times them all as CUDA graphs
    replay them and keeps the fastest for every later call of that bucket and layer shape (PRUNEKIT_TUNE=0 keeps
    the planner's choice). The planner's thresholds are guesses from one H200 run; this makes them right on any
    GPU, and makes the dispatch's "cuda_ext" the best this backend has."""

    def __init__(self, name: str, launcher: Launcher, device_type: str = "cuda",
                 capability: Callable = _cuda_capability, stream: Callable = _cuda_stream,
                 kernel_index: Callable[[str], int] | None = None, operator: Callable | None = None,
                 wgmma: Callable[[torch.device], bool] = lambda device: False):
        self.name, self.launcher, self.device_type = name, launcher, device_type
        self.capability, self.stream = capability, stream
        self.kernel_index, self.operator = kernel_index, operator
        self.wgmma = lambda device: os.environ.get("PRUNEKIT_WGMMA") != "0" and wgmma(device)
        self._planned: tuple[str, dict[tuple, plan.Launch]] = (dispatch.generation(), {})
        self._indices: dict[str, int] = {}  # kernel name -> index in the extension's table

    def unsupported(self, device: torch.device, dtype: torch.dtype, block: int) -> str | None:
        if device.type != self.device_type:
            return f"runs on {self.device_type} tensors, not {device.type}"
        if dtype not in plan.DTYPE_NAMES:
            return f"has kernels for float32, float16 and bfloat16, not {dtype}"
        if block not in KERNEL_BLOCKS:
            return f"has kernels for blocks {KERNEL_BLOCKS}, not {block}"
        return None

    def _run(self, launch: plan.Launch, device: torch.device, **fields) -> None:
        params = plan.pack(**fields)
        if device.type == "cuda":  # the launchers use the current device and the tensors' stream
            with torch.cuda.device(device):
                self.launcher(launch.name, launch.grid, launch.block, params, self.stream(device))
        else:
            self.launcher(launch.name, launch.grid, launch.block, params, self.stream(device))

    def planned(self, x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                bias: torch.Tensor | None) -> plan.Launch:
        """The forward's launch for the bucket of x's rows (its grid as for the first row count seen; `for_rows` gives
        any other's): chosen once per batch-size bucket, layer shape and stored density (to 1/20), since the
        planner's thresholds are powers of two and every row count of a bucket gets the same kernel; tuned among
        the variants where `tunes` says so, else the planner's."""
        rows = x.shape[0]
        generation, chosen = self._planned
        if generation != dispatch.generation():  # dispatch.forget() forgets the tuning too
            self._planned = generation, chosen = dispatch.generation(), {}
        key = (plan.bucket(rows), layout.grid, layout.block, round(layout.density * 20), x.dtype, x.device)
        launch = chosen.get(key)
        if launch is None:
            launches = plan.variants(rows, layout.grid[0], layout.block, x.dtype, self.capability(x.device),
                                     wgmma=self.wgmma(x.device))
            launch = launches[0]
            if len(launches) > 1 and tunes(x):
                if dispatch.busy():  # (a later eager call tunes)
                    return launch
                launch = self.fastest(launches, x, values, layout, bias)
            chosen[key] = launch
        return launch

    def fastest(self, launches: list[plan.Launch], x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                bias: torch.Tensor | None) -> plan.Launch:
        """The launch of `launches` whose replays in a CUDA graph take least time (dispatch.timings in graph mode:
        host costs are the operator's whatever the kernel, so device time decides), none faster than with its
        weights from memory (dispatch.cold_device); one that fails to run is not chosen, and if none runs the
        planner's (the first) stays."""
        runs = {v.name: (lambda v=v: self.launch_forward(v, x, values, layout, bias)) for v in launches}
        with torch.no_grad():
            seconds, _ = dispatch.timings(runs, x.device, min_seconds=TUNE_SECONDS, mode="graph",
                                          floor=dispatch.cold_device(x.device))
        best = min(seconds, key=seconds.get, default=launches[0].name)
        return next(v for v in launches if v.name == best)

    def operator_plan(self, x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                      bias: torch.Tensor | None) -> tuple[int, int, int, int]:
        """(kernel index, rows per thread block, threads, thread blocks per block row) of the forward's launch, the
        arguments prunekit::bsr_linear takes besides the tensors."""
        launch = self.planned(x, values, layout, bias)
        index = self._indices.get(launch.name)
        if index is None:
            index = self._indices[launch.name] = self.kernel_index(launch.name)
            if index < 0:
                raise RuntimeError(f"{self.name} has no kernel {launch.name}; rebuild the extension")
        return index, launch.tile, launch.block[0], launch.split

    def bind(self, x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
             bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The inference forward for the bucket of x's rows (x 2-D) as a function of the input alone, of any number
        of leading dimensions and layout.in_features features (the caller checks the width): one call of
        prunekit::bsr_linear with the kernel and every other argument fixed, which checks device and dtype itself.
        None where this backend has no operator."""
        if self.operator is None or not x.shape[0]:
            return None
        op, fixed = self.operator, (values, layout.row_ptr, layout.col_idx, bias, layout.out_features,
                                    *self.operator_plan(x, values, layout, bias))
        return lambda x: op(x, *fixed)  # (it flattens leading dimensions itself)

    def forward(self, x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                bias: torch.Tensor | None) -> torch.Tensor:
        if not x.shape[0]:
            return x.new_empty(0, layout.out_features)
        if self.operator is not None:
            return self.bind(x, values, layout, bias)(x)
        launch = self.planned(x, values, layout, bias).for_rows(x.shape[0])
        return self.launch_forward(launch, x, values, layout, bias)

    def launch_forward(self, launch: plan.Launch, x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """y = x W^T + b by the given launch (the planner's, or any of plan.variants) through the launcher."""
        out = x.new_empty(x.shape[0], layout.out_features)
        self._run(launch, x.device, x=x.data_ptr(), values=values.data_ptr(), row_ptr=layout.row_ptr.data_ptr(),
                  col_idx=layout.col_idx.data_ptr(), bias=0 if bias is None else bias.data_ptr(), out=out.data_ptr(),
                  M=x.shape[0], N=layout.out_features, K=layout.in_features, ldx=x.stride(0), ldo=out.stride(0))
        return out

    def grad_input(self, dy: torch.Tensor, values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        """dX = dY W, through the blocks listed by block column and read transposed."""
        rows = dy.shape[0]
        dx = dy.new_empty(rows, layout.in_features)
        if rows:
            launch = plan.forward(rows, layout.grid[1], layout.block, dy.dtype, self.capability(dy.device),
                                  transposed=True)
            self._run(launch, dy.device, x=dy.data_ptr(), values=values.data_ptr(),
                      row_ptr=layout.t_row_ptr.data_ptr(), col_idx=layout.t_col_idx.data_ptr(),
                      perm=layout.t_perm.data_ptr(), out=dx.data_ptr(), M=rows, N=layout.in_features,
                      K=layout.out_features, ldx=dy.stride(0), ldo=dx.stride(0))
        return dx

    def grad_values(self, dy: torch.Tensor, x: torch.Tensor, layout: BlockLayout, values: torch.Tensor) -> torch.Tensor:
        """dV[i] = dY[:, rows of block i]^T X[:, columns of block i], for the stored blocks only."""
        if not dy.shape[0] or not layout.nnzb:
            return torch.zeros_like(values)
        dv = torch.empty_like(values)
        launch = plan.grad_values(layout.nnzb, layout.block, dy.dtype, self.capability(dy.device))
        self._run(launch, dy.device, x=x.data_ptr(), grad=dy.data_ptr(), row_idx=layout.row_idx.data_ptr(),
                  col_idx=layout.col_idx.data_ptr(), out=dv.data_ptr(), M=dy.shape[0], N=layout.out_features,
                  K=layout.in_features, ldx=x.stride(0), ldg=dy.stride(0))
        return dv


def load_extension(jit: bool | None = None):
    """The compiled extension: prunekit._cuda_ext when `pip install` built it, else (jit=True, or
    PRUNEKIT_JIT_CUDA=1) compiled now with torch.utils.cpp_extension.load (a minute or two, cached after).
    Raises ImportError saying how to get it."""
    try:
        from .. import _cuda_ext

        return _cuda_ext
    except ImportError:
        pass
    if jit is None:
        jit = os.environ.get("PRUNEKIT_JIT_CUDA") == "1"
    if not jit:
        raise ImportError("prunekit's CUDA extension is not built; build it with `PRUNEKIT_BUILD_CUDA=1 pip install "
                          "-e . --no-build-isolation` (needs a CUDA build of torch and nvcc), or set "
                          "PRUNEKIT_JIT_CUDA=1 to compile it on first use")
    from torch.utils.cpp_extension import load

    from .sources import directory

    src = directory()
    return load(name="prunekit_cuda_ext", sources=[str(src / name) for name in SOURCES],
                extra_include_paths=[str(src)], extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++17"])


SOURCES = ("extension.cpp", "op.cpp", "launch.cu")  # what the extension is built from (setup.py lists them too)


# The operator's schema as op.cpp defines it (a test compares the two), for stand-ins of it
SCHEMA = ("bsr_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias, int out_features, "
          "int kernel, int tile_rows, int threads, int split) -> Tensor")


def output_like(x, values, row_ptr, col_idx, bias, out_features, kernel, tile_rows, threads, split):
    """prunekit::bsr_linear's output, unfilled: its fake implementation, for torch.compile and meta tensors."""
    return x.new_empty(*x.shape[:-1], out_features)


@functools.lru_cache(maxsize=None)
def _register_fake() -> None:
    torch.library.register_fake("prunekit::bsr_linear")(output_like)


def stand_in(namespace: str, impl: Callable) -> torch.library.Library:
    """A CPU operator `namespace`::bsr_linear of the extension's schema, computed by `impl`, with its fake: what tests
    and benchmarks/call_overhead.py run where the extension cannot (no GPU). Keep the Library: the operator lives as
    long as it does."""
    library = torch.library.Library(namespace, "DEF")
    library.define(SCHEMA)
    library.impl("bsr_linear", impl, "CPU")
    torch.library.register_fake(f"{namespace}::bsr_linear", lib=library)(output_like)
    return library


def extension_backend(jit: bool | None = None) -> Native:
    ext = load_extension(jit)
    _register_fake()

    @functools.lru_cache(maxsize=None)
    def wgmma(device: torch.device) -> bool:
        with torch.cuda.device(device):
            return ext.has_wgmma() == 1

    return Native("cuda_ext", lambda name, grid, block, params, stream: ext.launch(name, list(grid), list(block),
                                                                                  params, stream),
                  kernel_index=ext.kernel_index, operator=torch.ops.prunekit.bsr_linear, wgmma=wgmma)
