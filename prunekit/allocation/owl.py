"""OWL: layers with more activation outliers keep more weights."""
from __future__ import annotations

from typing import Sequence

import torch

from ..budget import Budget
from ..calibration.stats import Needs
from .base import ALLOCATORS, Allocator, fit_to_budget


@ALLOCATORS.register("owl")
class OWL(Allocator):
    """Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024).

    On the dense model, each decoder block's outlier ratio D is the percentage of its Wanda scores
    |W_ij| * ||X_j|| that exceed `m` times their mean, pooled over all the block's targets (`per="block"`, as in
    the reference code) or taken per target (`per="layer"`). Sparsity falls as D rises:
        r = 2 * lam * (D - min D) / (max D - min D),   s_l = S - r_l + mean(r),
    which spans 2*lam centred on the budget S, as the reference code does (the paper words the range as
    [S - lam, S + lam]). Two changes make the budget exact for any model: the mean is weighted by layer size
    (and FLOPs per weight under a flops budget; equal to the reference's plain mean when all blocks are alike),
    and sparsities are clipped to the budget's per-layer floor and cap with the shift re-solved (the reference
    floors at 0.01 and may miss the budget).
    When every D is equal (the reference divides by zero), the allocation is uniform.
    """

    needs_data = True
    linear_inputs = True

    def __init__(self, m: float = 5.0, lam: float = 0.08, per: str = "block"):
        if per not in ("block", "layer") or not m > 0 or not lam >= 0:
            raise ValueError(f"need m > 0, lam >= 0, per in ('block', 'layer'); got {m}, {lam}, {per!r}")
        self.m, self.lam, self.per = m, lam, per

    def outlier_ratio(self, scores: torch.Tensor) -> float:
        """Percentage of scores strictly above m times their mean."""
        return 100.0 * float((scores > self.m * scores.mean()).sum()) / scores.numel()

    def measure(self, dense) -> list[float]:
        """Outlier ratio D of each target (or of its block, pooled) from Wanda scores of the dense model."""
        found = {}
        for _, group, stats in dense.blocks(Needs.INPUT_NORMS, "owl outliers"):
            scores = [t.weight.float().abs() * stats[t].input_sq_norms.sqrt().unsqueeze(0) for t in group]
            if self.per == "layer":
                found.update((t, self.outlier_ratio(s)) for t, s in zip(group, scores))
            else:
                pooled = self.outlier_ratio(torch.cat([s.reshape(-1) for s in scores]))
                found.update((t, pooled) for t in group)
        return [found[t] for t in dense.targets]

    def allocate(self, sizes: Sequence[int], costs: Sequence[float], budget: Budget,
                 measured: Sequence[float]) -> list[float]:
        d = torch.tensor(measured, dtype=torch.float64)
        spread = float(d.max() - d.min())
        r = 2 * self.lam * (d - d.min()) / spread if spread > 0 else torch.zeros_like(d)
        return fit_to_budget((budget.sparsity - r).tolist(), sizes, costs, budget)

    def __repr__(self) -> str:
        return f"OWL(m={self.m:g}, lam={self.lam:g}, per={self.per!r})"
