"""N:M masks: in every group of M consecutive input weights of a row, keep the N highest scores."""
from __future__ import annotations

import torch

from ..errors import BudgetError


def check_nm(in_features: int, n: int, m: int, name: str = "layer") -> None:
    if in_features % m:
        raise BudgetError(f"{n}:{m} sparsity needs the input dimension to be a multiple of {m}, but {name} has "
                          f"{in_features} inputs; exclude it or choose another M")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of the same shape as [rows, cols] scores, cols a multiple of m."""
    rows, cols = scores.shape
    check_nm(cols, n, m)
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.view(rows, cols)
