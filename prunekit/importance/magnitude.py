"""Magnitude pruning: |W|, compared across the whole layer. Needs no data."""
from __future__ import annotations

import torch

from .base import ESTIMATORS, Estimator


@ESTIMATORS.register("magnitude")
class Magnitude(Estimator):
    """Score |W_ij| (Han et al., "Learning both Weights and Connections for Efficient Neural Networks", 2015)."""

    def scores(self, weight: torch.Tensor, stats=None) -> torch.Tensor:
        return weight.abs()
