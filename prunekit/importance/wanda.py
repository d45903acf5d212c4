"""Wanda: weight magnitude times input activation norm, compared within each output row."""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats, Needs
from .base import ESTIMATORS, Estimator


@ESTIMATORS.register("wanda")
class Wanda(Estimator):
    """S_ij = |W_ij| * ||X_j||_2 over all calibration tokens, ranked per output row.

    Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024).
    The reference code scales ||X_j||^2 by a running sample count; a positive constant per layer changes no
    ranking, so the plain sum over tokens is used.
    """

    needs = Needs.INPUT_NORMS
    group = "row"

    def scores(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return weight.abs() * stats.input_sq_norms.sqrt().unsqueeze(0)
