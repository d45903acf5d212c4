"""The estimator protocol: scores per weight, per group (channel, head, filter) and per layer (higher = more
important)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import masking
from ..calibration.stats import LayerStats, Needs
from ..registry import Registry


class Estimator:
    """Subclass, set `needs` and `group`, implement `scores`; register with `@ESTIMATORS.register("name")`.

    needs: what must be gathered for each layer. Needs.NONE: weights only, no calibration data. INPUT_NORMS and
        HESSIAN: input statistics the block-by-block runner gathers (each layer sees the inputs it gets with
        the layers before it already pruned). Anything in Needs.WHOLE_MODEL (gradients, loss, relevance,
        activations, training): the estimator gathers it itself in `gather`, on the dense model, before
        anything is pruned.
    group: where unstructured scores compete, "layer" or "row" (each output row keeps the same share).

    Weights are seen with output channels first: [out, in] for a Linear, [out, in, kh, kw] for a Conv2d.
    """

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs.NONE
    group: ClassVar[str] = "layer"

    def gather(self, model: nn.Module, targets: Sequence, batches: list[dict], progress: bool = True) -> dict:
        """For WHOLE_MODEL needs: {target module: what `scores` gets as `stats` for that layer}. The model must be
        as it was on return (an estimator that trains, Needs.TRAINING, leaves only the changes it documents)."""
        raise NotImplementedError(f"{type(self).__name__} declares {self.needs} but has no gather()")

    def scores(self, weight: torch.Tensor, stats) -> torch.Tensor:
        """Importance of each entry of the (float32) weight."""
        raise NotImplementedError

    def group_scores(self, weight: torch.Tensor, stats, size: int = 1, dim: int = 0) -> torch.Tensor:
        """Importance of each group of `size` consecutive slices along `dim`: dim=0 with size=1 gives output
        channels (conv filters), dim=0 with size=head_dim the heads of a q/k/v projection, dim=1 with
        size=head_dim the heads feeding an output projection. By default the sum of the group's weight scores
        (estimators with a group-level definition override this)."""
        return group_sum(self.scores(weight, stats), size, dim)

    def structure_scores(self, parts: Sequence["StructurePart"], count: int) -> torch.Tensor:
        """Importance of each of `count` structures that cut several layers at once (a head: rows of q, k, v and
        columns of o; an MLP channel: rows of up and gate, a column of down). By default each part's group scores
        summed into the structures they belong to; estimators whose structure score is not a sum over layers
        (NViT's saliency squares a per-sample sum) override this."""
        total = torch.zeros(count, dtype=torch.float64)
        for part in parts:
            scored = self.group_scores(part.weight, part.stats, part.size, part.dim)
            total.index_add_(0, part.items.to(scored.device), part.pick(scored).double().cpu())
        return total

    def refit_columns(self, weight: torch.Tensor, stats, keep: torch.Tensor) -> torch.Tensor | None:
        """For structured pruning: the [out, kept] weights that replace weight[:, keep] once the other input
        channels are removed, or None to keep them as they are (the default). Reconstructing estimators refit them
        to the layer's calibration inputs."""
        return None

    def layer_score(self, weight: torch.Tensor, stats) -> float:
        """One number per layer for an allocator; by default the mean weight score."""
        return float(self.scores(weight, stats).mean())

    def prune(self, weight: torch.Tensor, stats: LayerStats | None, count: int, nm: tuple[int, int] | None,
              block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight, keep-mask) pruning `count` weights (or N:M, or `count` weights in whole (R, C) tiles of
        `block`, ranked by summed scores). Reconstructing estimators override this."""
        keep = masking.select(self.scores(weight, stats), count, nm, self.group, block)
        return weight * keep, keep

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


ESTIMATORS: Registry[Estimator] = Registry("importance", Estimator)  # each estimator's file registers it


def group_sum(values: torch.Tensor, size: int = 1, dim: int = 0) -> torch.Tensor:
    """values summed over each group of `size` consecutive slices along `dim` (and over every other dim)."""
    n = values.shape[dim]
    if size < 1 or n % size:
        raise ValueError(f"groups of {size} do not tile dimension {dim} of length {n}")
    per_slice = values.transpose(0, dim).reshape(n, -1).sum(1)
    return per_slice.view(n // size, size).sum(1)


@dataclass
class StructurePart:
    """One layer's share of a set of structures: its weight (output channels first) cut along `dim` into slices of
    `size`; slice `slices[i]` belongs to structure `items[i]` (slices None: slice i to items[i], all of them)."""

    weight: torch.Tensor
    stats: object
    size: int
    dim: int
    items: torch.Tensor
    slices: torch.Tensor | None = None
    module: object = None  # the layer the weight belongs to, where the caller has one

    def pick(self, per_slice: torch.Tensor) -> torch.Tensor:
        return per_slice if self.slices is None else per_slice[self.slices.to(per_slice.device)]


@dataclass
class Scores:
    """An estimator's measurements of a model's targets (see prunekit.score), read by target name."""

    estimator: Estimator
    targets: list
    stats: dict  # target module -> what the estimator gathered for it

    def _find(self, name: str):
        for t in self.targets:
            if t.name == name:
                return t, self.stats[t.module]
        raise KeyError(f"{name!r} is not a scored layer; scored: {', '.join(t.name for t in self.targets[:5])}...")

    def weights(self, name: str) -> torch.Tensor:
        """Per weight, [out, in]."""
        t, st = self._find(name)
        return self.estimator.scores(t.weight.float(), st)

    def groups(self, name: str, size: int = 1, dim: int = 0) -> torch.Tensor:
        """Per group of `size` output (dim=0) or input (dim=1) channels; see Estimator.group_scores."""
        t, st = self._find(name)
        return self.estimator.group_scores(t.weight.float(), st, size, dim)

    def layers(self) -> dict[str, float]:
        """{layer name: layer score}."""
        return {t.name: self.estimator.layer_score(t.weight.float(), self.stats[t.module]) for t in self.targets}
