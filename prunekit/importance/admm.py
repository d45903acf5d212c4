"""ADMM layer-wise reconstruction: the mask and the kept weights optimised together, then refitted exactly."""
from __future__ import annotations

import torch

from .. import masking
from ..calibration.stats import LayerStats, Needs
from .base import ESTIMATORS, Estimator
from .reconstruction import curvature, reconstruction_error, refit_on_support, swap
from .sparsegpt import SparseGPT
from .wanda import Wanda


@ESTIMATORS.register("admm")
class ADMM(Estimator):
    """min ||W X - Ŵ X||² over Ŵ with the budget's sparsity (unstructured, N:M or block), by the alternating direction
    method of multipliers, as in Boža, "Fast and Optimal Weight Update for Pruned Large Language Models" (2024) and
    Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot Pruning of Large Language Models"
    (NeurIPS 2024).

    With H = X Xᵀ (the layer's Hessian, rows of W independent), split Ŵ into a dense W and a sparse Z with W = Z:
        W ← (W₀ H + ρ (Z − U)) (H + ρ I)⁻¹        (one eigendecomposition of H serves every ρ)
        Z ← the projection of W + U on the sparsity set (largest magnitudes; N:M per group; whole tiles)
        U ← U + W − Z
    with ρ growing geometrically, so that W and Z meet; the support may change during the first `update` iterations
    and is then fixed. Warm-started from SparseGPT's solution. Last, the kept weights of each row are refitted
    exactly on their support (H_SS ŵ_S = (H w₀)_S, by preconditioned conjugate gradients for all rows at once,
    started from each candidate's own weights, which never increases its error), for three supports: ADMM's,
    SparseGPT's and Wanda's; the one with the least reconstruction error wins, so the result is never worse than
    SparseGPT's or Wanda's on the calibration data. The winner then goes through DSnoT's prune-and-grow swaps
    (dsnot.py) and a second refit, kept if it lowers the error further (not for block masks).

    iterations, update: ADMM iterations, and how many of them may change the support. rho: the first penalty, in
    units of H's mean diagonal; growth: its factor per iteration. refit_iterations: conjugate-gradient steps.
    swaps: prune-and-grow rounds per row (0 to skip).
    """

    needs = Needs.HESSIAN

    def __init__(self, iterations: int = 30, update: int = 20, rho: float = 0.01, growth: float = 1.3,
                 refit_iterations: int = 50, swaps: int = 50, damp: float = 0.01):
        if not (iterations >= 1 and 0 <= update <= iterations and rho > 0 and growth >= 1 and refit_iterations >= 0
                and damp > 0):
            raise ValueError(f"need iterations >= 1, 0 <= update <= iterations, rho > 0, growth >= 1, "
                             f"refit_iterations >= 0, damp > 0; got {iterations}, {update}, {rho}, {growth}, "
                             f"{refit_iterations}, {damp}")
        self.iterations, self.update, self.rho, self.growth = iterations, update, rho, growth
        self.refit_iterations, self.swaps = refit_iterations, swaps
        self.warm = SparseGPT(damp=damp)

    def scores(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """For allocators and structured scoring: SparseGPT's OBS saliency (what the warm start selects by)."""
        return self.warm.scores(weight, stats)

    def prune(self, weight: torch.Tensor, stats: LayerStats, count: int, nm: tuple[int, int] | None,
              block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w0 = weight.float()
        h = curvature(stats.hessian().to(w0.device).float())
        start, keep = self.warm.prune(w0.clone(), stats, count, nm, block)
        wanda_weight, wanda = Wanda().prune(w0, stats, count, nm, block)
        candidates = [(self._admm(w0, h, start, count, nm, block), None), (keep, start), (wanda, wanda_weight)]
        best = None
        for keep, init in candidates:
            refit = refit_on_support(w0, h, keep, w0 * keep if init is None else init, self.refit_iterations)
            error = reconstruction_error(w0, refit, h)
            if best is None or error < best[0]:
                best = (error, refit, keep)
        if self.swaps and block is None:  # DSnoT's prune-and-grow on the winner, refitted, if it helps
            w, keep = swap(w0, h, best[1], best[2], nm, self.swaps)
            w = refit_on_support(w0, h, keep, w, self.refit_iterations)
            error = reconstruction_error(w0, w, h)
            if error < best[0]:
                best = (error, w, keep)
        return best[1].to(weight.dtype), best[2]

    def _admm(self, w0: torch.Tensor, h: torch.Tensor, start: torch.Tensor, count: int, nm, block) -> torch.Tensor:
        """The support ADMM ends on."""
        values, vectors = torch.linalg.eigh(h.double())
        values, vectors = values.clamp_min(0).float(), vectors.float()
        target = w0 @ h
        rho = self.rho * float(torch.diagonal(h).mean())
        z, u = start.clone(), torch.zeros_like(start)
        keep = start != 0
        for k in range(self.iterations):
            w = ((target + rho * (z - u)) @ vectors) / (values + rho) @ vectors.t()
            v = w + u
            if k < self.update:
                keep = masking.select(v.square(), count, nm, "layer", block)
            z = v * keep
            u += w - z
            rho *= self.growth
        return keep

    def __repr__(self) -> str:
        return (f"ADMM(iterations={self.iterations}, update={self.update}, rho={self.rho}, growth={self.growth}, "
                f"refit_iterations={self.refit_iterations}, swaps={self.swaps})")
