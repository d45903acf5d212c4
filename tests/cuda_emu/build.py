"""Builds the CPU emulator of the CUDA kernels (emu.cpp + cuda_ext/bsr_kernels.cuh) with the host C++ compiler and
wraps it as a prunekit.kernels backend, so the tests run the real kernels and the real launch planning."""
from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
from pathlib import Path

from prunekit.kernels import launch as plan
from prunekit.kernels.native import Native
from prunekit.kernels.sources import directory

HERE = Path(__file__).resolve().parent


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


def build(cache: Path) -> Path:
    """The emulator's shared library, rebuilt only when a source changed."""
    sources = [HERE / "emu.h", HERE / "emu.cpp", directory() / "bsr_kernels.cuh"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    lib = cache / f"pk_emu_{digest}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(".tmp")
        subprocess.run([compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{directory()}",
                        str(HERE / "emu.cpp"), "-o", str(tmp)], check=True, capture_output=True, text=True)
        tmp.rename(lib)
    return lib


def backend(cache: Path) -> Native:
    lib = ctypes.CDLL(str(build(cache)))
    lib.emu_launch.restype = ctypes.c_int
    lib.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_char_p]
    if lib.emu_params_size() != len(plan.pack()):
        raise RuntimeError("PkParams in bsr_kernels.cuh and launch.py disagree")

    def launch(name, grid, block, params, stream):
        rc = lib.emu_launch(name.encode(), *grid, *block, params)
        if rc:
            raise RuntimeError(f"emulated launch of {name} failed ({rc})")

    # sm_90a as the planner sees it: tensor-core kernels for fp16/bf16 (wgmma's too), simt for fp32.
    return Native("emulated", launch, device_type="cpu", capability=lambda device: (9, 0), stream=lambda device: 0,
                  wgmma=lambda device: True)



def registered(tmp_path_factory) -> Native:
    """The emulated backend, built once per test session (PRUNEKIT_EMU_CACHE keeps it across sessions) and
    registered under the name "emulated"."""
    import os

    from prunekit.kernels import backends

    cache = os.environ.get("PRUNEKIT_EMU_CACHE")
    emu = backend(Path(cache) if cache else tmp_path_factory.getbasetemp() / "cuda_emu")
    backends.register(emu)
    return emu
