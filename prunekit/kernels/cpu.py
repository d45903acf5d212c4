"""prunekit's CPU sparse kernels (csrc/sparse_cpu.cpp): y = x W^T (+ b) for W in the bitmask layout (bitmask.py)
or the block layout (layout.py), fp32 or bf16 weights, fp32 accumulation, on torch's thread count.

The AVX-512 or AVX2 path is chosen by what the CPU reports (`isa()`); `force_isa("avx2")` (or the environment
variable PRUNEKIT_CPU_ISA=avx2) caps it, to test the AVX2 path on an AVX-512 machine or to compare them. On AVX-512,
bf16 layers use AVX512-VBMI2's 16-bit expand to decompress and, where the CPU also has AVX512-BF16, its dot-product
instruction to multiply (bf16 inputs stay bf16); PRUNEKIT_CPU_VBMI2=0 keeps them off both, for the same reason. Where the
extension cannot be loaded or built, `unavailable()` says why, a one-line warning is shown once, and every caller
runs the dense path instead.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

from ..errors import PrunekitError
from .layout import KERNEL_BLOCKS, BlockLayout

ISAS = ("portable", "avx2", "avx512")
DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_state: dict = {}  # "module" or "reason", once loaded; "forced": the ISA cap; "isa": the ISA code now in use


def _module():
    if "module" not in _state and "reason" not in _state:
        from .cpu_build import load

        try:
            _state["module"] = load()
        except ImportError as e:
            _state["reason"] = str(e)
            warnings.warn(f"prunekit: the CPU sparse kernels are unavailable ({e}); compressed layers run dense",
                          RuntimeWarning, stacklevel=3)
    return _state.get("module")


def _ext():
    """The loaded extension (what the product functions call; their callers checked unsupported() first)."""
    module = _state.get("module")
    if module is None and _module() is None:
        raise PrunekitError(unavailable())
    return _state["module"]


def _isa_code() -> int:
    code = _state.get("isa")
    if code is None:
        code = _state["isa"] = ISAS.index(isa())
    return code


def unavailable() -> str | None:
    """None when the kernels can run, else why not."""
    return None if _module() is not None else f"the CPU sparse kernels are unavailable: {_state['reason']}"


def isa() -> str:
    """The instruction set the kernels run with: what the CPU supports, capped by force_isa / PRUNEKIT_CPU_ISA."""
    module = _module()
    if module is None:
        return "none"
    cap = _state.get("forced") or os.environ.get("PRUNEKIT_CPU_ISA") or "avx512"
    if cap not in ISAS:
        raise PrunekitError(f"PRUNEKIT_CPU_ISA={cap!r}; choose from {', '.join(ISAS)}")
    return ISAS[min(module.cpu_isa(), ISAS.index(cap))]


def force_isa(name: str | None) -> None:
    """Caps the instruction set ("portable", "avx2", "avx512"); None lifts the cap."""
    if name is not None and name not in ISAS:
        raise PrunekitError(f"unknown instruction set {name!r}; choose from {', '.join(ISAS)}")
    _state["forced"] = name
    _state.pop("isa", None)


def unsupported(dtype: torch.dtype) -> str | None:
    """None when the kernels take weights of `dtype`, else why not."""
    reason = unavailable()
    if reason is None and dtype not in DTYPES:
        reason = f"the CPU sparse kernels take float32 or bfloat16 weights, not {dtype}"
    return reason


def usable(dtype: torch.dtype) -> bool:
    """Whether the extension can be called now on weights of `dtype`: it is loaded and takes them, and torch.compile
    is not tracing (it cannot follow raw pointers; the products are operators there, see _traceable)."""
    return unsupported(dtype) is None and not torch.compiler.is_compiling()


def _operands(x: torch.Tensor, values: torch.Tensor, in_features: int,
              out_features: int) -> tuple[torch.Tensor, int, int, torch.Tensor]:
    """(x with unit element stride, its rows, its row stride, the output [..., out]) after the checks that raw
    pointers need. Kept lean: a decoding model calls this a few hundred times per token."""
    shape = x.shape
    if x.dtype != values.dtype:
        raise TypeError(f"input is {x.dtype} but the weight is {values.dtype}")
    if not (x.is_cpu and values.is_cpu):
        raise ValueError(f"the CPU kernels take CPU tensors; got input on {x.device}, weight on {values.device}")
    if shape[-1] != in_features:
        raise ValueError(f"input has {shape[-1]} features, the layer takes {in_features}")
    y = x.new_empty((*shape[:-1], out_features))  # (torch.empty's dtype= costs more than the product at one row)
    if x.is_contiguous():
        return x, x.numel() // in_features, in_features, y
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:  # rows may be strided, elements may not
        x2 = x2.contiguous()
    return x2, x2.shape[0], x2.stride(0), y


def _bias(bias: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if bias is None else (bias.data_ptr(), DTYPES[bias.dtype])


def bitmask_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                   bias: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """x [..., in] -> [..., out] with the [out, in] weight given by its kept `values`, `bitmask` [out, ceil(in / 8)]
    and `row_offsets` (bitmask.py)."""
    return _bitmask_linear(x, values, bitmask, row_offsets, bias, shape[1], shape[0])


def _bitmask_linear(x: torch.Tensor, values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor,
                    bias: torch.Tensor | None, in_features: int, out_features: int) -> torch.Tensor:
    x2, rows, ldx, y = _operands(x, values, in_features, out_features)
    dt = DTYPES[values.dtype]
    _ext().bitmask_linear(x2.data_ptr(), rows, in_features, ldx, dt, values.data_ptr(), dt, values.numel(),
                          bitmask.data_ptr(), bitmask.shape[1], row_offsets.data_ptr(), out_features, *_bias(bias),
                          y.data_ptr(), out_features, dt, _isa_code(), torch.get_num_threads())
    return y


def block_linear(x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] with W given by its stored blocks `values` [nnzb, B, B] and `layout`."""
    return _block_linear(x, values, layout.row_ptr, layout.col_idx, bias, layout.in_features, layout.out_features,
                         layout.block)


def _block_linear(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                  bias: torch.Tensor | None, in_features: int, out_features: int, block: int) -> torch.Tensor:
    x2, rows, ldx, y = _operands(x, values, in_features, out_features)
    dt = DTYPES[values.dtype]
    _ext().block_linear(x2.data_ptr(), rows, in_features, ldx, dt, values.data_ptr(), dt, block, row_ptr.data_ptr(),
                        col_idx.data_ptr(), out_features, *_bias(bias), y.data_ptr(), out_features, dt, _isa_code(),
                        torch.get_num_threads())
    return y


# The kernels as torch operators, for torch.compile: in its graph each is one opaque call, where the extension's raw
# pointers would break the graph at every layer. Eager calls go straight to the extension: through the dispatcher
# and back into Python a call costs about 14 us more, longer than a one-row product of a small layer. (A namespace
# of their own: the CUDA extension defines prunekit's with TORCH_LIBRARY, which must be the namespace's only one.)
_bitmask_op = torch.library.custom_op(
    "prunekit_cpu::bitmask_linear", mutates_args=(),
    schema="(Tensor x, Tensor values, Tensor bitmask, Tensor row_offsets, Tensor? bias, int in_features, "
           "int out_features) -> Tensor")(_bitmask_linear)
_block_op = torch.library.custom_op(
    "prunekit_cpu::block_linear", mutates_args=(),
    schema="(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias, int in_features, "
           "int out_features, int block) -> Tensor")(_block_linear)
# (their fakes: the output, unfilled, for tracing)
_bitmask_op.register_fake(lambda x, values, bitmask, row_offsets, bias, in_features, out_features: x.new_empty(
    *x.shape[:-1], out_features))
_block_op.register_fake(lambda x, values, row_ptr, col_idx, bias, in_features, out_features, block: x.new_empty(
    *x.shape[:-1], out_features))


def _traceable(op, direct, *fixed):
    """x -> direct(x, *fixed), or op(x, *fixed) while torch.compile traces."""
    return lambda x: op(x, *fixed) if torch.compiler.is_compiling() else direct(x, *fixed)


def bitmask_product(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, bias: torch.Tensor | None,
                    shape: tuple[int, int]):
    """x -> bitmask_linear(x, ...) with everything but x bound (and an operator in a compiled graph)."""
    return _traceable(_bitmask_op, _bitmask_linear, values, bitmask, row_offsets, bias, shape[1], shape[0])


def bitmask_dense(values: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor, shape: tuple[int, int],
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense [out, in] weight of a bitmask layout (into `out`, contiguous and of that shape, if given)."""
    if out is None:
        out = torch.empty(shape, dtype=values.dtype)
    _ext().bitmask_dense(values.data_ptr(), DTYPES[values.dtype], values.numel(), bitmask.data_ptr(),
                         bitmask.shape[1], row_offsets.data_ptr(), shape[0], shape[1], out.data_ptr(), _isa_code(),
                         torch.get_num_threads())
    return out


def evict(tensors) -> bool:
    """Drops the memory of `tensors` (CPU tensors; each storage once) from the CPU's caches, so that their next read
    comes from memory, as a model's weights do in decoding. False where it cannot: no x86 CPU, or no extension."""
    module, seen = _module(), set()
    if module is None:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        if not module.evict(storage.data_ptr(), storage.nbytes()):
            return False
    return True


_scratch = threading.local()


def workspace(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """A [out, in] buffer of this thread's, reused by every layer: the dense weight a compressed layer is decompressed
    into for one product (where dense wins, prefill say) costs the largest layer's size once, not every layer's,
    and no fresh allocation (one of a 64 MB weight page-faulted for 30 ms a call here)."""
    need = shape[0] * shape[1]
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < need:
        buffer = buffers[dtype] = torch.empty(need, dtype=dtype)
    return buffer[:need].view(shape)


class CpuBSR:
    """The block kernel as a backend of BlockSparseLinear (backends.py): forward on the kernel; the gradients (not
    what this kernel is for) through dense products, so a converted model still trains."""

    name = "cpu"

    def unsupported(self, device: torch.device, dtype: torch.dtype, block: int) -> str | None:
        if device.type != "cpu":
            return f"runs on the CPU, not {device.type}"
        if block not in KERNEL_BLOCKS:
            return f"has kernels for blocks {KERNEL_BLOCKS}, not {block}"
        return unsupported(dtype)

    def forward(self, x, values, layout: BlockLayout, bias):
        return block_linear(x, values, layout, bias)

    def bind(self, x2, values, layout: BlockLayout, bias):
        """The inference forward as a function of the input alone (any leading dimensions), as Native.bind (and an
        operator in a compiled graph)."""
        return _traceable(_block_op, _block_linear, values, layout.row_ptr, layout.col_idx, bias, layout.in_features,
                          layout.out_features, layout.block)

    def grad_input(self, dy, values, layout: BlockLayout):
        return dy @ layout.scatter(values)

    def grad_values(self, dy, x, layout: BlockLayout, values):
        return layout.gather(dy.t() @ x)
