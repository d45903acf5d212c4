"""Masking: scores + an exact count + a granularity -> a keep-mask. Knows nothing of where scores came from."""
from __future__ import annotations

import torch

from .nm import check_nm, nm_mask
from .unstructured import lowest, lowest_per_row


def select(scores: torch.Tensor, count: int, nm: tuple[int, int] | None = None, group: str = "layer") -> torch.Tensor:
    """Keep-mask (True = keep) for a [out, in] score matrix.

    count: weights to prune (ignored for N:M, which fixes it). group: "layer" compares all scores of the layer,
    "row" compares within each output row (Wanda's choice).
    """
    if nm is not None:
        return nm_mask(scores, *nm)
    if group == "row":
        return lowest_per_row(scores, count)
    if group == "layer":
        return lowest(scores, count)
    raise ValueError(f"unknown comparison group {group!r}; use 'layer' or 'row'")


__all__ = ["select", "lowest", "lowest_per_row", "nm_mask", "check_nm"]
