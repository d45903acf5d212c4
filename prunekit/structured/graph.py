"""Finding a model's structures: attention heads from the attention layouts, coupled channels from Torch-Pruning's
dependency graph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023).

A channel group is prunable when it lies inside one block (an MLP's hidden channels, the inner filters of a
residual block), every Linear or Conv it touches is targeted, and something reads it: channels on the residual
stream couple every block and the embeddings (they are the model's width), and a layer nobody reads is an output;
both stay whole.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch_pruning as tp
from torch import nn

from ..calibration.runner import call_model
from ..errors import BudgetError, TargetError
from ..targets import Conv1D, Target
from .attention import Heads, find_attention
from .units import Channels, Structure, head_structure, per_channel

# Layers that can be targets of structured pruning (HF's Conv1D too, only to be refused with the hook to register).
KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + ((Conv1D,) if Conv1D else ())
_NATIVE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # what Torch-Pruning prunes without help
PRUNERS: dict[type, tp.pruner.BasePruningFunc] = {}
HOOK = "prunekit.structured.register_pruner"


def register_pruner(cls: type, pruner: tp.pruner.BasePruningFunc) -> None:
    """Teaches the dependency graph a layer class of your own: `pruner` is a Torch-Pruning BasePruningFunc
    (prune_out_channels, prune_in_channels, get_out_channels, get_in_channels), handed to Torch-Pruning as a
    customized pruner, so that instances of `cls` become leaves of the graph, cut by `pruner`."""
    if not isinstance(pruner, tp.pruner.BasePruningFunc):
        raise TypeError(f"the pruner must be a torch_pruning.pruner.BasePruningFunc instance, got {type(pruner)}")
    PRUNERS[cls] = pruner


def structure_blocks(model: nn.Module) -> list[nn.Module]:
    """Every element of every ModuleList/Sequential of >= 2 same-class blocks holding a prunable layer (decoder
    layers, ViT blocks, each residual stage's blocks), outermost lists only; the whole model when there is none."""
    blocks, inside = [], set()
    for module in model.modules():
        if module in inside or not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        if len({type(child) for child in module}) == 1 and any(isinstance(m, KINDS) for m in module[0].modules()):
            blocks.extend(module)
            inside.update(m for child in module for m in child.modules())
    return blocks or [model]


def _tensors(out) -> list[torch.Tensor]:
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()]


@contextlib.contextmanager
def _traceable(model: nn.Module):
    """Gradients on for every parameter while the graph is traced from autograd's, as they were afterwards."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def build_graph(model: nn.Module, batch: dict) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph, traced on the first sample of a calibration batch."""
    example = {k: v[:1] for k, v in batch.items() if k != "labels"}
    with _traceable(model):
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example, forward_fn=lambda m, b: _tensors(call_model(m, b)),
            customized_pruners=dict(PRUNERS) or None, verbose=False)


def head_mode(requested: str, attention: Heads, name: str) -> str:
    """"kv" or "query" for one attention module; refuses a request its grouping cannot honour."""
    group = attention.group
    if requested == "auto":
        return "kv" if group == 1 else "query"
    if requested == "query" and group == 1:
        raise BudgetError(f"heads='query' removes query heads within KV groups, but {name} has one query head per KV "
                          f"head (multi-head attention): removing one empties its group; use heads='auto' or 'kv'")
    if requested == "kv" and attention.kv_heads == 1 and group > 1:
        raise BudgetError(f"heads='kv' removes whole KV groups, but {name} has a single KV group (multi-query "
                          f"attention): removing it removes the attention; use heads='query' or 'auto'")
    return requested


def find_structures(model: nn.Module, targets: list[Target], heads: str, round_to: int | None,
                    batch: dict) -> list[Structure]:
    """The model's prunable structures over the targeted layers: one per attention module (when all its projections
    are targeted) and one per prunable channel group, in model order."""
    names = {m: n for n, m in model.named_modules()}
    blocks = structure_blocks(model)
    block_of = {m: i for i, b in enumerate(blocks) for m in b.modules()}
    targeted = {t.module for t in targets}
    attention = find_attention(model)
    projections = {m for a in attention for m in a.projections()}
    for t in targets:
        if t.module not in projections and not isinstance(t.module, _NATIVE) and type(t.module) not in PRUNERS:
            raise TargetError(f"{t.name} is a {_qualname(t.module)}, which Torch-Pruning's dependency graph cannot "
                              f"cut; register a pruner for it with {HOOK}({type(t.module).__name__}, pruner), or "
                              f"exclude it (Budget(exclude=...))")
    _check_known(blocks, names, projections)
    found: list[Structure] = []
    if heads != "none":
        for a in attention:
            if all(m in targeted for m in a.projections() if isinstance(m, KINDS)):
                name = names[a.module]
                found.append(head_structure(name, block_of.get(a.module), a, head_mode(heads, a, name)))
    graph = build_graph(model, batch)
    owners = {id(p): (f"{names[m]}.{pname}".lstrip("."), m) for m in model.modules()
              for pname, p in m._parameters.items() if p is not None}
    covered: set = set()
    for t in targets:
        if t.module in projections or t.module in covered:
            continue
        pruner = graph.get_pruner_of_module(t.module)
        group = graph.get_pruning_group(t.module, pruner.prune_out_channels,
                                        list(range(pruner.get_out_channels(t.module))))
        members = [(item.dep.target.module, graph.is_out_channel_pruning_fn(item.dep.handler)) for item in group]
        covered.update(m for m, out in members if out and isinstance(m, nn.Module))
        structure = _channel_structure(group, members, graph, t, names, block_of, targeted, owners, round_to)
        if structure is not None:
            found.append(structure)
    order = {m: i for i, m in enumerate(model.modules())}
    return sorted(found, key=lambda s: order[s.root if isinstance(s, Channels) else s.attention.module])


def _channel_structure(group, members, graph, root: Target, names, block_of, targeted, owners,
                       round_to) -> Channels | None:
    layers = [(m, out) for m, out in members if isinstance(m, nn.Module) and m in names]
    unknown = [owners[id(m)] for m, _ in members if isinstance(m, nn.Parameter)]
    where = {block_of.get(m) for m, _ in layers} | {block_of.get(owner) for _, owner in unknown}
    if len(where) != 1 or None in where:
        return None  # the residual stream (or channels leaving the blocks): the model's width
    cut = [m for m, _ in layers if isinstance(m, KINDS + tuple(PRUNERS))]
    if not all(m in targeted for m in cut):
        return None  # a coupled layer is excluded: the whole group stays
    if not any(not out and isinstance(m, KINDS + tuple(PRUNERS)) for m, out in layers):
        return None  # nothing reads these channels: an output
    # weights one unit takes from each layer: a channel may be several of a reader's columns (a convolution's
    # channel flattened into a Linear's inputs is height x width of them), as the group's indices say
    spread = {item.dep.target.module: len(item.idxs) // len(group[0].idxs) for item in group}
    sides = {m: out for m, out in layers if m in targeted}  # True: loses output rows; False: input columns
    cuts = {m: per_channel(m, 0 if out else 1) * max(1, spread.get(m, 1)) for m, out in sides.items()}
    step = round_to or 1
    units = len(group[0].idxs)
    prefix = os.path.commonprefix([names[m].split(".") for m in cuts])
    return Channels(name=".".join(prefix) or names[root.module], kind="channels",
                    unit="filter" if isinstance(root.module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else "channel",
                    block=block_of[root.module], units=units, cuts=cuts, step=step, keep=step,
                    inputs=frozenset(m for m, out in sides.items() if not out),
                    graph=graph, root=root.module, group=group)


def _check_known(blocks: list[nn.Module], names: dict, handled: set) -> None:
    """Refuses a block holding a weight matrix in a module the graph cannot cut (it would trace the module's ops and
    guess, usually wrong): norms' scale vectors are fine, a custom layer's matrix is not."""
    known = _NATIVE + (nn.Embedding, nn.MultiheadAttention, nn.LSTM) + tuple(PRUNERS)
    for block in blocks:
        for module in block.modules():
            if module in handled or isinstance(module, known):
                continue
            matrix = next((k for k, p in module._parameters.items() if p is not None and p.dim() >= 2), None)
            if matrix is not None:
                raise TargetError(f"{names[module]}.{matrix} is a weight of {_qualname(module)}, a layer "
                                  f"Torch-Pruning's dependency graph does not know how to cut; register a pruner for "
                                  f"that class with {HOOK}({type(module).__name__}, pruner) (a torch_pruning "
                                  f"BasePruningFunc)")


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"
