"""The same kernels without a compiler: cuda_ext/bsr_kernels.cuh compiled at run time by NVRTC and loaded through
CuPy's RawModule, for machines with CuPy (`pip install prunekit[cuda]`) but no nvcc or no compiled extension.

prunekit runs NVRTC itself (compile_kernels) rather than through RawModule(code=...), because CuPy compiles for sm_90 where
the GPU is an H100 or H200, and Hopper's warpgroup MMA (the tcw prefill kernel) is only in code built for sm_90a.
The result is cached on disk like the CPU extension (cpu_build.cache_dir), keyed by the source, the options and the
NVRTC version."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .cpu_build import cache_dir
from .native import Native
from .sources import directory, kernel_source

OPTIONS = ("-std=c++17",)
SYSTEM_CUDA = "/usr/local/cuda"


# What bsr_kernels.cuh includes, directly or through mma.h (CUDA 13's mma.h includes crt/mma.h).
HEADERS = ("cuda_fp16.h", "cuda_bf16.h", "cuda_pipeline_primitives.h", "mma.h", "crt/mma.h")


def candidate_dirs() -> list[Path]:
    """Directories that may hold the CUDA headers, in order of preference: a toolkit named by CUDA_PATH or
    CUDA_HOME, the one beside nvcc, CuPy's, /usr/local/cuda, then pip's nvidia-* wheels (CUDA 12 puts each
    component in nvidia/<component>/include, with crt/ in cuda_nvcc's; CUDA 13 merges them in nvidia/cu13/include,
    crt/ coming from nvidia-cuda-crt) and what cuda-pathfinder finds."""
    roots = [os.environ.get(name) for name in ("CUDA_PATH", "CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    try:
        import cupy

        roots.append(cupy.cuda.get_cuda_path())
    except Exception:  # noqa: BLE001 - an odd CuPy install just means fewer candidates
        pass
    roots.append(SYSTEM_CUDA)
    dirs = []
    for root in filter(None, roots):
        dirs += [Path(root) / "include", Path(root) / "targets" / "x86_64-linux" / "include"]
    for site in map(Path, sys.path):
        dirs += sorted((site / "nvidia").glob("*/include"))
    try:
        from cuda.pathfinder import find_nvidia_header_directory

        for lib in ("cudart", "nvcc", "crt"):
            try:
                found = find_nvidia_header_directory(lib)
            except Exception:  # noqa: BLE001 - names differ between pathfinder versions
                found = None
            if found:
                dirs.append(Path(found))
    except ImportError:
        pass
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def header_dirs(candidates: list[Path]) -> list[Path]:
    """The directories to put on NVRTC's include path: the first that holds every header in HEADERS, so that they
    come from one toolkit; else, header by header, the first that holds it (a CUDA 12 pip install splits them)."""
    for d in candidates:
        if all((d / h).is_file() for h in HEADERS):
            return [d]
    found = (next((d for d in candidates if (d / h).is_file()), None) for h in HEADERS)
    return [d for d in dict.fromkeys(found) if d is not None]


def include_options() -> tuple[str, ...]:
    """-I flags for the kernels' own directory and the CUDA headers they include."""
    return tuple(f"-I{d}" for d in [directory(), *header_dirs(candidate_dirs())])


def _missing_headers(log: str) -> str:
    if "could not open source file" not in log and "cannot open source file" not in log:
        return log
    dirs = candidate_dirs()
    missing = [h for h in HEADERS if not any((d / h).is_file() for d in dirs)]
    return (f"NVRTC could not find the CUDA headers the kernels include ({', '.join(missing or HEADERS)} missing "
            f"from {', '.join(map(str, dirs)) or 'every place looked in'}); install a CUDA toolkit and set CUDA_PATH, "
            f"or the pip wheels (`pip install 'cupy-cuda12x[ctk]'`; for CUDA 13 also nvidia-cuda-crt). NVRTC said: "
            f"{log.strip()[-300:]}")


def nvrtc_target(capability: tuple[int, int], supported: tuple[int, ...]) -> tuple[str, bool]:
    """(architecture, cubin?) that NVRTC compiles for on a GPU of this compute capability: a cubin for sm_90a on
    Hopper (with wgmma), sm_<major><minor> elsewhere; where this NVRTC (whose `supported` architectures are given)
    is older than the GPU, PTX for the newest it knows, which the driver compiles on loading (as CuPy does)."""
    number = capability[0] * 10 + capability[1]
    if number in supported:
        return f"{number}a" if number == 90 else str(number), True
    return str(max(a for a in supported if a <= number)), False


def compile_kernels(target: str, cubin: bool) -> bytes:
    """Every kernel compiled by NVRTC alone for `target` (nvrtc_target's first element): a cubin for sm_<target>, or
    PTX for compute_<target>. Needs no GPU, which is how the tests check the sources here. Raises RuntimeError with
    NVRTC's log."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(kernel_source(), "bsr_kernels.cu", (), ())
    try:
        # (--device-as-default-execution-space: as CuPy's RawModule compiles)
        nvrtc.compileProgram(program, OPTIONS + include_options() + ("--device-as-default-execution-space",
                                                                     f"-arch={'sm' if cubin else 'compute'}_{target}"))
        code = nvrtc.getCUBIN(program) if cubin else nvrtc.getPTX(program)
    except nvrtc.NVRTCError:
        raise RuntimeError(f"NVRTC could not compile prunekit's kernels for {target}: "
                           f"{_missing_headers(nvrtc.getProgramLog(program))}") from None
    finally:
        nvrtc.destroyProgram(program)
    return code.encode() if isinstance(code, str) else code


def compiled(target: str, cubin: bool) -> Path:
    """The cached compile_kernels(target, cubin), compiled first if there is none."""
    from cupy_backends.cuda.libs import nvrtc

    key = hashlib.sha256(f"{kernel_source()}|{OPTIONS}|{nvrtc.getVersion()}|{target}|{cubin}".encode()).hexdigest()
    path = cache_dir() / "cupy" / f"bsr_kernels_{key[:16]}.{'cubin' if cubin else 'ptx'}"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        code = compile_kernels(target, cubin)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as scratch:
            scratch.write(code)
        os.replace(scratch.name, path)  # atomic: a concurrent compile finds a whole file or none
    return path


@functools.lru_cache(maxsize=None)
def _module(device: int):
    """The kernels loaded for GPU `device` (those of one compute capability share a file)."""
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    gpu = cupy.cuda.Device(device)
    number = int(gpu.compute_capability)  # "90" on an H100 (as CuPy's own compiler reads it)
    target, cubin = nvrtc_target(divmod(number, 10), tuple(nvrtc.getSupportedArchs()))
    with gpu:
        return cupy.RawModule(path=str(compiled(target, cubin)))


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
    def function(device: int, name: str):
        """(kernel, dynamic shared memory bytes), the limit raised where a kernel needs more than the default."""
        module = _module(device)
        with cupy.cuda.Device(device):  # (RawModule loads its file into the current device's context)
            kernel = module.get_function(name)
            smem = int(cupy.ndarray((), cupy.int32, module.get_global(f"{name}_smem")).get())
        if smem > 48 * 1024:
            kernel.max_dynamic_shared_size_bytes = smem
        return kernel, smem

    def launch(name, grid, block, params, stream):
        args = tuple(kind(v) for kind, v in zip(kinds, plan.unpack(params)))
        kernel, smem = function(cupy.cuda.runtime.getDevice(), name)  # (the current GPU: torch's, as it launches)
        with cupy.cuda.ExternalStream(stream):
            kernel(tuple(grid), tuple(block), args, shared_mem=smem)

    @functools.lru_cache(maxsize=None)
    def wgmma(device) -> bool:  # whether the loaded code has wgmma (built for sm_90a)
        index = cupy.cuda.runtime.getDevice() if device.index is None else device.index
        with cupy.cuda.Device(index):
            return int(cupy.ndarray((), cupy.int32, _module(index).get_global("pk_wgmma_built")).get()) == 1

    return Native("cupy", launch, wgmma=wgmma)
