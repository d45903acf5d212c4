"""Statistics of a layer's inputs, gathered over calibration tokens. Pure accumulators, no hooks here.

Everything is kept as sums plus a token count, so that shards gathered on several ranks add up exactly.
"""
from __future__ import annotations

import enum

import torch


class Needs(enum.Flag):
    """What an estimator or allocator needs the runner to gather for each layer."""

    NONE = 0
    INPUT_NORMS = enum.auto()  # per input feature: sum over tokens of x_j^2
    HESSIAN = enum.auto()  # X^T X over tokens (its diagonal gives the norms too)


class LayerStats:
    """Accumulates what `needs` asks for from inputs x of shape [..., in_features]."""

    def __init__(self, needs: Needs, in_features: int, device: torch.device | str = "cpu"):
        self.needs = needs
        self.count = 0
        self.xtx = torch.zeros(in_features, in_features, device=device) if Needs.HESSIAN in needs else None
        self.sq = torch.zeros(in_features, device=device) if self.xtx is None and Needs.INPUT_NORMS in needs else None

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)
        elif self.sq is not None:
            self.sq += x.square().sum(0)

    @property
    def input_sq_norms(self) -> torch.Tensor:
        """||X_j||^2 summed over every calibration token, per input feature j."""
        return self.sq if self.sq is not None else torch.diagonal(self.xtx).clone()

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, the Hessian of the layer-wise squared error ||W X - W' X||^2 / n (SparseGPT)."""
        if self.xtx is None:
            raise RuntimeError("Hessian was not gathered; the estimator must declare Needs.HESSIAN")
        return self.xtx * (2.0 / max(self.count, 1))
