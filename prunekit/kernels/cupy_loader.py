"""The same kernels without a compiler: cuda_ext/bsr_kernels.cuh compiled at run time by NVRTC through CuPy's
RawModule, for machines with CuPy (`pip install prunekit[cuda]`) but no nvcc or no compiled extension."""
from __future__ import annotations

import functools
import os

from .native import Native
from .sources import directory, kernel_source

OPTIONS = ("-std=c++17",)


def include_options() -> tuple[str, ...]:
    """-I flags for the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h, mma.h): CuPy's CUDA path and,
    where CuPy found its toolkit through pip wheels, cuda-pathfinder's header directory."""
    dirs = [str(directory())]
    try:
        import cupy

        path = cupy.cuda.get_cuda_path()
        if path:
            dirs.append(os.path.join(path, "include"))
    except Exception:  # noqa: BLE001 - an odd CuPy install just means fewer candidates
        pass
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        found = find_nvidia_header_directory("cudart")
        if found:
            dirs.append(found)
    except Exception:  # noqa: BLE001
        pass
    return tuple(f"-I{d}" for d in dict.fromkeys(dirs) if os.path.isdir(d))


def _missing_headers(log: str) -> str:
    return ("NVRTC could not find the CUDA headers the kernels include (cuda_fp16.h, cuda_bf16.h, mma.h); install "
            "them (`pip install 'cupy-cuda12x[ctk]'`, or a CUDA toolkit with CUDA_PATH set)"
            if "could not open source file" in log else log)


def compile_ptx(arch: str = "80") -> str:
    """PTX of every kernel for compute capability `arch`, through NVRTC alone: needs no GPU, which is how the
    tests check that the sources compile for CuPy here. Raises RuntimeError with NVRTC's log."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(kernel_source(), "bsr_kernels.cu", (), ())
    try:
        # as CuPy's RawModule compiles (it adds the execution-space flag itself)
        nvrtc.compileProgram(program, OPTIONS + include_options() + ("--device-as-default-execution-space",
                                                                     f"-arch=compute_{arch}"))
        ptx = nvrtc.getPTX(program)
    except nvrtc.NVRTCError:
        raise RuntimeError(_missing_headers(nvrtc.getProgramLog(program))) from None
    finally:
        nvrtc.destroyProgram(program)
    return ptx.decode() if isinstance(ptx, bytes) else ptx


@functools.lru_cache(maxsize=None)
def _module():
    import cupy

    return cupy.RawModule(code=kernel_source(), options=OPTIONS + include_options())


def cupy_backend() -> Native:
    """A backend launching through CuPy; raises ImportError when CuPy is missing."""
    try:
        import cupy
        import numpy as np
    except ImportError:
        raise ImportError("CuPy is not installed: `pip install prunekit[cuda]` (cupy-cuda12x) runs the kernels "
                          "without a compiled extension") from None
    from . import launch as plan

    kinds = [np.uint64] * 9 + [np.int64] * 6  # PkParams: nine pointers, six integers

    @functools.lru_cache(maxsize=None)
    def function(name: str):
        try:
            return _module().get_function(name)
        except cupy.cuda.compiler.CompileException as e:
            raise RuntimeError(f"CuPy could not compile prunekit's kernels: {_missing_headers(str(e))}") from None

    def launch(name, grid, block, params, stream):
        args = tuple(kind(v) for kind, v in zip(kinds, plan.unpack(params)))
        with cupy.cuda.ExternalStream(stream):
            function(name)(tuple(grid), tuple(block), args)

    return Native("cupy", launch)
