"""PyTorch's own sparse BSR tensors as a backend: torch.sparse_bsr_tensor @ dense (MKL on the CPU, for float32
and float64; cuSPARSE/Triton on CUDA). The input gradient multiplies by the transposed block structure, the block
gradient gathers each stored block's rows and columns (in chunks, to bound memory)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .layout import BlockLayout

_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float16, torch.bfloat16, torch.float32)}
_CHUNK = 1 << 24  # elements of gathered operands per step of the block gradient


def _bsr(row_ptr, col_idx, values, shape) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse BSR tensor support is in beta")
        return torch.sparse_bsr_tensor(row_ptr, col_idx, values, size=shape, check_invariants=False)


def _pad_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1])) if x.shape[1] != width else x


class TorchBSR:
    name = "torch"

    def unsupported(self, device: torch.device, dtype: torch.dtype, block: int) -> str | None:
        allowed = _DTYPES.get(device.type, ())
        if dtype not in allowed:
            return f"PyTorch's BSR matmul on {device.type} takes {', '.join(map(str, allowed)) or 'nothing'}, not {dtype}"
        return None

    def forward(self, x: torch.Tensor, values: torch.Tensor, layout: BlockLayout,
                bias: torch.Tensor | None) -> torch.Tensor:
        rows, cols = layout.padded
        w = _bsr(layout.row_ptr, layout.col_idx, values, (rows, cols))
        y = (w @ _pad_cols(x, cols).t()).t()[:, : layout.out_features]
        return y + bias if bias is not None else y.contiguous()

    def grad_input(self, dy: torch.Tensor, values: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
        rows, cols = layout.padded
        wt = _bsr(layout.t_row_ptr, layout.t_col_idx, values[layout.t_perm.long()].transpose(1, 2).contiguous(),
                  (cols, rows))
        return (wt @ _pad_cols(dy, rows).t()).t()[:, : layout.in_features].contiguous()

    def grad_values(self, dy: torch.Tensor, x: torch.Tensor, layout: BlockLayout, values: torch.Tensor) -> torch.Tensor:
        rows, cols = layout.padded
        b, m = layout.block, dy.shape[0]
        g = _pad_cols(dy, rows).view(m, -1, b)
        xs = _pad_cols(x, cols).view(m, -1, b)
        out = torch.empty_like(values)
        step = max(1, _CHUNK // max(1, m * b))
        for i in range(0, layout.nnzb, step):
            r, c = layout.row_idx[i:i + step].long(), layout.col_idx[i:i + step].long()
            out[i:i + step] = torch.einsum("mir,mik->irk", g[:, r], xs[:, c])
        return out
