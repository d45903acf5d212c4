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
    with ρ growing geometrically, so that W and Z meet. Only the support Z ends on is used: the exact refit below
    replaces ADMM's values, so iterating on once the support is fixed (as ALPS does before its own refit) would
    change nothing. Warm-started from SparseGPT's solution. Last, the kept weights of each row are refitted
    exactly on ADMM's support (H_SS ŵ_S = (H w₀)_S, by preconditioned conjugate gradients for all rows at once),
    then go through DSnoT's prune-and-grow swaps (dsnot.py) and a second refit, kept if that lowers the error
    further (not for block masks). SparseGPT's and Wanda's own solutions stay candidates, so the result is never
    worse than theirs on the calibration data. (Refitting their supports as well was measured on SmolLM2's layers:
    it never won and cost a third of the time.)

    iterations: ADMM iterations. rho: the first penalty, in units of H's mean diagonal; growth: its factor per
    iteration (the defaults, 12 from 0.1 by 1.3, were the best error per second of a grid on SmolLM2's layers at
    50%, 70% and 2:4: benchmarks/results/admm_tradeoff.md). refit_iterations: conjugate-gradient steps.
    swaps: prune-and-grow rounds per row (0 to skip).
    """

    needs = Needs.HESSIAN

    def __init__(self, iterations: int = 12, rho: float = 0.1, growth: float = 1.3, refit_iterations: int = 50,
                 swaps: int = 50, damp: float = 0.01):
        if not (iterations >= 1 and rho > 0 and growth >= 1 and refit_iterations >= 0 and swaps >= 0 and damp > 0):
            raise ValueError(f"need iterations >= 1, rho > 0, growth >= 1, refit_iterations >= 0, swaps >= 0, "
                             f"damp > 0; got {iterations}, {rho}, {growth}, {refit_iterations}, {swaps}, {damp}")
        self.iterations, self.rho, self.growth = iterations, rho, growth
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
        support, admm_weight = self._admm(w0, h, start, count, nm, block)
        refit = refit_on_support(w0, h, support, admm_weight, self.refit_iterations)
        candidates = [(refit, support), (start, keep), (wanda_weight, wanda)]
        errors = [reconstruction_error(w0, w, h) for w, _ in candidates]
        winner = min(range(len(candidates)), key=errors.__getitem__)
        best = (errors[winner], *candidates[winner])
        if self.swaps and block is None:  # DSnoT's prune-and-grow on the winner, refitted, if it helps
            w, keep = swap(w0, h, best[1], best[2], nm, self.swaps)
            w = refit_on_support(w0, h, keep, w, self.refit_iterations)
            error = reconstruction_error(w0, w, h)
            if error < best[0]:
                best = (error, w, keep)
        return best[1].to(weight.dtype), best[2]

    def _admm(self, w0: torch.Tensor, h: torch.Tensor, start: torch.Tensor, count: int, nm, block
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The support ADMM ends on, and its dense iterate on that support (where the refit starts: 15-25% fewer
        conjugate-gradient steps than from W₀ on the support, measured)."""
        values, vectors = torch.linalg.eigh(h)  # float32 moves the error by < 0.1% (measured); float64 took 2x
        values = values.clamp_min(0)
        target = w0 @ h
        rho = self.rho * float(torch.diagonal(h).mean())
        z, u = start.clone(), torch.zeros_like(start)
        for _ in range(self.iterations):
            w = ((target + rho * (z - u)) @ vectors) / (values + rho) @ vectors.t()
            v = w + u
            keep = masking.select(v.square(), count, nm, "layer", block)
            z = v * keep
            u += w - z
            rho *= self.growth
        return keep, w * keep

    def __repr__(self) -> str:
        return (f"ADMM(iterations={self.iterations}, rho={self.rho}, growth={self.growth}, "
                f"refit_iterations={self.refit_iterations}, swaps={self.swaps})")
