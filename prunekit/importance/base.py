"""The estimator protocol: per-weight scores (higher = more important) from a weight and its layer statistics."""
from __future__ import annotations

from typing import ClassVar

import torch

from .. import masking
from ..calibration.stats import LayerStats, Needs


class Estimator:
    """Subclass, set `needs` and `group`, implement `scores`; register with `@ESTIMATORS.register("name")`.

    needs: statistics the runner must gather for each layer (Needs.NONE: no calibration data at all).
    group: where unstructured scores compete, "layer" or "row" (each output row keeps the same share).
    """

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs.NONE
    group: ClassVar[str] = "layer"

    def scores(self, weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
        """Importance of each entry of a [out, in] float32 weight."""
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, stats: LayerStats | None, count: int,
              nm: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight, keep-mask) pruning `count` weights (or N:M). Reconstructing estimators override this."""
        keep = masking.select(self.scores(weight, stats), count, nm, self.group)
        return weight * keep, keep

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
