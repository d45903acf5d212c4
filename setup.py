"""Build hooks only; the metadata lives in setup.cfg.

The CPU kernels (prunekit.kernels._sparse_cpu, from prunekit/kernels/csrc/sparse_cpu.cpp) build with any C++17
compiler and only Python's headers, so `pip install` builds them in its isolated environment; they are optional: where
the build fails the install goes on, and prunekit compiles them on first use instead (or, with no compiler at all,
runs pruned layers dense, saying so once). PRUNEKIT_BUILD_CPU=0 skips them.

The CUDA extension (prunekit._cuda_ext, from cuda_ext/) is built only when torch with CUDA and nvcc are importable
in the build environment. pip builds in isolation by default, where torch is absent (and must stay absent: a torch
build requirement would pull a multi-GB CUDA wheel), so a plain `pip install -e .` installs pure Python in
seconds, and the kernels still run through CuPy if it is installed. To build the extension:

    PRUNEKIT_BUILD_CUDA=1 pip install -e . --no-build-isolation    # fails loudly if it cannot build

PRUNEKIT_BUILD_CUDA=0 never builds it; unset, it builds when it can and says why when it does not. The
architectures are torch's (TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0", or the visible GPU's).
"""
import hashlib
import os
import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CUDA_SOURCES = ["bsr_kernels.cuh", "launch.cu", "extension.cpp", "op.cpp"]


class BuildPyWithKernelSources(build_py):
    """Ships the CUDA sources inside the package (prunekit/kernels/_csrc) for the CuPy loader and JIT builds."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "prunekit" / "kernels" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for name in CUDA_SOURCES:
            shutil.copy2(ROOT / "cuda_ext" / name, target / name)


def _say(message: str) -> None:
    print(f"prunekit setup: {message}", file=sys.stderr)


def cuda_extension():
    """([extension], {"build_ext": ...}) when the extension should and can be built, else ([], {})."""
    flag = os.environ.get("PRUNEKIT_BUILD_CUDA", "").strip()
    if flag == "0":
        return [], {}
    required = flag == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable in the build environment (pip builds in isolation; add --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(CUDA_HOME, "bin")) is None:
            reason = "nvcc was not found (set CUDA_HOME)"
        else:
            ext = CUDAExtension(
                "prunekit._cuda_ext",
                sources=["cuda_ext/extension.cpp", "cuda_ext/op.cpp", "cuda_ext/launch.cu"],
                include_dirs=[str(ROOT / "cuda_ext")],
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
            )
            _say("building the CUDA extension prunekit._cuda_ext")
            return [ext], {"build_ext": BuildExtension}
    if required:
        raise SystemExit(f"PRUNEKIT_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    _say(f"not building the CUDA extension: {reason}")
    return [], {}


def cpu_extension():
    """[the CPU kernels' extension], unless PRUNEKIT_BUILD_CPU=0. Optional: a failed build warns and goes on."""
    if os.environ.get("PRUNEKIT_BUILD_CPU", "").strip() == "0":
        return []
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # Apple's clang has no OpenMP: one thread there
    source = "prunekit/kernels/csrc/sparse_cpu.cpp"
    sha = hashlib.sha256((ROOT / source).read_bytes()).hexdigest()  # the loader rebuilds if the source changed since
    return [Extension("prunekit.kernels._sparse_cpu", sources=[source], define_macros=[("PK_SOURCE_SHA", f'"{sha}"')],
                      extra_compile_args=["-O3", "-std=c++17", *openmp], extra_link_args=openmp, language="c++",
                      optional=True)]


extensions, commands = cuda_extension()
setup(ext_modules=cpu_extension() + extensions, cmdclass={"build_py": BuildPyWithKernelSources, **commands})
