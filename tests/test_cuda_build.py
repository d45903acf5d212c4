"""The CUDA sources compile where CI can compile them, though it cannot run them: with nvcc for sm_80 and sm_90
(linked into the extension's binding, which must import and list every kernel), and through NVRTC when CuPy is
installed. Skipped where nvcc or CuPy is missing."""
import importlib.util
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
            for rows in (1, 3, 16, 17):
                for cap in ((7, 5), (9, 0)):
                    names.add(plan.forward(rows, 1, b, dtype, cap).name)
                    names.add(plan.forward(rows, 1, b, dtype, cap, transposed=True).name)
                    names.add(plan.grad_values(1, b, dtype, cap).name)
    return names


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_builds_the_kernels_for_sm80_and_sm90_and_the_binding_imports(tmp_path):
    src = directory()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    out = tmp_path / f"_cuda_ext{suffix}"
    torch_include = Path(torch.__file__).parent / "include"  # torch ships pybind11
    cmd = ["nvcc", "-std=c++17", "-O1", "-shared", "-Xcompiler", "-fPIC", "-DTORCH_EXTENSION_NAME=_cuda_ext",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
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
    assert entry_points() <= set(ext.kernels()) and len(ext.kernels()) == 72
    with pytest.raises(ValueError, match="no kernel named"):
        ext.launch("pk_nothing", [1, 1, 1], [1, 1, 1], plan.pack(), 0)
    with pytest.raises(ValueError, match="wrong block size"):
        ext.launch("pk_tc_bf16_b64_n", [1, 1, 1], [256, 1, 1], plan.pack(), 0)


def test_nvrtc_compiles_the_same_sources():
    pytest.importorskip("cupy")
    from prunekit.kernels.cupy_loader import compile_ptx

    try:
        ptx = compile_ptx("80")
    except Exception as e:  # noqa: BLE001 - NVRTC's library may be missing beside CuPy
        if "nvrtc" in str(e).lower() and "could not" not in str(e).lower():
            pytest.skip(f"NVRTC is not usable here: {e}")
        raise
    for name in entry_points():
        assert f".entry {name}(" in ptx, name


def test_cupy_backend_says_how_to_get_it_when_missing(monkeypatch):
    from prunekit.kernels import backends, cupy_loader

    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ImportError, match=r"pip install prunekit\[cuda\]"):
        cupy_loader.cupy_backend()
    reason = backends.unavailable("cupy", torch.device("cpu"), torch.float16, 32)
    assert "runs on CUDA devices" in reason
