"""SPT: tune the entries the task is most sensitive to, with LoRA where a matrix holds many of them.

He, Cai, Zhang, Tao, Zhuang, "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning", ICCV 2023
(arXiv:2303.08566; reference code github.com/ziplab/SPT, `engine.py:get_sensitivity`, `train_spt.py`).

1. Sensitivity (paper Sec. 3.2). The sensitivity of weight w_n is the loss reduction from tuning it alone, which a
   first-order Taylor expansion with one gradient step reduces to s_n = g_n² (the step size is common to all
   entries and drops out). s_n is accumulated in one shot before fine-tuning over C training samples (paper
   Algorithm 1: the squared gradient of each sample's loss; `per_sample=True`, the default, C = every sample of
   `batches`). The reference code (`engine.py:get_sensitivity`) adds the squared gradient of each mini-batch's
   mean loss instead (`per_sample=False`: cheaper, one backward per batch, but gradients of samples in one batch
   cancel before squaring). Each targeted weight has one float32 accumulator; a post-accumulate-grad hook adds
   the gradient's square into it as autograd produces it and frees the gradient right there, so no dense gradient
   per matrix is held (one exists at a time, during backward). Entries pruned by prunekit get sensitivity -inf.
2. Allocation (paper Sec. 3.3; `allocate`, a pure function of the sensitivities). The top-τ entries of all
   targeted matrices together (one global ranking) are the sensitive ones; σ_m of them lie in matrix m. A matrix
   with σ_m >= rank · (out + in) / alpha, its LoRA's parameter count over alpha (the paper's threshold σ_opt, set
   as in the reference code: `grad_sum >= structured_param_num / alpha`), is tuned structurally by a
   rank-`rank` LoRA (peft, through `prunekit.tuning.lowrank`; pruned entries stay zero); every other matrix
   trains exactly its σ_m sensitive entries (unstructured; `prunekit.tuning.sparse`). τ is the largest value for
   which the numbers that train, Σ LoRA parameters + Σ unstructured entries, fit in `budget` (that count grows
   with τ when alpha >= 1). The reference code instead sweeps τ over multiples of 20,000 and keeps the
   configuration whose count is nearest the budget, above or below it; here the budget is a cap, met as closely
   as the rule allows. Pruned entries are never sensitive, so never trained.
3. Training: LoRA factors and the selected entries train in one torch AdamW (`optimizer(lr)`); memory during
   training is a LoRA's plus two moments per selected entry.

Defaults. alpha = 10 (`--alpha` of the reference's train_spt.py, "the easiness level for a matrix to be
structurally tuned", used by all its configs; alpha = 1 switches a matrix to LoRA only where that adds no
parameters). rank = 16 and budget = the parameter count of a rank-`rank` LoRA on every targeted matrix, so that SPT
trains as many numbers as the LoRA it is compared with (the reference uses LoRA rank 8 on ViT-B/16 and sweeps
budgets of 0.2M-1.0M, below the 1.3M of that rank-8 LoRA on all its matrices). LoRA scaling: lora_alpha =
2 · rank, as prunekit's LoRA and the benchmark's (the reference's LoRA branch has no scaling, i.e. lora_alpha =
rank, and a DropPath of 0.1).
Scope: where the reference also ranks biases and norm weights (tuning a vector whole when a fifth of it is
sensitive, its `structured_vector` trick) and fully tunes the classifier head, this ranks and tunes only the
targeted weight matrices, the Linear (and GPT-2 Conv1D) layers prunekit prunes (`include` / `exclude` regexes as
for prune()). The model's train / eval mode during the sensitivity pass is the caller's (the reference uses train
mode).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunekitError
from ..targets import find_targets
from .base import TUNERS, Method, pruned
from .config import BATCHES, FLAG, LOSS_FN, PATTERN, Config, integer, number, option, optional
from .deltas import sparse_delta
from .sparse import change, select, selection


@dataclass
class Allocation:
    """SPT's trainable parameters: LoRA on `lora`, the flat `sparse` indices elsewhere (see `allocate`)."""

    lora: list[str]
    sparse: dict[str, torch.Tensor]  # name -> sorted flat indices (native weight layout); only non-empty ones
    sensitive: dict[str, int]  # σ: how many of the top-τ entries each matrix holds
    tau: int  # how many entries are sensitive (the top-τ)
    count: int  # numbers that train: LoRA parameters + unstructured entries (<= budget)
    costs: dict[str, int] = field(default_factory=dict)  # name -> its LoRA's parameter count


def lora_cost(shape, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA of a matrix: rank · (out + in)."""
    return rank * (int(shape[0]) + int(shape[1]))


def _threshold(cost: int, alpha: float) -> int:
    """The least σ that makes a matrix structured: σ >= cost / alpha."""
    return max(1, math.ceil(cost / alpha - 1e-9))


def allocate(sensitivity: dict[str, torch.Tensor], budget: int, rank: int = 16, alpha: float = 10.0) -> Allocation:
    """SPT's allocation of `budget` trainable numbers from per-entry sensitivities (module docstring, step 2).

    sensitivity: name -> a 2-D tensor of sensitivities (-inf marks entries that must never train: pruned ones).
    Entries are ranked by sensitivity, ties by the order of the dict, then by flat index. τ is the largest number
    of top entries for which Σ_m (LoRA parameters of m if σ_m >= rank·(out+in)/alpha else σ_m) <= budget; a
    matrix holding σ_m >= rank·(out+in)/alpha of the top-τ gets LoRA, the others train their σ_m entries.
    """
    for name, value, rule in (("budget", budget, BUDGET), ("rank", rank, RANK), ("alpha", alpha, ALPHA)):
        rule.check("SPT", name, value)
    if not sensitivity:
        raise PrunekitError("SPT needs the sensitivity of at least one matrix")
    names = list(sensitivity)
    for name, s in sensitivity.items():
        if s.dim() != 2:
            raise PrunekitError(f"SPT allocates over weight matrices; the sensitivity of {name!r} has shape "
                                f"{tuple(s.shape)}")
        if torch.isnan(s).any() or (s == math.inf).any():
            raise PrunekitError(f"the sensitivity of {name!r} holds NaN or +inf (the loss or its gradients were not "
                                f"finite); check the batches and the loss")
    finite = {n: int((s > -math.inf).sum()) for n, s in sensitivity.items()}
    total = sum(finite.values())
    if budget > total:
        raise PrunekitError(f"SPT budget {budget:,} is more than the {total:,} trainable (unpruned) entries of the "
                            f"{len(names)} matrices; pass budget <= {total:,}")
    costs = {n: lora_cost(s.shape, rank) for n, s in sensitivity.items()}
    thresholds = {n: _threshold(costs[n], alpha) for n in names}

    # Candidates: per matrix, its top K entries in rank order, K = min(finite, threshold, budget + 1). Deeper
    # entries never change the count: their matrix is already structured, or already over budget.
    values, ids, flats, within = [], [], [], []
    for i, name in enumerate(names):
        s = sensitivity[name].detach().reshape(-1).float()
        k = min(finite[name], thresholds[name], budget + 1)
        top = _top(s, k)
        values.append(s[top].cpu())
        flats.append(top.cpu())
        ids.append(torch.full((k,), i, dtype=torch.long))
        within.append(torch.arange(1, k + 1))
    values, ids, flats, within = (torch.cat(t) for t in (values, ids, flats, within))
    order = values.argsort(descending=True, stable=True)  # ties: dict order, then flat index (concatenation order)
    values, ids, flats, within = values[order], ids[order], flats[order], within[order]

    # The count after each candidate: +1 for an unstructured entry; at the threshold-th entry of a matrix, its σ
    # unstructured entries become a LoRA: + cost - (threshold - 1).
    thr = torch.tensor([thresholds[n] for n in names])[ids]
    cost = torch.tensor([costs[n] for n in names])[ids]
    step = torch.where(within == thr, cost - (thr - 1), torch.ones_like(cost))
    count = step.cumsum(0)
    taken = int(torch.searchsorted(count, torch.tensor([budget]), right=True))

    # σ of every matrix at the largest feasible τ: the entries ranked before the first candidate that breaks the
    # budget (all entries if none does).
    if taken < len(values):
        stop = (float(values[taken]), int(ids[taken]), int(flats[taken]))
        sensitive = {n: _ranked_before(sensitivity[n], i, stop) for i, n in enumerate(names)}
    else:
        sensitive = dict(finite)
    lora = [n for n in names if sensitive[n] >= thresholds[n]]
    sparse = {}
    for i, name in enumerate(names):
        if name not in lora and sensitive[name]:
            chosen = flats[:taken][ids[:taken] == i]
            assert chosen.numel() == sensitive[name]
            sparse[name] = chosen.sort().values
    used = sum(costs[n] for n in lora) + sum(v.numel() for v in sparse.values())
    return Allocation(lora, sparse, sensitive, sum(sensitive.values()), used, costs)


def _top(s: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest entries in rank order (ties by index)."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    kth = s.topk(k).values[-1]
    above = (s > kth).nonzero().view(-1)
    ties = (s == kth).nonzero().view(-1)[:k - above.numel()]
    chosen = torch.cat([above, ties]).sort().values
    return chosen[s[chosen].argsort(descending=True, stable=True)]


def _ranked_before(s: torch.Tensor, i: int, stop: tuple[float, int, int]) -> int:
    """How many entries of matrix number i rank before the entry `stop` = (value, matrix number, flat index)."""
    value, j, flat = stop
    s = s.detach().reshape(-1).float()
    n = int((s > value).sum())
    if i < j:
        n += int((s == value).sum())
    elif i == j:
        n += int((s[:flat] == value).sum())
    return n


# -- sensitivity

def _samples(batch: Mapping, per_sample: bool):
    """The batch itself, or its samples one by one (every tensor with the batch's leading size is sliced)."""
    if not per_sample:
        yield batch
        return
    sizes = [v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    n = sizes[0]
    for i in range(n):
        yield {k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
               for k, v in batch.items()}


def _loss(model: nn.Module, batch: Mapping, loss_fn) -> torch.Tensor:
    device = next(model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    outputs = model(**batch)
    loss = loss_fn(outputs, batch) if loss_fn is not None else getattr(outputs, "loss", None)
    if loss is None:
        raise PrunekitError(f"{type(model).__name__}(**batch) returned no .loss; put labels in the batches, or pass "
                            f"loss_fn=lambda outputs, batch: <scalar loss>")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise PrunekitError(f"SPT's loss must be a scalar tensor, got {type(loss).__name__}"
                            + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    return loss


def sensitivity(model: nn.Module, modules: dict[str, nn.Module], batches, loss_fn=None, per_sample: bool = True,
                progress: bool = True) -> dict[str, torch.Tensor]:
    """name -> Σ g² over the samples (or batches) of the module's weight, float32, in the weight's own layout;
    pruned entries -inf. Only these weights get gradients; the model's parameters, their requires_grad and
    existing gradients are as before when this returns or raises."""
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    weights = {name: m.weight for name, m in modules.items()}
    grads = {name: w.grad for name, w in weights.items()}
    buffers = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    hooks = []

    def accumulate(buffer):
        def hook(p):
            buffer.addcmul_(p.grad, p.grad)  # in float32 whatever the weight's dtype
            p.grad = None
        return hook

    try:
        for p in params:
            p.requires_grad_(False)
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            hooks.append(w.register_post_accumulate_grad_hook(accumulate(buffers[name])))
        total = sum(_batch_size(b) for b in batches) if per_sample else len(batches)
        with tqdm(total=total, desc="spt: sensitivity", leave=False, disable=not progress) as bar:
            for batch in batches:
                for sample in _samples(batch, per_sample):
                    _loss(model, sample, loss_fn).backward()
                    bar.update()
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        for name, w in weights.items():
            w.grad = grads[name]
    for name, buffer in buffers.items():
        if not torch.isfinite(buffer).all():
            raise PrunekitError(f"the gradients of {name}.weight are not finite (NaN or inf); check the batches and "
                                f"the loss")
        keep = pruned(modules[name])
        if keep is not None:
            buffer.masked_fill_(~keep, -math.inf)
    return buffers


def _batch_size(batch: Mapping) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)


# -- options

RANK = integer(1)
BUDGET = integer(1)
ALPHA = number(lambda v: v >= 1, "must be a number >= 1 (a matrix gets LoRA when it holds at least its LoRA's "
                                 "parameter count / alpha sensitive entries)")


@dataclass
class SPTConfig(Config):
    """SPT's options. budget: the numbers that may train, LoRA parameters + sparse entries (default: a rank-`rank`
    LoRA's parameter count over the targeted matrices); rank: LoRA rank of structured matrices; alpha: a matrix
    with at least rank·(out+in)/alpha sensitive entries gets LoRA; per_sample: add the squared gradient of every
    sample (the paper) or of every batch (the reference code); lora_alpha, dropout: the LoRA's scaling numerator
    (default 2 · rank) and dropout; include / exclude: regexes over module names (default: every Linear of the
    repeated blocks). Inputs of the run (not saved): batches, a few training batches, dicts for model(**batch)
    (labels included, or give loss_fn), over all of which the sensitivity is accumulated; loss_fn(outputs, batch),
    the loss when outputs.loss is not it; progress, a progress bar for the sensitivity pass."""

    method: ClassVar[str] = "spt"
    budget: int | None = option(None, optional(BUDGET))
    rank: int = option(16, RANK)
    alpha: float = option(10.0, ALPHA)
    per_sample: bool = option(True, FLAG)
    lora_alpha: float | None = option(None, optional(number(lambda v: v > 0, "must be a number > 0")))
    dropout: float = option(0.0, number(lambda v: 0 <= v < 1, "must be a number in [0, 1)"))
    include: str | None = option(None, PATTERN)
    exclude: str | None = option(None, PATTERN)
    batches: list | None = option(None, BATCHES, saved=False)
    loss_fn: Callable | None = option(None, LOSS_FN, saved=False)
    progress: bool = option(True, FLAG, saved=False)

    def validate(self) -> None:
        """Batches, when given (a config read back from saved deltas has none), are dicts of model inputs with a
        batch dimension; kept as a list."""
        if self.batches is None:
            return
        self.batches = list(self.batches)
        if not self.batches:
            raise PrunekitError("SPT's batches are empty; pass a few training batches")
        for i, b in enumerate(self.batches):
            if not isinstance(b, Mapping):
                raise PrunekitError(f"SPT's batches must be dicts of model inputs (model(**batch)); batch {i} is a "
                                    f"{type(b).__name__}")
            if not any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in b.values()):
                raise PrunekitError(f"SPT's batch {i} holds no tensor with a batch dimension")


@TUNERS.register("spt")
class SPT(Method):
    """Sensitivity-aware Parameter-efficient fine-Tuning (He et al., ICCV 2023); see the module docstring and
    `SPTConfig`. Train with `optimizer(lr)` (one torch AdamW over LoRA factors and selected entries). With
    transformers.Trainer set max_grad_norm=0: clipping does not see the reduced gradients of the sparse entries.
    """

    config_class = SPTConfig

    def __init__(self, config: SPTConfig | None = None, **options):
        super().__init__(config, **options)
        c = self.config
        if c.batches is None:
            raise PrunekitError("SPT needs batches to measure sensitivity: prepare(model, 'spt', batches=[{'input_ids': "
                                "..., 'labels': ...}, ...]), a few training batches")
        self.samples = sum(_batch_size(b) for b in c.batches) if c.per_sample else len(c.batches)
        self.allocation: Allocation | None = None
        self.lora: dict[str, nn.Module] = {}  # name -> peft LoRA layer
        self.layers: dict[str, nn.Module] = {}  # name -> module whose weight trains at selected entries

    def summary(self) -> dict:
        facts = {"samples": self.samples, "used": None, "tau": None}
        if self.allocation is not None:
            facts.update(used=self.allocation.count, tau=self.allocation.tau)
        return {**super().summary(), **facts}

    def attach(self, model: nn.Module) -> None:
        c = self.config
        targets = find_targets(model, c.include, c.exclude)
        modules = {t.name: t.module for t in targets}
        unpruned = sum(int(pruned(m).sum()) if pruned(m) is not None else m.weight.numel() for m in modules.values())
        budget = c.budget if c.budget is not None else sum(lora_cost(m.weight.shape, c.rank)
                                                           for m in modules.values())
        if budget > unpruned:
            what = (f"budget {budget:,}" if c.budget is not None else
                    f"default budget {budget:,} (a rank-{c.rank} LoRA's parameter count over these layers)")
            raise PrunekitError(f"SPT {what} is more than the {unpruned:,} unpruned weights of the {len(modules)} "
                                f"targeted layers of {type(model).__name__}; pass budget <= {unpruned:,}"
                                + ("" if c.budget is not None else " or a smaller rank"))
        scores = sensitivity(model, modules, c.batches, c.loss_fn, c.per_sample, c.progress)
        if self.group is not None:  # sums of g² over every rank's samples (pruned entries stay -inf)
            self.group.sum_(list(scores.values()))
        # keys as named in the native layout: Conv1D weights are [in, out]; the LoRA cost is symmetric
        self.allocation = allocate(scores, budget, c.rank, c.alpha)
        del scores

        for p in model.parameters():
            p.requires_grad_(False)
        if self.allocation.lora:
            from .lowrank import inject

            self.lora.update(inject(model, self.allocation.lora, c.rank, c.lora_alpha, c.dropout))
            for p in model.parameters():  # peft marks adapters trainable; make sure nothing else is
                p.requires_grad_(False)
            for layer in self.lora.values():
                for p in self._factors(layer):
                    p.requires_grad_(True)
        for name, indices in self.allocation.sparse.items():
            select(modules[name].weight, indices)
            self.layers[name] = modules[name]

    @staticmethod
    def _factors(layer: nn.Module) -> list[nn.Parameter]:
        return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def trainable(self) -> list[torch.Tensor]:
        return [p for layer in self.lora.values() for p in self._factors(layer)] + \
            [selection(m.weight).values for m in self.layers.values()]

    def trainable_count(self) -> int:
        return sum(p.numel() for layer in self.lora.values() for p in self._factors(layer)) + \
            sum(selection(m.weight).indices.numel() for m in self.layers.values())

    def lora_layers(self) -> dict[str, nn.Module]:
        return self.lora

    def deltas(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.layers.items():
            out.update(sparse_delta(f"{name}.weight", *change(module.weight)))
        return out
