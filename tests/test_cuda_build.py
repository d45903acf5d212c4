"""The CUDA sources compile where CI can compile them, though it cannot run them: with nvcc for sm_80, sm_90 and
sm_90a (whose wgmma code ptxas assembles; linked into the extension's binding, which must import and list every
kernel), and through NVRTC when CuPy is installed (as CuPy loads them on Hopper: sm_90a). Skipped where nvcc or
CuPy is missing."""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from prunekit.kernels import launch as plan
from prunekit.kernels.sources import directory


def entry_points() -> set[str]:
    """Every kernel name the planner can ask for."""
    names = set()
    for dtype in plan.DTYPE_NAMES:
        for b in (16, 32, 64):
            for rows in (1, 3, 16, 17, 33, 65, 2048):
                for block_rows in (1, 300, 600):  # one-row kernels split 4, 2 and 1 ways
                    for cap in ((7, 5), (9, 0)):
                        names.update(v.name for v in plan.variants(rows, block_rows, b, dtype, cap, wgmma=True))
                        names.add(plan.forward(rows, block_rows, b, dtype, cap, transposed=True).name)
                        names.add(plan.grad_values(1, b, dtype, cap).name)
    return names


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_builds_the_kernels_for_sm80_sm90_and_sm90a_and_the_binding_imports(tmp_path):
    src = directory()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    out = tmp_path / f"_cuda_ext{suffix}"
    torch_include = Path(torch.__file__).parent / "include"  # torch ships pybind11
    cmd = ["nvcc", "-std=c++17", "-O1", "-shared", "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=_cuda_ext",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-gencode", "arch=compute_90a,code=sm_90a",
           f"-I{sysconfig.get_paths()['include']}", f"-I{torch_include}", f"-I{src}",
           str(src / "extension.cpp"), str(src / "launch.cu"), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_cuda_ext", out)
    try:
        ext = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ext)
    except ImportError as e:  # the CUDA runtime library may be absent where only the compiler is installed
        pytest.skip(f"built, but cannot load the CUDA runtime here: {e}")
    finally:
        sys.modules.pop("_cuda_ext", None)
    assert ext.params_size() == len(plan.pack())
    assert entry_points() <= set(ext.kernels()) and len(ext.kernels()) == 116
    assert [ext.kernel_index(name) for name in ext.kernels()] == list(range(116)) and ext.kernel_index("pk_x") == -1
    # whether the loaded code has wgmma: 0 or 1 on a GPU (which of the three builds the driver took), else an error
    assert ext.has_wgmma() in ((0, 1) if torch.cuda.is_available() else range(-10_000, 0))
    with pytest.raises(ValueError, match="no kernel named"):
        ext.launch("pk_nothing", [1, 1, 1], [1, 1, 1], plan.pack(), 0)
    with pytest.raises(ValueError, match="wrong block size"):
        ext.launch("pk_tc_bf16_b64_m128_n", [1, 1, 1], [256, 1, 1], plan.pack(), 0)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_torch_operator_compiles(tmp_path):
    """op.cpp (prunekit::bsr_linear) against torch's headers. A CPU build of torch ships c10/cuda's headers but not
    the one its CMake generates; that one only chooses symbol visibility, so an empty stand-in does for a compile
    check. Linking needs a CUDA build of torch: the GPU tests load it."""
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    torch_include = Path(torch.__file__).parent / "include"
    cmd = ["nvcc", "-std=c++20", "-c", "-Xcompiler", "-fPIC", f"-I{tmp_path}", f"-I{torch_include}",
           f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
           str(directory() / "op.cpp"), "-o", str(tmp_path / "op.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


def nvrtc_or_skip():
    pytest.importorskip("cupy")
    from cupy_backends.cuda.libs import nvrtc

    try:
        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - NVRTC's library may be missing beside CuPy
        pytest.skip(f"NVRTC is not usable here: {e}")


def test_nvrtc_compiles_the_same_sources_with_wgmma_for_sm90a():
    """What CuPy runs on an H100 or H200: every kernel, and the tcw kernels on wgmma (CuPy's own RawModule
    compiles for sm_90, where they are stubs)."""
    nvrtc_or_skip()
    from prunekit.kernels.cupy_loader import compile_kernels

    ptx = compile_kernels("90a", cubin=False).decode()
    for name in entry_points():
        assert f".entry {name}(" in ptx, name
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx


def test_nvrtc_targets_sm90a_on_hopper_and_ptx_where_it_is_older_than_the_gpu():
    from prunekit.kernels.cupy_loader import nvrtc_target

    cuda13 = (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121)
    assert nvrtc_target((9, 0), cuda13) == ("90a", True)
    assert nvrtc_target((8, 6), cuda13) == ("86", True)
    assert nvrtc_target((10, 3), cuda13) == ("103", True)
    assert nvrtc_target((12, 0), (75, 80, 86, 89, 90)) == ("90", False)  # the driver compiles the PTX
    assert nvrtc_target((8, 9), (75, 80, 86, 90)) == ("86", False)


def test_the_cubin_is_compiled_once_and_cached_by_source_and_target(monkeypatch, tmp_path):
    nvrtc_or_skip()
    from prunekit.kernels import cupy_loader

    monkeypatch.setenv("PRUNEKIT_CACHE", str(tmp_path))
    made = []
    monkeypatch.setattr(cupy_loader, "compile_kernels", lambda target, cubin: made.append(target) or target.encode())
    first = cupy_loader.compiled("90a", True)
    assert cupy_loader.compiled("90a", True) == first and made == ["90a"] and first.read_bytes() == b"90a"
    assert first.suffix == ".cubin" and cupy_loader.compiled("90", False).suffix == ".ptx" and made == ["90a", "90"]
    monkeypatch.setattr(cupy_loader, "kernel_source", lambda: "// another source")
    assert cupy_loader.compiled("90a", True) != first and made == ["90a", "90", "90a"]


def test_cupy_loads_the_cubin_for_the_device_s_capability(monkeypatch, tmp_path):
    """The wiring a GPU would run: the device's compute capability as CuPy reports it ("90") picks the sm_90a cubin,
    which RawModule loads from its cached path, once per device."""
    nvrtc_or_skip()
    import cupy

    from prunekit.kernels import cupy_loader

    class Gpu:
        def __init__(self, index):
            self.compute_capability = {0: "90", 1: "86"}[index]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    asked, loaded = [], []
    monkeypatch.setattr(cupy.cuda, "Device", Gpu)
    monkeypatch.setattr(cupy, "RawModule", lambda path: loaded.append(path) or path)
    monkeypatch.setattr(cupy_loader, "compiled", lambda target, cubin: asked.append((target, cubin)) or tmp_path / target)
    cupy_loader._module.cache_clear()
    try:
        assert cupy_loader._module(0) == str(tmp_path / "90a") and cupy_loader._module(1) == str(tmp_path / "86")
        cupy_loader._module(0)
    finally:
        cupy_loader._module.cache_clear()
    assert asked == [("90a", True), ("86", True)] and len(loaded) == 2


def test_cupy_backend_says_how_to_get_it_when_missing(monkeypatch):
    from prunekit.kernels import backends, cupy_loader

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"pip install prunekit\[cuda\]"):
        cupy_loader.cupy_backend()
    reason = backends.unavailable("cupy", torch.device("cpu"), torch.float16, 32)
    assert "runs on CUDA devices" in reason


def _tree(root: Path, files: dict[str, list[str]]) -> None:
    for folder, names in files.items():
        for name in names:
            (root / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_text("")


@pytest.mark.parametrize("layout", ["cuda12 wheels", "cuda13 wheels", "cuda13 runtime wheel and a toolkit", "toolkit"])
def test_nvrtc_include_path_finds_every_header(tmp_path, monkeypatch, layout):
    """The headers the kernels include, CUDA 13's crt/mma.h among them (its absence broke CuPy on the H200), found in
    each layout they come in: pip's CUDA 12 wheels (crt/ in cuda_nvcc's folder), CUDA 13's merged nvidia/cu13, and a
    system toolkit, preferred whole when one holds everything."""
    from prunekit.kernels import cupy_loader

    site, toolkit = tmp_path / "site", tmp_path / "cuda"
    full = ["cuda_fp16.h", "cuda_bf16.h", "cuda_pipeline_primitives.h", "mma.h", "crt/mma.h"]
    if layout == "cuda12 wheels":
        _tree(site, {"nvidia/cuda_runtime/include": full[:4], "nvidia/cuda_nvcc/include": ["crt/mma.h"]})
        expected = [site / "nvidia/cuda_runtime/include", site / "nvidia/cuda_nvcc/include"]
    elif layout == "cuda13 wheels":
        _tree(site, {"nvidia/cu13/include": full})
        expected = [site / "nvidia/cu13/include"]
    elif layout == "cuda13 runtime wheel and a toolkit":  # the H200 image: no nvidia-cuda-crt wheel, nvcc installed
        _tree(site, {"nvidia/cu13/include": full[:4]})
        _tree(toolkit, {"include": full})
        monkeypatch.setenv("CUDA_PATH", str(toolkit))
        expected = [toolkit / "include"]
    else:
        _tree(toolkit, {"targets/x86_64-linux/include": full})
        monkeypatch.setenv("CUDA_HOME", str(toolkit))
        expected = [toolkit / "targets/x86_64-linux/include"]
    for name in ("CUDA_PATH", "CUDA_HOME"):
        if str(toolkit) not in os.environ.get(name, ""):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cupy_loader.shutil, "which", lambda name: None)
    monkeypatch.setattr(cupy_loader, "SYSTEM_CUDA", str(tmp_path / "absent"))
    monkeypatch.setattr(sys, "path", [str(site)])
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", None)
    assert cupy_loader.header_dirs(cupy_loader.candidate_dirs()) == expected
    flags = cupy_loader.include_options()
    assert flags[0] == f"-I{directory()}" and list(flags[1:]) == [f"-I{d}" for d in expected]


def test_nvrtc_missing_headers_say_which_and_where(tmp_path, monkeypatch):
    from prunekit.kernels import cupy_loader

    _tree(tmp_path / "site", {"nvidia/cu13/include": ["cuda_fp16.h", "cuda_bf16.h", "cuda_pipeline_primitives.h",
                                                      "mma.h"]})
    for name in ("CUDA_PATH", "CUDA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cupy_loader.shutil, "which", lambda name: None)
    monkeypatch.setattr(cupy_loader, "SYSTEM_CUDA", str(tmp_path / "absent"))
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setitem(sys.modules, "cuda.pathfinder", None)
    message = cupy_loader._missing_headers('mma.h(55): catastrophic error: cannot open source file "crt/mma.h"')
    assert "crt/mma.h missing from" in message and "nvidia/cu13/include" in message and "nvidia-cuda-crt" in message
