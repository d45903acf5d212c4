"""The dense model with what every pass over it shares: its targets, the calibration batches, the estimator that will
prune it, where to compute and across which ranks. Estimators and allocators measure on it before anything is
pruned (`blocks`, `stats`, `rows`); prune() then prunes its targets in place, block by block."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..targets import Target, by_block, find_blocks
from .hooks import removing
from .inputs import split_first
from .runner import BlockStep, call_model, evaluating, full_pass, sequential
from .stats import LayerStats, Needs, empty_stats, gathered


@dataclass
class DenseModel:
    """The dense model, its targets, the calibration batches and the local estimator that will prune them."""

    model: nn.Module
    targets: list[Target]
    batches: list[dict]
    estimator: object
    device: object = None
    progress: bool = True
    group: object = None  # prunekit.distributed.Group: statistics are summed over its ranks' shards

    def blocks(self, needs: Needs, desc: str, first_rows: int | None = None
               ) -> Iterator[tuple[BlockStep | None, list[Target], dict[Target, LayerStats]]]:
        """Block by block over the dense model: the step (whose `outputs` already hold the dense block's outputs,
        which feed the next block), the block's targets, and their statistics over every batch. A consumer may
        run the step again with weights changed for the purpose, as long as it restores them; with first_rows,
        the first batch holds only that many samples, for cheap repeated runs (`step.forward(1)`). Layers
        outside the blocks come last, with step None and statistics from a full-model pass."""
        groups, outside = by_block(self.targets)
        _, blocks = find_blocks(self.model)
        batches = self.batches if first_rows is None else split_first(self.batches, first_rows)
        for step in sequential(self.model, blocks, batches, device=self.device, desc=desc,
                               progress=self.progress):
            if step.index in groups:
                group = groups[step.index]
                stats = empty_stats(group, needs, self.device)
                step.run(stats, keep_outputs=True)
                yield step, group, {t: gathered(t, stats, self.group) for t in group}
        if outside:
            stats = empty_stats(outside, needs)
            full_pass(self.model, self.batches, stats)
            yield None, outside, {t: gathered(t, stats, self.group) for t in outside}

    def stats(self, estimator) -> dict:
        """{target module: what `estimator` needs for it}, all measured on the dense model: gathered by the
        estimator itself for whole-model needs, block by block for input statistics, None for weights only."""
        if estimator.needs == Needs.NONE:
            return {t.module: None for t in self.targets}
        if estimator.needs & Needs.WHOLE_MODEL:
            return estimator.gather(self.model, self.targets, self.batches, progress=self.progress)
        found = {}
        for _, _, got in self.blocks(estimator.needs, desc=estimator.name):
            found.update({t.module: st for t, st in got.items()})
        return found

    def rows(self) -> dict[Target, int]:
        """Rows (tokens, positions) each target processes in one forward of the first calibration batch. A layer's
        FLOPs are 2 x rows x weights, so this is its FLOPs per weight, up to a common factor."""
        counts = {t: 0 for t in self.targets}

        def counter(t: Target):
            def hook(module, args):
                counts[t] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

            return hook

        with removing([t.module.register_forward_pre_hook(counter(t)) for t in self.targets]), evaluating(self.model):
            call_model(self.model, self.batches[0])
        return counts
