"""The block-sparse backends by name, each loaded on first use, and why one cannot run a given product.

"cuda_ext": the compiled extension; "cupy": the same kernels compiled by NVRTC through CuPy; "torch": PyTorch's
sparse BSR tensors; "cpu": prunekit's CPU kernel (cpu.py, inference; gradients through dense products); "dense":
the weight materialised and multiplied by cuBLAS/MKL (always available; what "auto" falls back to). 2:4
semi-structured sparsity is a different storage and lives in semi_structured.py.
"""
from __future__ import annotations

import torch

from ..errors import PrunekitError

BSR_BACKENDS = ("cuda_ext", "cupy", "cpu", "torch")
NAMES = BSR_BACKENDS + ("dense",)

_loaded: dict[str, object] = {}
_failed: dict[str, str] = {}


def _load(name: str):
    if name == "torch":
        from .torch_bsr import TorchBSR

        return TorchBSR()
    if name == "cpu":
        from .cpu import CpuBSR, unavailable

        reason = unavailable()
        if reason:
            raise ImportError(reason)
        return CpuBSR()
    if name == "cuda_ext":
        from .native import extension_backend

        return extension_backend()
    if name == "cupy":
        from .cupy_loader import cupy_backend

        return cupy_backend()
    raise PrunekitError(f"unknown block-sparse backend {name!r}; choose from {', '.join(NAMES)}")


def get(name: str):
    """The backend object; raises PrunekitError saying why it cannot load."""
    if name not in _loaded and name not in _failed:
        try:
            _loaded[name] = _load(name)
        except ImportError as e:
            _failed[name] = str(e)
        except Exception as e:  # noqa: BLE001 - a JIT build or NVRTC failure: say what it was, once
            _failed[name] = f"{type(e).__name__}: {e}"
    if name in _failed:
        raise PrunekitError(f"backend {name!r} is not available: {_failed[name]}")
    return _loaded[name]


def register(backend) -> None:
    """Adds or replaces a backend (an object with name, unsupported, forward, grad_input, grad_values)."""
    _loaded[backend.name] = backend
    _failed.pop(backend.name, None)


def known(name: str) -> bool:
    return name in NAMES or name in _loaded


def unavailable(name: str, device: torch.device, dtype: torch.dtype, block: int) -> str | None:
    """None when `name` can run products of this dtype and block size on `device`, else the reason."""
    if name == "dense":
        return None
    if not known(name):
        return f"unknown backend {name!r}; choose from {', '.join(NAMES)}"
    if name in ("cuda_ext", "cupy") and device.type != "cuda":
        return f"{name} runs on CUDA devices; this layer is on {device.type}"
    try:
        backend = get(name)
    except PrunekitError as e:
        return str(e)
    reason = backend.unsupported(device, dtype, block)
    return None if reason is None else f"{name} {reason}"


def usable(device: torch.device, dtype: torch.dtype, block: int) -> list[str]:
    """The BSR backends that can run here (registered extra ones included), in order of preference."""
    names = list(BSR_BACKENDS) + [n for n in _loaded if n not in NAMES]
    found = [n for n in names if unavailable(n, device, dtype, block) is None]
    if "cuda_ext" in found and "cupy" in found:  # the same kernels; CuPy's launch only adds host time
        found.remove("cupy")
    return found
