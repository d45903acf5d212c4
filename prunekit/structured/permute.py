"""N:M channel permutation of a whole model: each permutable channel group (an MLP's hidden channels: rows of gate
and up, columns of down) is reordered so that the N:M mask of the layers reading it keeps more importance, and
every layer that produces or reads those channels is reordered alike, so the model computes the same function and
keeps its architecture (it saves and reloads as before, with plain `from_pretrained` too).

The groups are Torch-Pruning's (graph.py), taken where a reorder is exact: every member a Linear, indexed channel
for channel, and a random reorder leaving the model's output unchanged on a calibration sample (which rules out
attention the layouts do not know, whose channels are grouped in heads). Channels on the residual stream (what q,
k, v and an MLP's first layers read) couple the whole model and stay in order. The importance is Wanda's,
|W| times the input's norm, measured on the dense model; the order comes from masking/permutation.py (RIA's channel
allocation and balanced reassignment).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.runner import call_model
from ..masking.permutation import kept, nm_permutation
from ..targets import Target
from .graph import _tensors, find_structures
from .units import Channels


@dataclass
class Permutable:
    """One channel group: the layers producing it (their rows) and reading it (their columns)."""

    name: str
    producers: list[nn.Linear]
    readers: list[nn.Linear]


def permutable_groups(model: nn.Module, targets: list[Target], batch: dict) -> list[Permutable]:
    """The model's channel groups a reorder leaves exact (see the module's docstring), in model order."""
    found = []
    for s in find_structures(model, targets, heads="none", round_to=None, batch=batch):
        if not isinstance(s, Channels):
            continue
        producers, readers, exact = [], [], True
        for item in s.group:
            module, out = item.dep.target.module, s.graph.is_out_channel_pruning_fn(item.dep.handler)
            if isinstance(module, nn.Linear):
                exact &= list(item.idxs) == list(range(s.units))
                if module not in producers + readers:
                    (producers if out else readers).append(module)
            elif isinstance(module, nn.Parameter) or any(True for _ in module.parameters(recurse=False)):
                exact = False  # a norm's scale, a conv: reordering those is not done here
        if exact and producers and readers and _unchanged_by_a_reorder(model, Permutable(s.name, producers, readers),
                                                                        batch):
            found.append(Permutable(s.name, producers, readers))
    return found


def _unchanged_by_a_reorder(model: nn.Module, group: "Permutable", batch: dict) -> bool:
    """Whether a random reorder of the group leaves the model's outputs on one sample as they were (it is undone)."""
    sample = {k: v[:1] for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = _tensors(call_model(model, sample))
        order = torch.randperm(group.readers[0].weight.shape[1], generator=torch.Generator().manual_seed(0))
        apply(group, order)
        try:
            after = _tensors(call_model(model, sample))
        finally:
            apply(group, torch.argsort(order))
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()) + 1e-6) for a, b in zip(after, before))


def apply(group: Permutable, order: torch.Tensor) -> None:
    """Reorders the group's channels: rows (and bias) of each producer, columns of each reader."""
    for module in group.producers:
        index = order.to(module.weight.device)
        module.weight.data = module.weight.data.index_select(0, index)
        if module.bias is not None:
            module.bias.data = module.bias.data.index_select(0, index)
    for module in group.readers:
        module.weight.data = module.weight.data.index_select(1, order.to(module.weight.device))


def permute(groups: list[Permutable], scores: dict[nn.Module, torch.Tensor], n: int, m: int,
            progress: bool = False) -> dict[str, float]:
    """Reorders every group for an N:M mask on its readers' `scores` ([out, in] each, as the weight); returns, per
    group, the importance its readers' N:M masks keep after over before."""
    gained = {}
    for g in tqdm(groups, desc=f"{n}:{m} permutation", unit="group", disable=not progress):
        joint = torch.cat([scores[r].float().cpu() for r in g.readers])
        order = nm_permutation(joint, n, m)
        before = kept(joint, n, m)
        gained[g.name] = kept(joint[:, order], n, m) / before if before > 0 else 1.0
        apply(g, order)
    return gained
