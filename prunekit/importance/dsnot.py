"""DSnoT: training-free prune-and-grow swaps that lower a pruned layer's reconstruction error, after any mask."""
from __future__ import annotations

import torch

from ..calibration.stats import LayerStats, Needs
from ..errors import PrunekitError
from .base import ESTIMATORS, Estimator
from .reconstruction import curvature, reconstruction_error, refit_on_support, swap


@ESTIMATORS.register("dsnot")
class DSnoT(Estimator):
    """Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs" (ICLR 2024), on the
    exact layer-wise error: after `base` prunes, each row repeatedly grows back the pruned weight whose return
    lowers ||(W₀ − Ŵ) X||² the most (with its original value) and prunes the kept weight whose removal, given that
    growth, raises it the least (within the same N:M group), as long as the pair lowers the error. Every quantity is
    read off H = X Xᵀ and the residual's product with it, updated in place after each swap. The count never changes;
    the kept weights are then refitted on their support when `base` reconstructs (SparseGPT, ADMM), and the result
    is kept only if its error is lower than base's, so refinement never makes a layer worse. Block masks are
    returned as base made them.

    base: the estimator whose mask is refined (one the block runner feeds: magnitude, wanda, sparsegpt, admm).
    cycles: swap rounds per row at most.
    """

    needs = Needs.HESSIAN

    def __init__(self, base: str | Estimator = "wanda", cycles: int = 50, refit_iterations: int = 50):
        self.base = ESTIMATORS.create(base)
        if self.base.needs & Needs.WHOLE_MODEL:
            raise PrunekitError(f"DSnoT refines masks of estimators the block runner feeds, not {self.base.name!r}")
        if cycles < 0 or refit_iterations < 0:
            raise PrunekitError(f"need cycles >= 0 and refit_iterations >= 0; got {cycles}, {refit_iterations}")
        self.cycles, self.refit_iterations = cycles, refit_iterations
        self.needs = Needs.HESSIAN | self.base.needs

    def scores(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        return self.base.scores(weight, stats)

    def prune(self, weight: torch.Tensor, stats: LayerStats, count: int, nm: tuple[int, int] | None,
              block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pruned, keep = self.base.prune(weight, stats, count, nm, block)
        if block is not None or not self.cycles:
            return pruned, keep
        w0 = weight.float()
        h = curvature(stats.hessian().to(w0.device).float())
        w, new_keep = swap(w0, h, pruned.float(), keep, nm, self.cycles)
        if self.refit_iterations and not torch.equal(pruned.float(), w0 * keep):  # base reconstructs: so does this
            w = refit_on_support(w0, h, new_keep, w, self.refit_iterations)
        if reconstruction_error(w0, w, h) < reconstruction_error(w0, pruned.float(), h):
            return w.to(weight.dtype), new_keep
        return pruned, keep

    def __repr__(self) -> str:
        return f"DSnoT(base={self.base!r}, cycles={self.cycles})"
