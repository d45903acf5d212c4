"""Finds prunekit's CPU kernel extension (csrc/sparse_cpu.cpp): the module `pip install` built, if it was built from
the source that is here now, or else one compiled now with the machine's C++ compiler and cached (keyed by the source
and the Python it was built for), so that an edited source never runs stale.

    PRUNEKIT_CPU_KERNELS=0   never load or build it (every compressed layer runs dense)
    PRUNEKIT_CACHE=DIR       where compiled modules are kept (default: $XDG_CACHE_HOME/prunekit or ~/.cache/prunekit)
    CXX                      the compiler (default: c++, then g++, then clang++)
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "sparse_cpu.cpp"
NAME = "prunekit.kernels._sparse_cpu"


def load():
    """The extension module; raises ImportError saying why it is not there and could not be built."""
    if os.environ.get("PRUNEKIT_CPU_KERNELS") == "0":
        raise ImportError("PRUNEKIT_CPU_KERNELS=0")
    try:
        from . import _sparse_cpu
    except ImportError:
        _sparse_cpu = None
    if _sparse_cpu is not None and (not SOURCE.is_file() or _sparse_cpu.source_sha() == source_sha()):
        return _sparse_cpu
    return _import(compiled())


def source_sha() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def cache_dir() -> Path:
    root = os.environ.get("PRUNEKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "prunekit")
    return Path(root)


def compiled() -> Path:
    """The cached build for this source and interpreter, compiled first if there is none."""
    if not SOURCE.is_file():
        raise ImportError(f"the kernel source {SOURCE} is missing; reinstall prunekit")
    compiler = os.environ.get("CXX") or next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)
    if compiler is None:
        raise ImportError("no C++ compiler found to build it (install g++, or set CXX)")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    key = hashlib.sha256(f"{source_sha()}|{sys.version}|{compiler}".encode()).hexdigest()[:16]
    target = cache_dir() / key / f"_sparse_cpu{suffix}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    base = [compiler, "-O3", "-std=c++17", "-fPIC", "-shared", f"-I{sysconfig.get_paths()['include']}",
            f'-DPK_SOURCE_SHA="{source_sha()}"', str(SOURCE)]
    errors = []
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for extra in (["-fopenmp"], []):  # without OpenMP (clang without libomp) the kernels run on one thread
            result = subprocess.run(base + extra + ["-o", str(built)], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)  # atomic: a concurrent build finds a whole file or none
                return target
            errors.append(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}")
    raise ImportError(f"compiling it with {compiler} failed: {errors[-1]}")


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
