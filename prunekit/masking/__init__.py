"""Masking: scores + an exact count + a granularity -> a keep-mask. Knows nothing of where scores came from."""
from __future__ import annotations

import torch

from .block import block_mask, check_block
from .nm import check_nm, nm_mask
from .unstructured import lowest, lowest_per_row


def select(scores: torch.Tensor, count: int, nm: tuple[int, int] | None = None, group: str = "layer",
           block: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask (True = keep) for a [out, in] score matrix.

    count: weights to prune (ignored for N:M, which fixes it; whole tiles for a block). group: "layer" compares all
    scores (or tiles) of the layer, "row" compares within each output row (row of tiles) (Wanda's choice).
    block: (R, C) to prune whole tiles, ranked by summed score.
    """
    if nm is not None:
        return nm_mask(scores, *nm)
    if block is not None:
        return block_mask(scores, count, block, group)
    if group == "row":
        return lowest_per_row(scores, count)
    if group == "layer":
        return lowest(scores, count)
    raise ValueError(f"unknown comparison group {group!r}; use 'layer' or 'row'")


__all__ = ["select", "lowest", "lowest_per_row", "nm_mask", "check_nm", "block_mask", "check_block"]
