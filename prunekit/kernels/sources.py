"""Where the CUDA sources are: inside the installed package (a wheel build copies them to kernels/_csrc), or in the
repository's cuda_ext/ for a source tree or an editable install."""
from __future__ import annotations

from pathlib import Path

KERNELS = "bsr_kernels.cuh"


def directory() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parents[1] / "cuda_ext"):
        if (candidate / KERNELS).is_file():
            return candidate
    raise FileNotFoundError(f"prunekit's CUDA sources ({KERNELS}) are neither in {here / '_csrc'} nor in the "
                            f"source tree's cuda_ext/; reinstall prunekit")


def kernel_source() -> str:
    return (directory() / KERNELS).read_text()
