"""Budget: how much of which layers to prune, and in what pattern."""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Union

from .errors import BudgetError

GRANULARITIES = ("unstructured", "structured")
HEAD_MODES = ("auto", "kv", "query", "none")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK = re.compile(r"^\s*block(?:(\d+)x(\d+))?\s*$")
DEFAULT_BLOCK = (32, 32)


@dataclass(frozen=True)
class Budget:
    """What to prune.

    Give one of:
    sparsity: fraction of the targeted weights to remove, in (0, 1). Implied by an N:M granularity.
    params: fraction of the targeted weights to keep (params=0.4 is sparsity=0.6).
    flops: fraction of the targeted layers' FLOPs to keep. Each layer's FLOPs per weight is measured as the
        rows (tokens, positions) it processes on the calibration data, so an allocator may trade a cheap layer's
        weights against an expensive one's; for the Linears of a transformer all rows are alike and this equals
        params.

    granularity: "unstructured", or "N:M" (keep N of every M consecutive input weights, e.g. "2:4"), or "block"
        (whole 32x32 tiles kept or pruned; "block16x16", "block64x64" or any "blockRxC" for other tiles; the
        kernels of prunekit.kernels run 16, 32 and 64 square). Block budgets are exact in whole tiles, and every
        targeted layer must be tiled exactly (a ragged layer raises; exclude it or pick a smaller block).
        "structured" removes whole attention heads, MLP channels and conv filters, so the model itself gets smaller
        and faster with any kernel (prunekit.structured, on Torch-Pruning's dependency graph). The budget then
        counts the targeted layers' weights (or FLOPs) that removed heads and channels take with them, and is met
        within one unit (a head, a channel, or round_to channels) per structure; the targets default to every
        Linear and Conv layer inside the model's repeated blocks (decoder layers, ViT blocks, residual blocks).
    min_layer_sparsity, max_layer_sparsity: floor and cap for every layer's sparsity; allocators respect them.
    include: regex (re.search on module names) choosing the layers to prune among all Linear/Conv1D layers
        of the model; by default every Linear inside the model's repeated blocks.
    exclude: regex of module names to leave alone.

    Structured only:
    round_to: every pruned layer keeps a multiple of round_to channels (8 for tensor cores, the head size to match
        attention), or is left whole. Heads are always removed whole.
    heads: which attention units go. "auto": whole heads with their key and value rows under multi-head attention;
        under grouped-query attention the same number of query heads from every KV group (all KV heads stay);
        and none where widths are uniform but the config cannot hold fewer heads of the same size (BERT derives
        the head size as hidden_size / num_attention_heads), so that the pruned model still reloads with plain
        from_pretrained (measured on MiniLM: benchmarks/results/structured.md). "kv" removes them there too;
        the model then reloads through prunekit.load_pruned only.
        "kv": whole KV groups (the K/V head with every query head that reads it; shrinks the KV cache). "query":
        query heads within groups (GQA only). "none": attention is left alone.
    uniform: every block keeps the same widths per kind (heads, channels), as a Hugging Face config can only say
        one intermediate_size and one head count for all layers; then the allocator decides only how the budget
        splits between kinds. None: uniform for models with a config (so that plain from_pretrained reloads them),
        free per structure otherwise.
    refit: after removing heads or channels, refit the kept input columns of the layers that read them (o_proj,
        down_proj) by least squares on their calibration inputs, block by block on the activations of the model
        as pruned so far: the OBS update of structured pruning (ZipLM, Kurtic et al. 2023). Changes kept weights;
        one more pass over the calibration data. SparseGPT as the importance always refits. A refit also
        re-estimates every BatchNorm's running statistics on the calibration data (one more forward pass), which
        the removed channels left describing the dense model. None (the default): refit wherever every reader of
        removed channels can be refit (Linear layers, ungrouped Conv2d), and say so in the report where one
        cannot; the refit is what keeps a structurally pruned model close to its dense self (MiniLM,
        EfficientNet-Lite0 and the MNIST CNN in benchmarks/results/structured.md and vision.md).
    """

    sparsity: float | None = None
    params: float | None = None
    flops: float | None = None
    granularity: str = "unstructured"
    min_layer_sparsity: float = 0.0
    max_layer_sparsity: float = 1.0
    include: str | None = None
    exclude: str | None = None
    round_to: int | None = None
    heads: str = "auto"
    uniform: bool | None = None
    refit: bool | None = None

    def __post_init__(self):
        if self.params is not None and self.flops is not None:
            raise BudgetError("give a params or a flops budget, not both")
        for name in ("params", "flops"):
            kept = getattr(self, name)
            if kept is None:
                continue
            if isinstance(kept, bool) or not isinstance(kept, (int, float)) or not 0 < kept < 1:
                raise BudgetError(f"{name} must be the fraction kept, in (0, 1); got {kept!r}")
            if self.sparsity is not None and not math.isclose(self.sparsity, 1 - kept):  # agreeing is fine
                raise BudgetError(f"sparsity={self.sparsity} contradicts {name}={kept}; give one of them")
            object.__setattr__(self, "sparsity", 1 - kept)
        nm = _parse_nm(self.granularity)
        if nm is None and parse_block(self.granularity) is None and self.granularity not in GRANULARITIES:
            raise BudgetError(f"unknown granularity {self.granularity!r}; use 'unstructured', 'N:M' such as '2:4', "
                              f"'block' / 'blockRxC' such as 'block64x64', or 'structured'")
        self._check_structured_options()
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.flops is not None:
                raise BudgetError("N:M fixes the sparsity of every layer; a flops budget does not apply")
            if self.sparsity is not None and not math.isclose(self.sparsity, implied):
                raise BudgetError(
                    f"sparsity={self.sparsity} contradicts granularity {self.granularity!r}, which prunes exactly "
                    f"{implied:g}; give only the granularity")
            object.__setattr__(self, "sparsity", implied)
        if self.sparsity is None:
            raise BudgetError("a Budget needs a sparsity (e.g. Budget(sparsity=0.5)) or an N:M granularity ('2:4')")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            raise BudgetError(f"sparsity must be a number in (0, 1), the fraction of weights removed; got {self.sparsity!r}")
        lo, hi = self.min_layer_sparsity, self.max_layer_sparsity
        if not 0 <= lo <= hi <= 1:
            raise BudgetError(f"need 0 <= min_layer_sparsity <= max_layer_sparsity <= 1; got {lo} and {hi}")
        if not lo <= self.sparsity <= hi:
            raise BudgetError(
                f"sparsity {self.sparsity:g} cannot be met: every layer must stay within "
                f"[min_layer_sparsity={lo:g}, max_layer_sparsity={hi:g}], so the overall sparsity must too")
        if nm is not None and (lo > 0 or hi < 1):
            raise BudgetError("per-layer floors and caps do not apply to N:M, which prunes every layer alike")
        for field in ("include", "exclude"):
            pattern = getattr(self, field)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise BudgetError(f"{field}={pattern!r} is not a valid regular expression: {e}") from None

    def _check_structured_options(self) -> None:
        if self.granularity != "structured":
            given = [f"{name}={getattr(self, name)!r}" for name, default in (("round_to", None), ("heads", "auto"),
                                                                             ("uniform", None), ("refit", None))
                     if getattr(self, name) != default]
            if given:
                raise BudgetError(f"{', '.join(given)} only apply to granularity='structured', not "
                                  f"{self.granularity!r}")
            return
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise BudgetError(f"round_to must be a whole number of channels >= 1 (8, or the head size); "
                              f"got {self.round_to!r}")
        if self.heads not in HEAD_MODES:
            raise BudgetError(f"heads must be one of {', '.join(map(repr, HEAD_MODES))}; got {self.heads!r}")
        if self.refit not in (None, True, False):
            raise BudgetError(f"refit must be True, False or None (refit where the layers allow it); "
                              f"got {self.refit!r}")
        if self.uniform not in (None, True, False):
            raise BudgetError(f"uniform must be True, False or None (uniform for models with a config); "
                              f"got {self.uniform!r}")

    @property
    def structured(self) -> bool:
        return self.granularity == "structured"

    @property
    def metric(self) -> str:
        """What `sparsity` is a fraction of: "params" (weights) or "flops"."""
        return "flops" if self.flops is not None else "params"

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M granularity, else None."""
        return _parse_nm(self.granularity)

    @property
    def block(self) -> tuple[int, int] | None:
        """(R, C) for a block granularity, else None."""
        return parse_block(self.granularity)

    @classmethod
    def coerce(cls, budget: "BudgetLike") -> "Budget":
        """A Budget from a Budget, a fraction (0.5), a percentage string ('50%') or an N:M string ('2:4')."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, str):
            text = budget.strip()
            if _parse_nm(text):
                return cls(granularity=text)
            try:
                value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise BudgetError(f"cannot read budget {budget!r}; write a fraction ('0.5'), a percentage ('50%') "
                                  f"or an N:M pattern ('2:4')") from None
            return cls(sparsity=value)
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return cls(sparsity=float(budget))
        raise BudgetError(f"budget must be a Budget, a fraction in (0, 1) or 'N:M'; got {type(budget).__name__}")

    def to_dict(self) -> dict:
        return {**asdict(self), "metric": self.metric}


def _parse_nm(text: str) -> tuple[int, int] | None:
    match = _NM.match(text) if isinstance(text, str) else None
    if not match:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise BudgetError(f"N:M needs 0 < N < M; got {text!r}")
    return n, m


def parse_block(text: str) -> tuple[int, int] | None:
    """(R, C) of a "block" / "blockRxC" granularity, None for any other text."""
    match = _BLOCK.match(text) if isinstance(text, str) else None
    if not match:
        return None
    if match.group(1) is None:
        return DEFAULT_BLOCK
    r, c = int(match.group(1)), int(match.group(2))
    if r < 1 or c < 1 or r * c < 2:
        raise BudgetError(f"a block needs at least two weights; got {text!r}")
    return r, c


BudgetLike = Union[Budget, float, str]
