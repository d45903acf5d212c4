"""Structured pruning: targets -> structures (dependency graph, attention layouts) -> dense measurements ->
allocation in whole units -> choice by importance -> removal -> config update -> report.

Everything up to the choice runs on the dense model and can refuse; only then do weights change, inside a
transaction that restores every touched module (and the config) if anything fails.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch
from torch import nn

from ..allocation import Allocator
from ..budget import Budget
from ..calibration.dense import DenseModel
from ..calibration.hooks import removing
from ..calibration.inputs import as_batches
from ..calibration.inputs import summary as calibration_summary
from ..calibration.runner import call_model, evaluating, full_pass, sequential
from ..calibration.stats import Needs, empty_stats
from ..errors import BudgetError, CalibrationError, PrunekitError, TargetError
from ..importance import Estimator
from ..report import LayerRow, PruneReport, StructureRow
from ..targets import Target, find_blocks, find_targets
from . import graph, plan
from .attention import find_attention
from .batchnorm import recalibrate
from .graph import KINDS, find_structures, structure_blocks
from .units import AttentionHeads, Channels, Structure, weights_removed

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def structured_targets(model: nn.Module, budget: Budget) -> list[Target]:
    """Linear and Conv layers: those inside the model's repeated blocks (every one when it has none), or as
    include / exclude say."""
    inside = {m for block in structure_blocks(model) for m in block.modules()}
    return find_targets(model, budget.include, budget.exclude, kinds=KINDS + tuple(graph.PRUNERS), default=inside)


def rows_per_sample(model: nn.Module, batch: dict) -> dict[nn.Module, int]:
    """Output positions (tokens, pixels) each Linear/Conv computes for one sample: its MACs are that times its
    weights."""
    found: dict[nn.Module, int] = {}

    def hook(module, args, out):
        channels = module.weight.shape[0] if not isinstance(module, nn.Linear) else module.out_features
        found[module] = found.get(module, 0) + out.numel() // channels

    with removing([m.register_forward_hook(hook) for m in model.modules() if isinstance(m, KINDS)]), evaluating(model):
        call_model(model, {k: v[:1] for k, v in batch.items() if k != "labels"})
    return found


def model_size(model: nn.Module, batch: dict) -> tuple[int, int]:
    """(parameters, MACs of every Linear and Conv for one sample). Attention's own products (QK^T, AV) are not
    layers and are not counted."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    macs = sum(rows * m.weight.numel() for m, rows in rows_per_sample(model, batch).items())
    return params, macs


def prune_structured(model: nn.Module, budget: Budget, estimator: Estimator, allocator: Allocator, calibration,
                     device=None, progress: bool = True, rollback: bool = True) -> PruneReport:
    """See prunekit.prune with Budget(granularity="structured")."""
    start = time.perf_counter()
    if calibration is None:
        raise CalibrationError("structured pruning traces the model's graph on an example input: pass calibration="
                               "<token windows [N, L] or input dicts> (one batch will do for magnitude)")
    targets = structured_targets(model, budget)
    _check(targets, estimator, allocator)
    batches = as_batches(calibration, model)
    uniform = budget.uniform if budget.uniform is not None else hasattr(model, "config")
    heads, notes = _heads(model, budget, uniform)
    structures = find_structures(model, targets, heads, budget.round_to, batches[0])
    if not structures:
        raise TargetError(f"{type(model).__name__} has no head or channel that can be removed among the targeted "
                          f"layers: channels on the residual stream and model outputs stay whole")
    rows = rows_per_sample(model, batches[0])
    before = model_size(model, batches[0])
    seconds = {}
    with torch.no_grad():
        clock = time.perf_counter()
        dense = DenseModel(model, targets, batches, estimator, device, progress)
        stats = dense.stats(estimator)
        by_module = {t.module: stats[t.module] for t in targets}
        scores = [estimator.structure_scores(s.parts(by_module), s.items) for s in structures]
        seconds["scoring"] = time.perf_counter() - clock
        clock = time.perf_counter()
        measured = allocator.measured if allocator.measured is not None else allocator.measure(dense)
        if measured is not None and len(measured) != len(targets):
            raise PrunekitError(f"the allocator reuses {len(measured)} measurements but the model has "
                                f"{len(targets)} targets; measure on this model (without reuse)")
        removed, costs, sparsities = _allocate(structures, scores, targets, rows, budget, allocator, measured,
                                               uniform)
        chosen = [s.choose(x, count) if count else None for s, x, count in zip(structures, scores, removed)]
        seconds["allocation"] = time.perf_counter() - clock
    clock = time.perf_counter()
    units_before = [s.units for s in structures]
    shapes = {t.module: (t.module.weight.shape[0], t.module.weight.numel() // t.module.weight.shape[0])
              for t in targets}
    work = [(s, pick) for s, pick in zip(structures, chosen) if pick is not None]
    refit = refitter(estimator, budget)
    blocker = _unrefittable(model, work) if refit is not None else None
    if blocker is not None:
        if budget.refit:
            raise TargetError(blocker + ": prune without refit (Budget(refit=False))")
        refit = None
        notes.append(f"no refit: {blocker}")
    notes.insert(0, f"heads {heads}, {'uniform' if uniform else 'free'} widths, refit "
                    f"{'off' if refit is None else 'by ' + type(refit).__name__ + ' least squares'}")
    with _transaction(model, structures, enabled=rollback):
        if refit is None:
            for s, pick in work:
                s.remove(pick)
        else:
            _remove_refitting(model, work, refit, batches, device, progress)
            recalibrate(model, batches, progress)  # what the refit leaves to the batch norms' statistics
        reload = _update_config(model, structures, units_before)
    seconds["pruning"] = time.perf_counter() - clock
    after = model_size(model, batches[0])
    seconds["total"] = time.perf_counter() - start
    flops = budget.metric == "flops"
    report_rows = [StructureRow(name=s.name, kind=s.kind, unit=s.unit, block=s.block, units=n, removed=r,
                                target=x, unit_weights=s.unit_weights, unit_flops=c if flops else None,
                                detail=s.describe(pick) if pick is not None else "")
                   for s, n, r, x, c, pick in zip(structures, units_before, removed, sparsities, costs, chosen)]
    layers = _layer_rows(targets, shapes, structures, units_before, removed, sparsities, rows if flops else None)
    return PruneReport(model=type(model).__name__, importance=repr(estimator), allocator=repr(allocator),
                       granularity="structured", requested=budget.sparsity, metric=budget.metric, layers=layers,
                       seconds=seconds, measured=measured, structures=report_rows,
                       size={"params": [before[0], after[0]], "macs": [before[1], after[1]], "reload": reload,
                             "uniform": uniform},
                       calibration=calibration_summary(batches), notes=notes)


def _heads(model: nn.Module, budget: Budget, uniform: bool) -> tuple[str, list[str]]:
    """The heads mode to run, and a note where "auto" leaves attention alone: widths meant for the config (uniform,
    a model with a config) that cannot hold fewer heads of the same size, so that from_pretrained still reloads."""
    if budget.heads != "auto" or not (uniform and hasattr(model, "config")):
        return budget.heads, []
    why = next((a.why_no_config for a in find_attention(model) if a.why_no_config), "")
    if not why:
        return "auto", []
    return "none", [f"attention left alone so that the model reloads with from_pretrained: {why}; heads='kv' "
                    f"removes heads (the model then reloads through prunekit.load_pruned only)"]


def _unrefittable(model: nn.Module, work: list) -> str | None:
    """Why the refit cannot run on these removals (a reader it cannot solve least squares for), or None."""
    names = {m: n for n, m in model.named_modules()}
    for structure, pick in work:
        odd = next((m for m, _ in column_keeps(structure, pick) if isinstance(m, _CONVS) and not _patchable(m)), None)
        if odd is not None:
            return (f"refit solves least squares on a layer's input patches, and {names[odd]}, which reads "
                    f"{structure.name}, is a grouped or {type(odd).__name__} convolution")
    return None


def refitter(estimator: Estimator, budget: Budget) -> Estimator | None:
    """Who refits kept columns: a reconstructing estimator itself, else SparseGPT's least squares unless the budget
    says refit=False."""
    if type(estimator).refit_columns is not Estimator.refit_columns:
        return estimator
    if budget.refit is not False:
        from ..importance.sparsegpt import SparseGPT

        return SparseGPT()
    return None


def column_keeps(structure: Structure, chosen) -> list[tuple[nn.Module, torch.Tensor]]:
    """(layer, keep mask over its input channels) for every layer that reads channels `chosen` removes."""
    gone = structure.removed_items(chosen)
    found = []
    for part in structure.parts({m: None for m in structure.cuts}):
        if part.dim != 1:
            continue
        slices = part.slices if part.slices is not None else torch.arange(len(part.items))
        keep = torch.ones(part.weight.shape[1], dtype=torch.bool)
        for s, item in zip(slices.tolist(), part.items.tolist()):
            if item in gone:
                keep[s * part.size:(s + 1) * part.size] = False
        found.append((part.module, keep))
    return found


def _remove_refitting(model: nn.Module, work: list, refit: Estimator, batches: list[dict], device,
                      progress: bool) -> None:
    """Removes each block's structures after refitting the kept columns of the layers reading them, on the inputs
    those layers get with the blocks before already pruned (the runner feeds each pruned block's outputs on)."""
    names = {m: n for n, m in model.named_modules()}
    _, blocks = find_blocks(model)
    where = {m: i for i, b in enumerate(blocks) for m in b.modules()}
    by_block: dict = {}
    for structure, pick in work:
        keeps = column_keeps(structure, pick)
        by_block.setdefault(where.get(keeps[0][0]) if keeps else None, []).append((structure, pick, keeps))

    def refit_and_remove(entries, stats):
        for structure, pick, keeps in entries:
            for module, keep in keeps:
                weight = module.weight.data.view(module.weight.shape[0], -1)  # a convolution's: [out, in x kh x kw]
                columns = keep.repeat_interleave(weight.shape[1] // keep.numel()).to(weight.device)
                new = refit.refit_columns(weight.float(), stats[module], columns)
                weight[:, columns] = new.to(weight)
            structure.remove(pick)

    def consumers(entries):
        found = {m: None for _, _, keeps in entries for m, _ in keeps}
        return [Target(names[m], m, where.get(m)) for m in found]

    for step in sequential(model, blocks, batches, device=device, desc="refit", progress=progress):
        entries = by_block.pop(step.index, [])
        if entries:
            stats = empty_stats(consumers(entries), Needs.HESSIAN, device)
            step.run(stats)
            refit_and_remove(entries, stats)
    for entries in by_block.values():  # structures outside the blocks: on the model as pruned
        stats = empty_stats(consumers(entries), Needs.HESSIAN)
        full_pass(model, batches, stats)
        refit_and_remove(entries, stats)


def _patchable(module: nn.Module) -> bool:
    """A convolution whose input patches hooks.input_rows can take (and so refit can solve on)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str)
            and module.padding_mode == "zeros")


def _check(targets: list[Target], estimator: Estimator, allocator: Allocator) -> None:
    if not allocator.structured:
        raise BudgetError(f"allocator {allocator.name!r} measures unstructured pruning and does not apply to "
                          f"granularity='structured'; use uniform, owl or ecoflap")
    convs = [t.name for t in targets if isinstance(t.module, _CONVS)]
    linear_only = [f"importance {estimator.name!r}"] * bool(estimator.needs & (Needs.INPUT_NORMS | Needs.HESSIAN)) \
        + [f"allocator {allocator.name!r}"] * allocator.linear_inputs
    if convs and linear_only:
        raise TargetError(f"{' and '.join(linear_only)} read per-feature input statistics of Linear layers, which a "
                          f"convolution ({convs[0]}) does not have; use magnitude, fisher or structural_hessian with "
                          f"the uniform or ecoflap allocator")


def _allocate(structures: list[Structure], scores: list[torch.Tensor], targets: list[Target], rows: dict,
              budget: Budget, allocator: Allocator, measured, uniform: bool
              ) -> tuple[list[int], list[float], list[float]]:
    """(units removed, cost of one unit, allocated sparsity) per structure. Costs add up across structures except
    where two cut one layer from both sides (weights_removed); there the goal handed to the allocator grows by what
    the crossings took back, until the model loses what the budget asks within one unit."""
    flops = budget.metric == "flops"
    weight_of = (lambda m: rows.get(m, 0)) if flops else (lambda m: 1)  # noqa: E731
    costs = [float(sum(n * weight_of(m) for m, n in s.cuts.items())) for s in structures]
    goal = budget.sparsity * sum(t.module.weight.numel() * weight_of(t.module) for t in targets)
    plan.check_reachable(structures, costs, goal, budget.max_layer_sparsity, budget.metric)
    most = sum(plan.allowed(s, budget.max_layer_sparsity)[-1] * c for s, c in zip(structures, costs))
    units = [s.unit_scores(x) for s, x in zip(structures, scores)]
    sizes = {t.module: t.module.weight.numel() for t in targets}
    asked = goal
    for _ in range(20):
        removed, sparsities = _allocate_goal(structures, units, costs, asked, budget, allocator, measured,
                                             targets, uniform)
        lost = sum(w * weight_of(m) for m, w in weights_removed(structures, removed, sizes).items())
        if lost >= goal - min(costs) / 2 or asked >= most:
            break
        asked = min(most, asked + goal - lost)
    return removed, costs, sparsities


def _allocate_goal(structures, units, costs, goal, budget, allocator, measured, targets, uniform):
    """(units removed, allocated sparsity) per structure for a goal in additive costs."""
    cap = budget.max_layer_sparsity
    by_units = plan.by_kind(allocator.allocate_units, structures, units, costs, goal, cap) if uniform else \
        allocator.allocate_units(units, costs, [plan.allowed(s, cap) for s in structures], goal)
    if by_units is not None:
        return by_units, [r / s.units for r, s in zip(by_units, structures)]
    sizes = [s.units * s.unit_weights for s in structures]
    pool = sum(s.units * c for s, c in zip(structures, costs))
    inner = plan.inner_budget(budget, goal, pool)
    per_weight = [c / s.unit_weights for s, c in zip(structures, costs)]
    sparsities = allocator.allocate(sizes, per_weight, inner, _per_structure(measured, structures, targets))
    rounding = plan.round_uniform if uniform else plan.round_free
    return rounding(structures, sparsities, costs, goal, cap), sparsities


def _per_structure(measured, structures: list[Structure], targets: list[Target]):
    """The allocator's per-target measurements read per structure: numbers averaged over the layers a structure
    cuts (weighted by what it cuts of each), (group, score) pairs (ECoFLaP) keep their group and average scores."""
    if measured is None:
        return None
    of = {t.module: m for t, m in zip(targets, measured)}
    out = []
    for s in structures:
        values = [(of[m], n) for m, n in s.cuts.items() if m in of]
        total = sum(n for _, n in values)
        first = values[0][0]
        if isinstance(first, (int, float)):
            out.append(sum(v * n for v, n in values) / total)
        elif isinstance(first, tuple) and len(first) == 2 and isinstance(first[1], (int, float)):
            keys = {v[0] for v, _ in values}
            out.append((first[0] if len(keys) == 1 else s.name, sum(v[1] * n for v, n in values) / total))
        else:
            raise BudgetError(f"the allocator measured {type(first).__name__}s per layer, which structured pruning "
                              f"cannot read per structure; use uniform, owl or ecoflap")
    return out


def _layer_rows(targets, shapes, structures, units, removed, sparsities, rows) -> list[LayerRow]:
    """Per targeted layer, in the unstructured report's terms: its shape before, the weights it lost (what every
    structure's removed units cut from it) and the share the allocator meant it to lose."""
    lost = {t.module: 0 for t in targets}
    sizes = {t.module: shapes[t.module][0] * shapes[t.module][1] for t in targets}
    lost.update({m: round(w) for m, w in weights_removed(structures, removed, sizes).items()})
    ideal = {t.module: 0.0 for t in targets}
    for s, n, x in zip(structures, units, sparsities):
        for m, per_unit in s.cuts.items():
            ideal[m] += x * n * per_unit
    out = []
    for t in targets:
        shape = shapes[t.module]
        numel = shape[0] * shape[1]
        out.append(LayerRow(name=t.name, shape=shape, target=ideal[t.module] / numel, achieved=lost[t.module] / numel,
                            pruned=lost[t.module], seconds=0.0, block=t.block,
                            flops_per_weight=None if rows is None else float(rows.get(t.module, 0))))
    return out


def _touched(structures: list[Structure]) -> list[nn.Module]:
    found = {}
    for s in structures:
        if isinstance(s, Channels):
            found.update((item.dep.target.module, None) for item in s.group
                         if isinstance(item.dep.target.module, nn.Module))
        else:
            found.update((m, None) for m in [*s.attention.projections(), *s.attention.module.modules()])
    return list(found)


@contextlib.contextmanager
def _transaction(model: nn.Module, structures: list[Structure], enabled: bool):
    """On any exception (Ctrl-C included) puts back every touched module's parameters, buffers and sizes, and the
    config, then re-raises."""
    if not enabled:
        yield
        return
    saved = [(m, {k: (v.detach().clone(), v.requires_grad) for k, v in m._parameters.items() if v is not None},
              {k: v.clone() for k, v in m._buffers.items() if v is not None},
              {k: v for k, v in vars(m).items() if isinstance(v, (int, float, tuple, str))})
             for m in _touched(structures)]
    config = getattr(model, "config", None)
    config_state = copy.deepcopy(vars(config)) if config is not None else None
    try:
        yield
    except BaseException:
        for m, params, buffers, plain in saved:
            for k, (value, grad) in params.items():
                m._parameters[k] = nn.Parameter(value, requires_grad=grad)
            m._buffers.update(buffers)
            vars(m).update(plain)
        if config_state is not None:
            vars(config).update(config_state)
        raise


def _update_config(model: nn.Module, structures: list[Structure], units: list[int]) -> str:
    """Writes the pruned widths into the model's config where it can hold them; returns how the model reloads."""
    config = getattr(model, "config", None)
    changed = [(s, n) for s, n in zip(structures, units) if s.units != n]
    if config is None:
        return "prunekit.load_pruned(path, model=<a fresh instance>) (a plain module has no config for its widths)"
    reasons = []
    heads = [s for s, _ in changed if isinstance(s, AttentionHeads)]
    if heads:
        why = next((s.attention.why_no_config for s in heads if s.attention.why_no_config), "")
        counts = {(s.attention.heads, s.attention.kv_heads, s.attention.head_dim)
                  for s in structures if isinstance(s, AttentionHeads)}
        if why:
            reasons.append(why)
        elif len(counts) > 1:
            reasons.append("its layers keep different head counts, and the config holds one")
        else:
            (h, kv, d), = counts
            values = {"num_attention_heads": h, "num_key_value_heads": kv, "head_dim": d}
            for key in heads[0].attention.config_keys:
                if key != "num_key_value_heads" or hasattr(config, key):
                    setattr(config, key, values[key])
    channels = [(s, n) for s, n in changed if isinstance(s, Channels)]
    if channels:
        width = getattr(config, "intermediate_size", None)
        kept = {s.units for s in structures if isinstance(s, Channels)}
        if not all(n == width for s, n in zip(structures, units) if isinstance(s, Channels)):
            reasons.append(f"the config has no field for the width of {channels[0][0].name}")
        elif len(kept) > 1:
            reasons.append("its layers keep different MLP widths, and the config holds one intermediate_size")
        else:
            config.intermediate_size = kept.pop()
    for s in structures:  # modules that remember their width
        if isinstance(s, Channels):
            parent = model.get_submodule(s.name) if s.name else model
            if hasattr(parent, "intermediate_size"):
                parent.intermediate_size = s.units
    return "from_pretrained" if not reasons else "prunekit.load_pruned only: " + "; ".join(reasons)
