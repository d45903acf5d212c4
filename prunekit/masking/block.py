"""Block masks: whole R x C tiles of the weight kept or pruned, ranked by the sum of their weights' scores.

Pruning whole tiles is what lets a block-sparse kernel skip work (prunekit.kernels; Gray, Radford, Kingma,
"GPU Kernels for Block-Sparse Weights", 2017): a kept tile is one dense R x C product, a pruned tile is never read.
Narang, Undersander, Diamos, "Block-Sparse Recurrent Neural Networks" (2017) rank blocks by their largest
magnitude; here a tile's score is the sum of its elements' scores, whatever estimator made them, so that the
estimator's notion of importance carries over unchanged (for magnitude that ranks by the tile's L1 norm).

Ragged edges are refused rather than rounded: a layer the tiles do not cover exactly raises before anything is
pruned, so every counted unit is a full tile and a budget in tiles is exact.
"""
from __future__ import annotations

import torch

from ..errors import BudgetError
from .unstructured import lowest, lowest_per_row


def check_block(shape: tuple[int, int], block: tuple[int, int], name: str = "layer") -> None:
    (rows, cols), (r, c) = shape, block
    if rows % r or cols % c:
        raise BudgetError(f"block {r}x{c} granularity needs both dimensions of every layer to be multiples of the "
                          f"block, but {name} is {rows}x{cols}; exclude it or choose a block that tiles it "
                          f"(e.g. 'block16x16')")


def tile_sums(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[rows / R, cols / C]: the sum of each tile's scores."""
    rows, cols = scores.shape
    r, c = block
    check_block((rows, cols), block)
    return scores.reshape(rows // r, r, cols // c, c).sum(dim=(1, 3))


def expand(tile_keep: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A per-tile mask blown up to the weight's shape."""
    return tile_keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)


def block_mask(scores: torch.Tensor, count: int, block: tuple[int, int], group: str = "layer") -> torch.Tensor:
    """Keep-mask pruning the `count // (R*C)` tiles of lowest summed score (count must be whole tiles).

    group "layer" ranks all tiles of the layer; "row" ranks within each row of tiles (R output rows), the block
    analogue of Wanda's per-output comparison, with the leftover tiles going where the next score is lowest.
    """
    area = block[0] * block[1]
    if count % area:
        raise ValueError(f"block masks prune whole {block[0]}x{block[1]} tiles; {count} weights is not a multiple "
                         f"of {area}")
    sums = tile_sums(scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores, block)
    if group == "row":
        return expand(lowest_per_row(sums, count // area), block)
    if group == "layer":
        return expand(lowest(sums, count // area), block)
    raise ValueError(f"unknown comparison group {group!r}; use 'layer' or 'row'")
