"""prune(): targets -> (allocator's dense pass) -> allocation -> sequential importance + masking -> report."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import masks, offload
from .allocation import ALLOCATORS, Allocator, exact_counts
from .budget import Budget, BudgetLike
from .calibration.dense import DenseModel
from .calibration.inputs import as_batches
from .calibration.inputs import summary as calibration_summary
from .calibration.runner import full_pass, sequential
from .calibration.stats import LayerStats, Needs, empty_stats, gathered
from .distributed import group_of
from .errors import BudgetError, CalibrationError, PrunekitError, TargetError
from .importance import ESTIMATORS, Estimator, Scores
from .masking import check_block, check_nm
from .report import LayerRow, PruneReport
from .targets import Target, by_block, find_blocks, find_targets


def prune(model: nn.Module, budget: BudgetLike, importance: str | Estimator | None = None,
          allocator: str | Allocator = "uniform", calibration=None, *, order: str = "layer", device=None,
          progress: bool = True, rollback: bool = True, distributed=False, permute: bool = False) -> PruneReport:
    """Prunes `model` in place to `budget` and returns the per-layer report.

    budget: a Budget, a fraction of the targeted weights to remove (0.5), or an N:M pattern ("2:4").
        Budget(..., granularity="structured") removes whole heads, MLP channels and conv filters instead of
        masking weights (see prunekit.structured): the model gets smaller, its config says so, and every estimator
        and allocator scores it on the dense model (order does not apply).
    importance: estimator name (see prunekit.importance.ESTIMATORS.names()) or an Estimator instance. By default
        "admm" for N:M budgets (the best measured at 2:4 on SmolLM2: perplexity 37.8 against SparseGPT's 51.8 and
        Wanda's 131, in 2.2x SparseGPT's time; benchmarks/results/llm_quality.md); for structured
        budgets LRP (alpha-beta rule) where convolutions lose filters, Wanda elsewhere (see default_importance);
        "wanda" otherwise.
    allocator: allocator name (see prunekit.allocation.ALLOCATORS.names()) or an Allocator instance.
    calibration: a LongTensor of token windows [N, L], an iterable of model-input dicts, or a DataLoader;
        needed by every estimator and allocator except magnitude and uniform.
    order: "layer" calibrates each layer on the inputs it gets with the layers before it in its block already
        pruned (SparseGPT's true-sequential order), in one forward per block; "block" calibrates all layers of
        a block on the dense block and then recomputes its outputs (the Wanda/SparseGPT reference code and
        llm-compressor), two passes per block but only one batch's activations alive at a time.
    device: where each block runs during calibration (e.g. "cuda") while the model stays where it is. Estimators
        that score on the whole model (gradients, relevance, loss) run where the model is. A model loaded with
        prunekit.load_offloaded(dir) keeps its blocks on disk: each is read when the runner reaches it and written
        back pruned, so a model larger than memory prunes in about one block's memory.
    rollback: keep a CPU copy of every parameter and buffer until pruning finishes, so that an error or an
        interrupt part way (in allocation, scoring, training or masking) restores the model exactly; turn off when
        memory is too tight for one copy of the model.
    permute: for an N:M budget, first reorder the channels inside each block that a reorder leaves exact (an MLP's
        hidden channels: rows of gate and up, columns of down) so that the N:M groups keep more importance (RIA's
        channel permutation; prunekit.structured.permute). The model computes the same function before pruning
        and keeps its architecture; the report says how much importance each group's masks gained.
    distributed: True (torch.distributed's default group) or a process group: `calibration` is this rank's shard
        (prunekit.distributed.shard), statistics are all-reduced before each layer is pruned, and every rank ends
        with the masks one process would choose on all the shards in rank order, run with the ranks' torch thread
        count (float32 products round differently on another; ADMM's 2:4 masks then part at a near-tie or two; see
        prunekit.distributed).

    Everything is validated before the first weight changes. Masks stay on the model: pruned entries remain
    zero through later training until prunekit.remove_masks(model).
    """
    start = time.perf_counter()
    group = group_of(distributed)
    error, checked = None, None
    try:
        checked = _checked_inputs(model, budget, importance, allocator, calibration, order, group, permute)
    except Exception as e:
        if group is None:
            raise
        error = e
    if group is not None:  # every rank learns of any rank's refusal, so none waits for it in a collective
        group.settle(error, None if error is not None else _plan_of(*checked, order))
    budget, estimator, allocator, targets, batches = checked
    if budget.structured:  # removes heads and channels: no masks, no sequential order (scored on the dense model)
        from .structured import prune_structured

        return prune_structured(model, budget, estimator, allocator, calibration, device, progress, rollback)
    seconds: dict[str, float] = {}
    with torch.no_grad(), _transaction(model, targets, rollback):
        clock = time.perf_counter()
        permuted = _permute(model, targets, batches, budget.nm, device, progress, group) if permute else {}
        if permute:
            seconds["permutation"] = time.perf_counter() - clock
        clock = time.perf_counter()
        dense = DenseModel(model, targets, batches, estimator, device, progress, group)
        plan = _allocate(dense, budget, allocator)
        seconds["allocation"] = time.perf_counter() - clock
        clock = time.perf_counter()
        timings = _prune_targets(dense, plan.counts, budget, order)
        seconds["pruning"] = time.perf_counter() - clock
    seconds["total"] = time.perf_counter() - start
    layers = [LayerRow(name=t.name, shape=t.shape, target=sparsity, achieved=count / t.numel, pruned=count,
                       seconds=timings[t], block=t.block, flops_per_weight=None if plan.rows is None else plan.costs[i],
                       score=None if plan.measured is None else allocator.layer_score(plan.measured[i], sparsity))
              for i, (t, sparsity, count) in enumerate(zip(targets, plan.sparsities, plan.counts))]
    return PruneReport(model=type(model).__name__, importance=repr(estimator), allocator=repr(allocator),
                       granularity=_granularity(budget), requested=budget.sparsity, metric=budget.metric, layers=layers,
                       seconds=seconds, measured=plan.measured,
                       calibration=_summary(batches, group), permuted=permuted)


def _permute(model, targets, batches, nm, device, progress, group) -> dict[str, float]:
    """Reorders the model's permutable channel groups for `nm`, scored by Wanda on the dense model."""
    from .structured.permute import permutable_groups, permute

    groups = permutable_groups(model, targets, batches[0])
    if not groups:
        raise PrunekitError(f"permute=True found no channel group of {type(model).__name__} that a reorder leaves "
                            f"exact (an MLP's hidden channels between Linear layers); prune without permute")
    readers = {r for g in groups for r in g.readers}
    scored = [t for t in targets if t.module in readers]
    wanda = ESTIMATORS.create("wanda")
    scores = Scores(wanda, scored, DenseModel(model, scored, batches, wanda, device, progress, group).stats(wanda))
    return permute(groups, {t.module: scores.weights(t.name) for t in scored}, *nm, progress=progress)


def _checked_inputs(model, budget, importance, allocator, calibration, order, group, permute=False):
    """(budget, estimator, allocator, targets, batches), everything validated; raises before anything changes."""
    if order not in ("layer", "block"):
        raise PrunekitError(f"order must be 'layer' or 'block', got {order!r}")
    budget = Budget.coerce(budget)
    estimator = ESTIMATORS.create(default_importance(budget, model) if importance is None else importance)
    allocator = ALLOCATORS.create(allocator)
    if permute and budget.nm is None:
        raise BudgetError(f"permute=True reorders channels for N:M groups; the budget is {budget.granularity}, "
                          f"give an N:M one such as '2:4' (or drop permute)")
    if offload.store(model) is not None:
        if permute:
            raise PrunekitError("permute=True rewrites weights across each block before pruning, which an offloaded "
                                "model does not hold; load the model in memory")
        _block_by_block(budget, estimator, "an offloaded model holds one block at a time", "load the model in memory")
        offload.check_prunable(model, allocator)
    if group is not None:
        _check_distributed(budget, estimator)
    if budget.structured:
        return budget, estimator, allocator, None, None
    targets = find_targets(model, budget.include, budget.exclude)
    _check_plan(targets, budget, estimator, allocator)
    batches = _calibration(calibration, model, budget, estimator, allocator, permute)
    return budget, estimator, allocator, targets, batches


def default_importance(budget: Budget, model: nn.Module | None = None) -> str | Estimator:
    """What prune() scores with when no importance is given, the best measured where it needs no loss:
    - N:M: ADMM's reconstruction (N:M's sparsity is fixed, so its extra time buys quality where no allocator can;
      benchmarks/results/llm_quality.md);
    - structured, where convolutions lose filters: LRP with its CNN rule, alpha-beta (EfficientNet-Lite0 and the
      MNIST CNN: benchmarks/results/vision.md);
    - otherwise Wanda (structured: with the default refit, the best that needs no loss and reloads with
      from_pretrained on MiniLM; benchmarks/results/structured.md)."""
    if budget.nm is not None:
        return "admm"
    if budget.structured and model is not None:
        from .structured.pipeline import structured_targets

        if any(isinstance(t.module, nn.modules.conv._ConvNd) for t in structured_targets(model, budget)):
            return ESTIMATORS.create("lrp", rule="alpha_beta")
    return "wanda"


def _plan_of(budget, estimator, allocator, targets, batches, order) -> tuple:
    """What every rank of a distributed prune must share."""
    return (None if targets is None else [(t.name, t.shape) for t in targets], repr(budget), repr(estimator),
            repr(allocator), order, bool(batches))


def _block_by_block(budget: Budget, estimator: Estimator, why: str, instead: str) -> None:
    """Refuses what the block runner cannot do alone: structured pruning and estimators that gather on the whole
    model (for an offloaded model, and across ranks)."""
    if budget.structured:
        raise PrunekitError(f"structured pruning changes shapes across the whole model at once, and {why}; {instead}")
    if estimator.needs & Needs.WHOLE_MODEL:
        raise PrunekitError(f"importance {estimator.name!r} gathers on the whole model at once (gradients, loss or "
                            f"relevance), and {why}; use one the block runner feeds (magnitude, wanda, sparsegpt), "
                            f"or {instead}")


def _check_distributed(budget: Budget, estimator: Estimator) -> None:
    _block_by_block(budget, estimator, "distributed= reduces only the block runner's statistics", "run it on one rank")


def _summary(batches: list[dict], group) -> dict[str, int]:
    """The report's calibration summary, over every rank's shard."""
    found = calibration_summary(batches)
    return found if group is None else {k: int(group.sum_number(v)) for k, v in found.items()}


def score(model: nn.Module, importance: str | Estimator = "wanda", calibration=None, *, include: str | None = None,
          exclude: str | None = None, device=None, progress: bool = True, distributed=False) -> Scores:
    """Measures importance on the dense model without changing it, for structured pruning, allocation or a look.

    Every target (the layers prune() would prune; include/exclude as in Budget) gets the statistics the estimator
    needs, all gathered on the dense model (block by block for input statistics). The result gives scores per
    weight, per group (output channel, head, filter) and per layer:

        s = prunekit.score(model, "fisher", calibration=windows)
        s.groups("model.layers.0.self_attn.q_proj", size=64)   # one score per head of q_proj
        s.layers()                                             # {name: layer score}

    distributed: as for prune, statistics summed over every rank's calibration shard.
    """
    estimator = ESTIMATORS.create(importance)
    group = group_of(distributed)
    if group is not None:
        _check_distributed(Budget(sparsity=0.5), estimator)
    targets = find_targets(model, include, exclude)
    batches = _calibration(calibration, model, None, estimator, ALLOCATORS.create("uniform"))
    with torch.no_grad():
        stats = DenseModel(model, targets, batches, estimator, device, progress, group).stats(estimator)
    return Scores(estimator, targets, stats)


@dataclass
class _Plan:
    sparsities: list[float]  # per target, as allocated
    counts: list[int]  # weights to prune per target, exact
    costs: list[float]  # FLOPs per weight (1 unless measured)
    rows: dict | None  # rows per target, when measured for a flops budget
    measured: list | None  # the allocator's measurements


def _allocate(dense: DenseModel, budget: Budget, allocator: Allocator) -> _Plan:
    targets, nm = dense.targets, budget.nm
    sizes = [t.numel for t in targets]
    if nm:
        return _Plan([budget.sparsity] * len(targets), [n * (nm[1] - nm[0]) // nm[1] for n in sizes],
                     [1.0] * len(targets), None, None)
    # FLOPs per weight: measured when the budget is in FLOPs and there is data to measure it on
    rows = dense.rows() if budget.metric == "flops" and dense.batches else None
    measured = allocator.measured if allocator.measured is not None else allocator.measure(dense)
    if dense.group is not None:  # what was measured on the first samples is rank 0's (reduced statistics agree)
        rows, measured = dense.group.broadcast((None if rows is None else [rows[t] for t in targets], measured))
        rows = None if rows is None else dict(zip(targets, rows))
    costs = [float(rows[t]) for t in targets] if rows else [1.0] * len(targets)
    sparsities = allocator.allocate(sizes, costs, budget, measured)
    unit = budget.block[0] * budget.block[1] if budget.block else 1  # block budgets round in whole tiles
    return _Plan(sparsities, exact_counts(sizes, sparsities, budget, unit), costs, rows, measured)


def _granularity(budget: Budget) -> str:
    """The report's name for the granularity, with the tile spelled out ("block" -> "block32x32")."""
    return f"block{budget.block[0]}x{budget.block[1]}" if budget.block else budget.granularity


def _calibration(calibration, model, budget: Budget | None, estimator: Estimator, allocator: Allocator,
                 permute: bool = False) -> list[dict]:
    """Validated batches, or [] when nothing needs data; refuses a method that needs data and got none."""
    measuring = allocator.needs_data and budget.nm is None and allocator.measured is None
    users = [f"{kind} {name!r}" for kind, name, needed in (
        ("importance", estimator.name, estimator.needs != Needs.NONE), ("allocator", allocator.name, measuring),
        ("channel permutation", "permute=True", permute)) if needed]
    if users and calibration is None:
        raise CalibrationError(f"{' and '.join(users)} need calibration data; pass calibration=<token windows [N, L] "
                               f"or input dicts>, e.g. from prunekit.data.calibration_windows(tokenizer)")
    return as_batches(calibration, model) if users else []


def _check_plan(targets: list[Target], budget: Budget, estimator: Estimator, allocator: Allocator) -> None:
    """Everything that can be known wrong before calibration starts."""
    if allocator.structured_only:  # its allocate() would say so too, but only after measuring the model
        raise BudgetError(f"allocator {allocator.name!r} ranks heads and channels, so it needs "
                          f"granularity='structured'")
    if allocator.measured is not None and len(allocator.measured) != len(targets):
        raise PrunekitError(f"the allocator reuses {len(allocator.measured)} measurements but the model has "
                            f"{len(targets)} targets; measure on this model (without reuse)")
    if budget.nm is not None:
        for t in targets:
            check_nm(t.shape[1], *budget.nm, t.name)
        if allocator.name != "uniform":
            raise BudgetError(f"N:M sparsity prunes every layer alike; allocator {allocator.name!r} does not apply, "
                              f"use allocator='uniform'")
    if budget.block is not None:
        for t in targets:
            check_block(t.shape, budget.block, t.name)
    for t in targets:
        if masks.BUFFER in t.module._buffers:
            raise TargetError(f"{t.name} is already pruned; prune the dense model, or prunekit.remove_masks(model) "
                              f"first to prune again on top of the zeros")
        if not t.module.weight.is_meta and not torch.isfinite(t.module.weight).all():  # offloaded: checked on load
            raise TargetError(f"{t.name}.weight holds NaN or Inf; the model is broken before pruning")


def _prune_targets(dense: DenseModel, counts: list[int], budget: Budget, order: str) -> dict:
    """Prunes `counts` weights of each of dense's targets (in its order) with its estimator, in budget's granularity;
    sequentially block by block when the estimator needs data, the statistics summed over dense.group's ranks before
    each layer is pruned. Returns seconds per target."""
    estimator, device = dense.estimator, dense.device
    count_of = dict(zip(dense.targets, counts))
    seconds: dict[Target, float] = {}

    def prune_one(t: Target, stats: LayerStats | None):
        clock = time.perf_counter()
        # Computed where the weight is: inside the sequential pass its block sits on the compute device.
        new, keep = estimator.prune(t.weight.float(), stats, count_of[t], budget.nm, budget.block)
        t.module.weight.data.copy_(t.to_native(new))
        masks.attach(t.module, t.to_native(keep))
        seconds[t] = time.perf_counter() - clock

    if estimator.needs == Needs.NONE:
        for t in tqdm(dense.targets, desc=estimator.name, disable=not dense.progress, unit="layer"):
            prune_one(t, None)
        return seconds
    if estimator.needs & Needs.WHOLE_MODEL:  # scored on the dense model where it is, then pruned
        stats_of = estimator.gather(dense.model, dense.targets, dense.batches, progress=dense.progress)
        for t in tqdm(dense.targets, desc=estimator.name, disable=not dense.progress, unit="layer"):
            prune_one(t, stats_of[t.module])
        return seconds
    groups, outside = by_block(dense.targets)
    _, blocks = find_blocks(dense.model)
    for step in sequential(dense.model, blocks, dense.batches, device=device, desc=estimator.name,
                           progress=dense.progress):
        group = groups.get(step.index, [])
        if group and order == "layer":
            stats, target_of = empty_stats(group, estimator.needs, device), {t.module: t for t in group}
            step.run_layerwise(stats, lambda m: prune_one(target_of[m], gathered(target_of[m], stats, dense.group)))
        rest = [t for t in group if t not in seconds]  # all of them in "block" order, or after a fallback
        if rest:
            stats = empty_stats(rest, estimator.needs, device)
            step.run(stats)
            for t in rest:
                prune_one(t, gathered(t, stats, dense.group))
    if outside:
        stats = empty_stats(outside, estimator.needs, None)
        full_pass(dense.model, dense.batches, stats)
        for t in outside:
            prune_one(t, gathered(t, stats, dense.group))
    return seconds


@contextlib.contextmanager
def _transaction(model: nn.Module, targets: list[Target], enabled: bool):
    """On any exception (Ctrl-C included) restores every parameter and buffer of the model (estimators that train,
    as MaskSparsity, and allocators that perturb weights change more than the targets), each module's train/eval
    mode, and removes the targets' masks, then re-raises. An offloaded block needs no copy: its checkpoint is never
    written, so forgetting the changed blocks restores it."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())} if enabled else {}
    backup = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items() if not t.is_meta}
    modes = {m: m.training for m in model.modules()}
    try:
        yield
    except BaseException:
        offload.rollback(model)
        for t in targets:
            masks.detach(t.module)
        now = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, saved in backup.items():
            if name in now and not now[name].is_meta:
                now[name].data.copy_(saved)
        for module, training in modes.items():
            module.training = training
        raise
