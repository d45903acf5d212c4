"""prunekit's estimators as Torch-Pruning importances, for Torch-Pruning's own pruners as much as for prunekit's."""
from __future__ import annotations

import torch
import torch_pruning as tp

from ..importance.base import Estimator, StructurePart


class EstimatorImportance(tp.importance.Importance):
    """Torch-Pruning's Importance protocol: __call__(group) -> one score per channel of the group's root. Each
    coupled layer the estimator measured contributes its group scores (rows for the layers whose outputs are cut,
    columns for those whose inputs are), combined by the estimator's structure_scores (a sum by default); layers
    without measurements (batch norms, activations) add nothing.

    stats: {module: what the estimator gathered for it} (prunekit.score(...).stats, or DenseModel.stats).

        imp = EstimatorImportance(estimator, prunekit.score(model, estimator, batches).stats)
        pruner = torch_pruning.pruner.BasePruner(model, example, importance=imp, pruning_ratio=0.3)
    """

    def __init__(self, estimator: Estimator, stats: dict):
        self.estimator, self.stats = estimator, stats

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor:
        return self.estimator.structure_scores(group_parts(group, self.stats), len(group[0].idxs)).float()


def group_parts(group, stats: dict) -> list[StructurePart]:
    """The measured layers of a Torch-Pruning group as structure parts: channel idxs[i] of each layer (a row when
    the group cuts its outputs, a column when it cuts its inputs) belongs to the root's channel root_idxs[i]."""
    parts = []
    for item in group:
        module, handler = item.dep.target.module, item.dep.handler
        if module not in stats:
            continue  # batch norms, activations, layers nobody measured
        out = handler == getattr(getattr(handler, "__self__", None), "prune_out_channels", None)
        parts.append(StructurePart(module.weight.detach().float(), stats[module], 1, 0 if out else 1,
                                   torch.as_tensor(list(item.root_idxs), dtype=torch.long),
                                   torch.as_tensor(list(item.idxs), dtype=torch.long), module))
    return parts
