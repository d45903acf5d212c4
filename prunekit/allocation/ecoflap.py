"""ECoFLaP: layer sparsities from (zeroth-order) gradient scores of the model's loss."""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from ..budget import Budget
from ..calibration.inputs import split_first
from ..calibration.loss import Loss, grads_for, model_loss
from ..errors import BudgetError, CalibrationError
from ..importance import ESTIMATORS
from ..importance.zeroth_order import gaussian, two_point
from ..targets import Target, by_block
from .base import ALLOCATORS, Allocator, fit_to_budget


def zeroth_order_scores(dense, samples: int, noises: int, eps: float, seed: int, loss: Loss) -> dict[int, float]:
    """Per block, sum over `noises` Gaussian perturbations z of |L(W + eps z) - L(W - eps z)| / (2 eps), the
    two-point (SPSA/MeZO) estimate of |z . grad|, whose mean is sqrt(2/pi) times the norm of the loss gradient
    with respect to the block's targets. Forward passes only; perturbations are regenerated from seeds."""
    def direction(k, index, weight):
        return gaussian(seed, k, index, weight.shape, weight.device)

    batch = split_first(dense.batches, samples)[0]
    measured = two_point(dense.model, dense.targets, batch, noises, eps, direction, loss, dense.progress,
                         desc="ecoflap zeroth-order")
    return {t.block: sum(abs(d) for d in measured[t]) for t in dense.targets}


def first_order_scores(dense, samples: int, loss: Loss) -> dict[Target, float]:
    """Per target, sum over its weights of (dL/dw * w)^2, on the first `samples` calibration samples."""
    model = dense.model
    weights = [t.module.weight for t in dense.targets]
    scores = {t: 0.0 for t in dense.targets}
    with grads_for(model, weights):
        for batch in split_first(dense.batches, samples)[:1]:
            grads = torch.autograd.grad(loss(model, batch), weights)
            for t, w, g in zip(dense.targets, weights, grads):
                scores[t] += float((g * w.detach()).square().sum())
    return scores


@ALLOCATORS.register("ecoflap")
class ECoFLaP(Allocator):
    """Sung, Yoon, Bansal, "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for Vision-Language Models"
    (ICLR 2024). Coarse stage here, fine stage by the local estimator.

    Scores. method="zeroth" (default): per block, the two-point zeroth-order estimate of the loss gradient's norm
    (see zeroth_order_scores), from forward passes only, so memory stays at inference level. Unlike the reference
    code, which perturbs one weight matrix at a time over the whole model, all targets of a block are perturbed
    together and each perturbed forward starts at that block from its cached dense input: 2 * noises partial
    forwards per block. method="first": per target, sum of (gradient * weight)^2 from one backward pass on the
    same samples, summed per block when per="block". Any other importance estimator (a name such as "hutchinson"
    or "fisher", or an instance) gives its layer scores (Estimator.layer_score), summed per block when per="block".

    Allocation (water-filling, as the reference): every group keeps at least 1 - max_sparsity of its weights
    (default max_sparsity: the budget's sparsity + 0.1, the rule of every released script, capped by the budget's
    max_layer_sparsity); the rest of the keep budget goes to the groups in proportion to their scores (not to
    score times size), each capped at the whole group, the overflow poured into the others. Every layer of a group
    gets the group's sparsity; the result meets the budget exactly (the reference rounds with ceil and can miss).
    """

    needs_data = True
    offloadable = False  # perturbs (or differentiates) weights inside whole-model passes

    def __init__(self, method: str = "zeroth", per: str = "block", max_sparsity: float | None = None,
                 samples: int = 4, noises: int = 2, eps: float = 1e-3, seed: int = 0, loss: Loss | None = None):
        if per not in ("block", "layer"):
            raise ValueError(f"per must be 'block' or 'layer', got {per!r}")
        # an estimator's layer scores, or None for the two built-in gradient scores
        self.estimator = None if method in ("zeroth", "first") else ESTIMATORS.create(method)
        if method == "zeroth" and per == "layer":
            raise ValueError("zeroth-order scores are per block (one perturbed pass per block); use per='block'")
        if samples < 1 or noises < 1 or not eps > 0:
            raise ValueError(f"need samples >= 1, noises >= 1, eps > 0; got {samples}, {noises}, {eps}")
        self.method, self.per, self.max_sparsity = method, per, max_sparsity
        self.samples, self.noises, self.eps, self.seed = samples, noises, eps, seed
        self.loss = loss or model_loss

    def measure(self, dense) -> list[tuple[object, float]]:
        """(group, score) per target; the group is the target's block, or the target itself when per="layer"."""
        _, outside = by_block(dense.targets)
        if outside:
            raise CalibrationError(f"ecoflap scores blocks, and {', '.join(t.name for t in outside)} lie outside the "
                                   f"model's blocks; exclude them or use another allocator")
        if self.method == "zeroth":
            per_block = zeroth_order_scores(dense, self.samples, self.noises, self.eps, self.seed, self.loss)
            return [(t.block, per_block[t.block]) for t in dense.targets]
        if self.estimator is None:
            per_target = first_order_scores(dense, self.samples, self.loss)
        else:
            stats = dense.stats(self.estimator)
            per_target = {t: self.estimator.layer_score(t.weight.float(), stats[t.module]) for t in dense.targets}
        if self.per == "layer":
            return [(t.name, per_target[t]) for t in dense.targets]
        per_block = defaultdict(float)
        for t, value in per_target.items():
            per_block[t.block] += value
        return [(t.block, per_block[t.block]) for t in dense.targets]

    def allocate(self, sizes: Sequence[int], costs: Sequence[float], budget: Budget, measured) -> list[float]:
        cap = min(budget.sparsity + 0.1 if self.max_sparsity is None else self.max_sparsity,
                  budget.max_layer_sparsity)
        if cap < budget.sparsity:
            raise BudgetError(f"ECoFLaP(max_sparsity={cap:g}) is below the budget's sparsity {budget.sparsity:g}: "
                              f"no group may lose that much, so the budget cannot be met")
        names = list(dict.fromkeys(group for group, _ in measured))
        size = defaultdict(float)
        for (group, _), n, f in zip(measured, sizes, costs):
            size[group] += n * f
        w = torch.tensor([size[g] for g in names], dtype=torch.float64)
        score = torch.tensor([dict(measured)[g] for g in names], dtype=torch.float64)
        floor = w * (1 - cap)
        ceiling = w * (1 - budget.min_layer_sparsity)
        goal = float(w.sum()) * (1 - budget.sparsity)
        if float(score.sum()) <= 0:
            keep = w * (1 - budget.sparsity)
        else:
            def kept(lam: float) -> torch.Tensor:
                return torch.minimum(floor + lam * score / score.sum(), ceiling)

            lo, hi = 0.0, goal + float(w.sum())
            for _ in range(200):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if float(kept(mid).sum()) < goal else (lo, mid)
            keep = kept(hi)
        sparsity = dict(zip(names, (1 - keep / w).tolist()))
        return fit_to_budget([sparsity[group] for group, _ in measured], sizes, costs, budget)

    def layer_score(self, measured, sparsity: float) -> float:
        return measured[1]

    def __repr__(self) -> str:
        if self.estimator is not None:
            return f"ECoFLaP(method={self.estimator!r}, per={self.per!r})"
        options = f"samples={self.samples}, noises={self.noises}, eps={self.eps:g}" if self.method == "zeroth" \
            else f"samples={self.samples}, per={self.per!r}"
        return f"ECoFLaP(method={self.method!r}, {options})"
