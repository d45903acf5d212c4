"""Zeroth-order importance: two-point (SPSA/MeZO) estimates of the loss gradient from forward passes only."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.inputs import split_first
from ..calibration.loss import Loss, model_loss
from ..calibration.runner import evaluating, sequential
from ..calibration.stats import Needs
from ..targets import Target, by_block, find_blocks
from .base import ESTIMATORS, Estimator, group_sum

Direction = Callable[[int, int, torch.Tensor], torch.Tensor]  # (probe, target index, dense weight) -> u


@contextlib.contextmanager
def skipping(blocks: list[nn.Module], upto: int, hidden: torch.Tensor):
    """Blocks before `upto` skipped: each returns `hidden`, the dense input of block `upto`, so a forward pays
    only for the blocks from `upto` on (and the embeddings, which are cheap)."""
    for block in blocks[:upto]:
        block.forward = lambda *args, **kwargs: hidden
    try:
        yield
    finally:
        for block in blocks[:upto]:
            del block.forward


def two_point(model: nn.Module, targets: Sequence[Target], batch: dict, probes: int, eps: float,
              direction: Direction, loss: Loss = model_loss, progress: bool = True,
              desc: str = "zeroth-order") -> dict[Target, list[float]]:
    """d_k = (L(W + eps u_k) - L(W - eps u_k)) / (2 eps) ~ u_k . grad L, for probes k = 0..probes-1.

    The targets of one block are perturbed together (each by `direction(k, index, dense weight)`, its index in
    `targets`), the other blocks stay dense, and each perturbed forward starts at that block from its cached
    dense input: 2 * probes partial forwards per block. Layers outside the blocks are perturbed together in full
    forwards. Directions are regenerated, never stored; each block's weights are restored exactly from one copy
    of that block. Returns, per target, the d_k of its block's perturbations.
    """
    _, blocks = find_blocks(model)
    groups, outside = by_block(list(targets))
    inputs = {}
    with evaluating(model):
        for step in sequential(model, blocks, [batch], progress=False):  # dense inputs of every block
            if step.index in groups:
                inputs[step.index] = step.hidden[0]
        units = [(i, groups[i]) for i in sorted(groups)] + ([(None, outside)] if outside else [])
        index = {t: n for n, t in enumerate(targets)}
        result = {}
        for i, group in tqdm(units, desc=desc, disable=not progress, unit="block"):
            dense = [t.module.weight.detach().clone() for t in group]
            values = []
            with skipping(blocks, i, inputs[i]) if i is not None else contextlib.nullcontext():
                for k in range(probes):
                    steps = [(t, w, direction(k, index[t], w).to(w.dtype)) for t, w in zip(group, dense)]
                    for t, w, u in steps:
                        t.module.weight.data.copy_(w + eps * u)
                    plus = float(loss(model, batch))
                    for t, w, u in steps:
                        t.module.weight.data.copy_(w - eps * u)
                    minus = float(loss(model, batch))
                    values.append((plus - minus) / (2 * eps))
            for t, w in zip(group, dense):
                t.module.weight.data.copy_(w)
            for t in group:
                result[t] = values
    return result


def gaussian(seed: int, probe: int, index: int, shape, device, share: tuple[int, int] | None = None) -> torch.Tensor:
    """z ~ N(0, I) of `shape` for (seed, probe, target index), the same on every call. With share=(size, dim) one
    draw per group of `size` consecutive slices along `dim`, shared by the group's weights."""
    generator = torch.Generator(device=device).manual_seed(((seed * 1_000_003) + probe * 10_007 + index) % 2 ** 63)
    if share is None:
        return torch.randn(shape, generator=generator, device=device)
    size, dim = share
    z = torch.randn(shape[dim] // size, generator=generator, device=device).repeat_interleave(size)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return z.view(view).expand(shape)


@dataclass
class Probes:
    """A target's two-point measurements, from which estimates are regenerated on demand."""

    seed: int
    index: int
    derivatives: list[float]  # d_k of the target's block, per probe
    relative: bool
    share: tuple[int, int] | None

    def estimates(self, weight: torch.Tensor):
        """Per probe, d_k z_k: an unbiased estimate of dL/dW (relative=False) or of dL/dW * W (relative=True, the
        first-order Taylor term), per weight, or per group when the perturbation is shared."""
        for k, d in enumerate(self.derivatives):
            yield d * gaussian(self.seed, k, self.index, weight.shape, weight.device, self.share)


def unbiased_square(estimates, reduce: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Unbiased estimate of reduce(c)^2 from independent unbiased estimates e_k of c: the mean over pairs k != l
    of reduce(e_k) reduce(e_l) = ((sum_k r_k)^2 - sum_k r_k^2) / (K (K - 1)). Squaring one mean would add the
    estimates' variance, which dwarfs the signal for all but a few directions."""
    total = squares = None
    count = 0
    for e in estimates:
        r = reduce(e)
        total = r if total is None else total + r
        squares = r.square() if squares is None else squares + r.square()
        count += 1
    return (total.square() - squares) / (count * (count - 1))


@ESTIMATORS.register("zeroth_order")
class ZerothOrder(Estimator):
    """Forward-only gradient scores from two-point perturbations (SPSA, Spall 1992; MeZO, Malladi et al.,
    "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023).

    Each probe draws Gaussian noise z (regenerated from a seed, never stored) and perturbs a block's weights by
    eps * u, u = z * W (relative=True) or u = z (relative=False); the central difference d = (L+ - L-) / (2 eps)
    estimates u . grad L, and d z estimates grad L * W (the first-order Taylor term of removing each weight) or
    grad L itself. With share=(size, dim), one z per group (output channel: (1, 0); head: (head_dim, 0)) is shared
    by all its weights, so d z estimates the group's summed term, with a variance about size times lower than
    summing per-weight estimates.

    Scores are unbiased estimates of the squared terms (see unbiased_square): per weight (g w)^2, per group
    (sum over the group of g w)^2, per layer the sum of per-unit squares (||g W||^2, or ||g||^2 when
    relative=False: the squared gradient norm). Needs probes >= 2; per-weight estimates are noisy in proportion
    to the block's size, so prefer shared groups or many probes.
    """

    needs = Needs.LOSS

    def __init__(self, probes: int = 32, eps: float = 1e-3, samples: int = 8, seed: int = 0, relative: bool = True,
                 share: tuple[int, int] | None = None, loss: Loss | None = None):
        if probes < 2 or not eps > 0 or samples < 1:
            raise ValueError(f"need probes >= 2, eps > 0, samples >= 1; got {probes}, {eps}, {samples}")
        self.probes, self.eps, self.samples, self.seed = probes, eps, samples, seed
        self.relative, self.share = relative, share
        self.loss = loss or model_loss

    def gather(self, model, targets, batches, progress=True) -> dict:
        def direction(k, index, weight):
            z = gaussian(self.seed, k, index, weight.shape, weight.device, self.share)
            return z * weight if self.relative else z

        batch = split_first(batches, self.samples)[0]
        measured = two_point(model, targets, batch, self.probes, self.eps, direction, self.loss, progress,
                             desc=self.name)
        return {t.module: Probes(self.seed, i, measured[t], self.relative, self.share)
                for i, t in enumerate(targets)}

    def scores(self, weight: torch.Tensor, stats: Probes) -> torch.Tensor:
        if stats.share is None:
            return unbiased_square(stats.estimates(weight), lambda e: e)
        size, dim = stats.share  # a group's score spread evenly over its weights
        per_group = self.group_scores(weight, stats, size, dim) / (size * weight.numel() // weight.shape[dim])
        view = [1] * weight.dim()
        view[dim] = weight.shape[dim]
        return per_group.repeat_interleave(size).view(view).expand(weight.shape)

    def group_scores(self, weight, stats: Probes, size=1, dim=0):
        """(sum over the group of the estimated terms)^2, estimated without bias."""
        if stats.share is None:
            return unbiased_square(stats.estimates(weight), lambda e: group_sum(e, size, dim))
        if stats.share != (size, dim):
            raise ValueError(f"the perturbation was shared over groups (size, dim) = {stats.share}; only those can "
                             f"be scored, not ({size}, {dim})")
        per_group = size * weight.numel() // weight.shape[dim]  # a shared draw repeats over its group's weights
        return unbiased_square(stats.estimates(weight), lambda e: group_sum(e, size, dim) / per_group)

    def layer_score(self, weight, stats: Probes) -> float:
        """Sum over the perturbation's units (weights, or shared groups) of their estimated squared terms."""
        return float(self.scores(weight, stats).sum())

    def __repr__(self) -> str:
        return (f"ZerothOrder(probes={self.probes}, eps={self.eps:g}, samples={self.samples}, "
                f"relative={self.relative}, share={self.share})")
