"""Structures: sets of interchangeable units (heads, KV groups, channels, filters) that are removed whole.

Each structure knows which targeted weights a unit takes with it (for the budget), how its layers' weights split
into units (for scoring, as prunekit.importance.StructurePart), which units to remove given their scores, and how
to remove them. It never decides how many: that is the allocator's and the planner's business.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..importance.base import StructurePart
from .attention import Heads


def channels_of(module: nn.Module, dim: int) -> int:
    return module.weight.shape[dim]


def per_channel(module: nn.Module, dim: int) -> int:
    """Weights one output (dim 0) or input (dim 1) channel of the layer holds."""
    return module.weight.numel() // module.weight.shape[dim]


@dataclass(eq=False)
class Structure:
    name: str
    kind: str  # "heads" or "channels": structures of one kind share a width in a config
    unit: str  # what one unit is, for the report
    block: int | None
    units: int  # units it has now
    cuts: dict  # targeted module -> weights one unit removes from it
    step: int = 1  # units are removed so that a multiple of `step` stays (round_to), or none at all
    keep: int = 1  # units that must stay
    inputs: frozenset = frozenset()  # the modules of `cuts` that lose input columns (the others lose output rows)

    @property
    def unit_weights(self) -> int:
        return sum(self.cuts.values())

    def allowed(self, removed: int) -> bool:
        kept = self.units - removed
        return removed == 0 or (kept >= self.keep and kept % self.step == 0)

    def parts(self, stats: dict) -> list[StructurePart]:
        raise NotImplementedError

    @property
    def items(self) -> int:
        """Scored items (channels, heads); a unit may be one item per KV group."""
        return self.units

    def choose(self, scores: torch.Tensor, removed: int):
        raise NotImplementedError

    def remove(self, chosen) -> None:
        raise NotImplementedError

    def removed_items(self, chosen) -> set[int]:
        """The scored items (see `items`) that `chosen` removes."""
        return set(chosen)

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """What removing the 1st, 2nd, ... unit costs in importance, as `choose` would pick them (ascending)."""
        return torch.sort(scores.double(), stable=True).values

    def describe(self, chosen) -> str:
        return f"{len(chosen)} {self.unit}s"


def weights_removed(structures: list[Structure], removed: list[int], sizes: dict[nn.Module, int]
                    ) -> dict[nn.Module, float]:
    """Weights each cut module (of `sizes` weights before pruning) loses when every structure removes its count of
    units. A layer can lose output rows to one structure and input columns to another (a plain CNN's convolution:
    its filters, and the filters of the one before); the weights at the crossings are counted once:
    rows + columns - rows x columns / size."""
    rows: dict[nn.Module, float] = {}
    columns: dict[nn.Module, float] = {}
    for s, r in zip(structures, removed):
        for m, per_unit in s.cuts.items():
            side = columns if m in s.inputs else rows
            side[m] = side.get(m, 0.0) + r * per_unit
    return {m: rows.get(m, 0.0) + columns.get(m, 0.0) - rows.get(m, 0.0) * columns.get(m, 0.0) / sizes[m]
            for m in rows.keys() | columns.keys()}


@dataclass(eq=False)
class Channels(Structure):
    """Channels coupled by Torch-Pruning's dependency graph: an MLP's hidden channels (rows of up and gate, columns
    of down), a convolution's filters with the batch norm after it and the next layer's inputs."""

    graph: object = None
    root: nn.Module = None
    group: object = None  # the Torch-Pruning group of every channel, as planned on the dense model

    def parts(self, stats: dict) -> list[StructurePart]:
        from .importance import group_parts

        return group_parts(self.group, stats)

    def choose(self, scores: torch.Tensor, removed: int) -> list[int]:
        return sorted(torch.argsort(scores, stable=True)[:removed].tolist())

    def remove(self, chosen: list[int]) -> None:
        fn = self.group[0].dep.handler
        self.graph.get_pruning_group(self.root, fn, chosen).prune()
        self.units -= len(chosen)


@dataclass(eq=False)
class AttentionHeads(Structure):
    """Heads of one attention module. mode "kv": a unit is a KV group, its K/V head with every query head reading it
    (under multi-head attention, one head). mode "query": a unit is one query head from every KV group, so every
    group keeps the same number and the grouped attention stays valid; the KV heads stay."""

    attention: Heads = None
    mode: str = "kv"

    @property
    def items(self) -> int:
        return self.attention.heads if self.mode == "query" else self.attention.kv_heads

    def _item_of_query(self) -> torch.Tensor:
        h = torch.arange(self.attention.heads)
        return h if self.mode == "query" else h // self.attention.group

    def parts(self, stats: dict) -> list[StructurePart]:
        a, found = self.attention, []
        queries, d = self._item_of_query(), a.head_dim
        for layer, offset in a.query_rows():
            if layer in stats:
                found.append(StructurePart(layer.weight.detach().float(), stats[layer], d, 0, queries,
                                           torch.arange(a.heads) + offset // d, layer))
        if self.mode == "kv":
            for layer, offset in a.kv_rows():
                if layer in stats:
                    found.append(StructurePart(layer.weight.detach().float(), stats[layer], d, 0,
                                               torch.arange(a.kv_heads), torch.arange(a.kv_heads) + offset // d,
                                               layer))
        if a.o in stats:
            found.append(StructurePart(a.o.weight.detach().float(), stats[a.o], d, 1, queries, module=a.o))
        return found

    def choose(self, scores: torch.Tensor, removed: int) -> tuple[list[int], list[int]]:
        """(query heads, KV heads) to remove."""
        a = self.attention
        if self.mode == "kv":
            groups = sorted(torch.argsort(scores, stable=True)[:removed].tolist())
            return [g * a.group + i for g in groups for i in range(a.group)], groups
        queries = []
        for g in range(a.kv_heads):  # the lowest-scoring query heads of every group
            own = scores[g * a.group:(g + 1) * a.group]
            queries += [g * a.group + i for i in torch.argsort(own, stable=True)[:removed].tolist()]
        return sorted(queries), []

    def unit_scores(self, scores: torch.Tensor) -> torch.Tensor:
        if self.mode == "kv":
            return torch.sort(scores.double(), stable=True).values
        # a unit takes the next-lowest query head of every group
        return torch.sort(scores.double().view(self.attention.kv_heads, self.attention.group), 1).values.sum(0)

    def removed_items(self, chosen: tuple[list[int], list[int]]) -> set[int]:
        queries, groups = chosen
        return set(queries if self.mode == "query" else groups)

    def remove(self, chosen: tuple[list[int], list[int]]) -> None:
        self.attention.remove(*chosen)
        self.units = self.attention.group if self.mode == "query" else self.attention.kv_heads

    def describe(self, chosen) -> str:
        queries, groups = chosen
        return f"{len(queries)} heads" + (f" ({len(groups)} KV groups)" if groups and self.attention.group > 1 else "")


def head_structure(name: str, block: int | None, attention: Heads, mode: str) -> AttentionHeads:
    """The structure of an attention module's heads; mode "kv" or "query" (see AttentionHeads)."""
    a = attention
    width_in = a.o.out_features  # the model width every projection reads or writes
    d = a.head_dim
    if mode == "kv":
        cuts = {layer: a.group * d * width_in for layer, _ in a.query_rows()}
        for layer, _ in a.kv_rows():
            cuts[layer] = cuts.get(layer, 0) + d * width_in
        units, unit = a.kv_heads, ("KV group" if a.group > 1 else "head")
    else:
        cuts = {layer: a.kv_heads * d * width_in for layer, _ in a.query_rows()}
        units, unit = a.group, "query head per KV group"
    cuts[a.o] = (a.group if mode == "kv" else a.kv_heads) * d * width_in
    return AttentionHeads(name=name, kind="heads", unit=unit, block=block, units=units, cuts=cuts,
                          inputs=frozenset([a.o]), attention=attention, mode=mode)
