"""Block-sparse-row (BSR) layout of a masked weight: which B x B blocks are stored, listed by block row (for the
forward product) and by block column (for the input gradient, which multiplies by the transpose).

A block is stored when any of its weights is kept. When B does not divide a dimension, the last block row or column
is padded with zeros (never kept), so the kernels always read full blocks and only bound-check the activations.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..errors import PrunekitError

KERNEL_BLOCKS = (16, 32, 64)  # the block sizes cuda_ext is compiled for


@dataclass(eq=False)
class BlockLayout:
    out_features: int
    in_features: int
    block: int
    row_ptr: torch.Tensor  # int32 [block rows + 1]: stored blocks of block row j are row_ptr[j] .. row_ptr[j+1]
    col_idx: torch.Tensor  # int32 [nnzb]: block column of each stored block (row-major order)
    row_idx: torch.Tensor  # int32 [nnzb]: block row of each stored block
    t_row_ptr: torch.Tensor  # int32 [block columns + 1]: the same blocks listed by block column
    t_col_idx: torch.Tensor  # int32 [nnzb]: block row of each, in that listing
    t_perm: torch.Tensor  # int32 [nnzb]: which stored block each entry of that listing is

    INDEX_FIELDS = ("row_ptr", "col_idx", "row_idx", "t_row_ptr", "t_col_idx", "t_perm")

    @property
    def grid(self) -> tuple[int, int]:
        """(block rows, block columns), counting padded edge blocks."""
        return -(-self.out_features // self.block), -(-self.in_features // self.block)

    @property
    def padded(self) -> tuple[int, int]:
        rows, cols = self.grid
        return rows * self.block, cols * self.block

    @property
    def nnzb(self) -> int:
        return int(self.col_idx.numel())

    @property
    def density(self) -> float:
        """Stored blocks over all blocks."""
        rows, cols = self.grid
        return self.nnzb / (rows * cols)

    def indices(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.INDEX_FIELDS}

    def to(self, device) -> "BlockLayout":
        return BlockLayout(**{f.name: getattr(self, f.name).to(device) if f.name in self.INDEX_FIELDS
                              else getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_mask(cls, keep: torch.Tensor, block: int) -> "BlockLayout":
        """The blocks of a [out, in] keep-mask that hold at least one kept weight."""
        if keep.dim() != 2:
            raise PrunekitError(f"a block layout needs a 2-D [out, in] mask, got shape {tuple(keep.shape)}")
        if block < 1:
            raise PrunekitError(f"block size must be positive, got {block}")
        out_features, in_features = keep.shape
        tiles = _tiles(keep.bool(), block).any(dim=3).any(dim=2)  # [block rows, block columns]
        rows, cols = tiles.nonzero(as_tuple=True)  # row-major: sorted by block row, then column
        counts = torch.bincount(rows, minlength=tiles.shape[0])
        order = torch.argsort(cols * tiles.shape[0] + rows)  # by block column, then row
        t_counts = torch.bincount(cols, minlength=tiles.shape[1])
        i32 = lambda t: t.to(torch.int32).contiguous()
        return cls(out_features, in_features, block,
                   row_ptr=i32(torch.cat([counts.new_zeros(1), counts.cumsum(0)])), col_idx=i32(cols),
                   row_idx=i32(rows), t_row_ptr=i32(torch.cat([t_counts.new_zeros(1), t_counts.cumsum(0)])),
                   t_col_idx=i32(rows[order]), t_perm=i32(order))

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """[nnzb, B, B]: the stored blocks of a dense [out, in] tensor (zero-padded at ragged edges)."""
        self._check(weight)
        return _tiles(weight, self.block)[self.row_idx.long(), self.col_idx.long()].contiguous()

    def scatter(self, values: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The dense [out, in] weight the stored blocks make, zero elsewhere (differentiable in `values`); written
        into `out` (a buffer of the padded shape, overwritten) if given."""
        rows, cols = self.grid
        b = self.block
        dense = values.new_zeros(self.padded) if out is None else out.zero_()
        dense.view(rows, b, cols, b).permute(0, 2, 1, 3)[self.row_idx.long(), self.col_idx.long()] = values
        return dense[: self.out_features, : self.in_features]

    def _check(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise PrunekitError(f"weight of shape {tuple(weight.shape)} does not fit a layout for "
                                f"{self.out_features}x{self.in_features}")
        if weight.device != self.row_idx.device:  # indexing across devices fails deep inside torch
            raise PrunekitError(f"weight on {weight.device} but the layout on {self.row_idx.device}: move one of "
                                f"them (layout.to(weight.device)) first")


def _tiles(matrix: torch.Tensor, block: int) -> torch.Tensor:
    """[block rows, block columns, B, B] view of `matrix` zero-padded to whole blocks."""
    out_features, in_features = matrix.shape
    pad_rows, pad_cols = -out_features % block, -in_features % block
    if pad_rows or pad_cols:
        matrix = F.pad(matrix, (0, pad_cols, 0, pad_rows))
    rows, cols = matrix.shape[0] // block, matrix.shape[1] // block
    return matrix.reshape(rows, block, cols, block).permute(0, 2, 1, 3)


def choose_block(keep: torch.Tensor, sizes=KERNEL_BLOCKS, slack: float = 0.05) -> int:
    """The largest block size whose stored blocks hold at most `slack` more weights than the smallest storage among
    `sizes`: a mask pruned in 32x32 tiles stores the same at 16 and 32 and more at 64, so it gets 32; bigger blocks
    mean fewer, denser tiles for the kernels."""
    stored = {b: int(_tiles(keep.bool(), b).any(dim=3).any(dim=2).sum()) * b * b for b in sizes}
    least = min(stored.values())
    return max(b for b in sizes if stored[b] <= least * (1 + slack))
