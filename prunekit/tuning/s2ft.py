"""S2FT: structured sparse fine-tuning of a few attention heads and MLP channels, computed densely.

Yang, Leng, Zhang, Chen, Kang, Zhang, Wang, Chen, "S2FT: Efficient, Scalable and Generalizable LLM Fine-tuning by
Structured Sparsity", NeurIPS 2024 (arXiv:2412.06289). Heads and MLP channels are coupled structures: a head's rows
of Q, K, V and its columns of O, a channel's rows of up/gate and its column of down, can be reordered together
without changing what the block computes. S2FT chooses a few of them, co-permutes each block so the chosen ones
form one contiguous slice, and trains only that slice: the columns of O for the chosen heads and of down for the
chosen channels (the paper's default), optionally the rows of V and of up/gate. Only the slice's gradient is
computed, and for a column slice autograd keeps only the matching slice of the layer's input (partial
back-propagation). Trained slices fuse into the weights and unfuse exactly, so they swap like adapters.

Defaults follow the reference scripts for LLaMA-2-7B commonsense reasoning: 5.2% of the model's heads train in O,
2% of its channels in down, V and up/gate not at all, chosen at random over the whole model (so blocks get
different numbers). `select` can instead rank units by any prunekit estimator (the sum of its scores over the
entries a unit would train). Grouped-query attention: query heads that share a key/value head move together, so a
unit is a whole KV group (a head when there is no GQA), and ratios count units; the reference samples query heads
and would split a group apart from its K/V rows.

Pruned entries stay zero: the trained slice is multiplied by the slice of the prune mask. Deltas are saved in the
model's original (unpermuted) coordinates, so `load_deltas` applies them to a fresh base model.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunekitError
from ..masks import BUFFER
from ..targets import find_blocks
from .base import TUNERS, Method, pruned
from .config import Config, Rule, integer, number, option
from .deltas import sparse_delta

# Names inside one block, per architecture family: attention q, k, v, o; MLP up, gate (None: no gate), down.
LAYOUTS = (
    dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
         up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj"),  # Llama, Qwen2, Mistral, SmolLM
    dict(q="attention.q_proj", k="attention.k_proj", v="attention.v_proj", o="attention.o_proj",
         up="mlp.fc1", gate=None, down="mlp.fc2"),  # ViT (transformers 5)
    dict(q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
         up="intermediate.dense", gate=None, down="output.dense"),  # BERT
)
RATIOS = ("heads", "channels", "value_heads", "up_channels")


@dataclass
class Block:
    """One transformer block's coupled layers and its unit sizes (a unit: a KV group of heads, or a channel)."""

    index: int
    layers: dict[str, nn.Module]  # role -> Linear
    names: dict[str, str]  # role -> module name
    groups: int  # KV groups (heads without GQA)
    group_rows: int  # rows of q (columns of o) per group
    head_dim: int  # rows of k and v per group
    channels: int


class Slice:
    """The trained part of one Linear: rows (dim 0) or columns (dim 1) start:end, as a delta Parameter added in a
    forward hook; fusing writes it into the weight and keeps the original slice, so unfusing is exact."""

    def __init__(self, module: nn.Linear, dim: int, start: int, end: int, axis_perm: torch.Tensor):
        self.module, self.dim, self.start, self.end, self.axis_perm = module, dim, start, end, axis_perm
        shape = list(module.weight.shape)
        shape[dim] = end - start
        keep = pruned(module)
        self.keep = None if keep is None else keep.narrow(dim, start, end - start).clone()
        self.delta = nn.Parameter(torch.zeros(shape, dtype=module.weight.dtype, device=module.weight.device))
        self.original: torch.Tensor | None = None  # the weight's slice while fused
        self.handle = module.register_forward_hook(self._forward)

    def masked(self) -> torch.Tensor:
        return self.delta if self.keep is None else self.delta * self.keep

    def _forward(self, module, args, out):
        if self.original is not None:  # fused: the weight already holds the delta
            return out
        x, delta = args[0], self.masked()
        if self.dim == 1:  # only this slice of the input is kept for backward
            return out + F.linear(x[..., self.start:self.end].contiguous(), delta)
        added = out[..., self.start:self.end] + F.linear(x, delta)
        return torch.cat([out[..., :self.start], added, out[..., self.end:]], dim=-1)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.original is None:
            part = self.module.weight.narrow(self.dim, self.start, self.end - self.start)
            self.original = part.clone()
            part.add_(self.masked().to(part.dtype))

    @torch.no_grad()
    def unfuse(self) -> None:
        if self.original is not None:
            self.module.weight.narrow(self.dim, self.start, self.end - self.start).copy_(self.original)
            self.original = None

    def count(self) -> int:
        return self.delta.numel() if self.keep is None else int(self.keep.sum())

    def flat_indices(self) -> torch.Tensor:
        """Flat indices of the slice's entries in the weight's original (unpermuted) layout."""
        out_features, in_features = self.module.weight.shape
        rows, cols = torch.arange(out_features), torch.arange(in_features)
        if self.dim == 0:
            rows = self.axis_perm[self.start:self.end]
        else:
            cols = self.axis_perm[self.start:self.end]
        return (rows[:, None] * in_features + cols[None, :]).reshape(-1)


def _fraction() -> Rule:
    return number(lambda v: 0 <= v <= 1, "is a fraction of units in [0, 1]")


@dataclass
class S2FTConfig(Config):
    """S2FT's options. heads: fraction of attention units (KV groups) whose O columns train; channels: fraction of
    MLP channels whose down columns train; value_heads / up_channels: the same for V rows and up/gate rows (0 by
    default). Fractions count units over the whole model. select: "random" (seeded by `seed`) or a prunekit
    estimator name, scored on `calibration` (prune()'s calibration data; an input of the run, not saved; none
    needed for magnitude)."""

    method: ClassVar[str] = "s2ft"
    heads: float = option(0.052, _fraction())
    channels: float = option(0.02, _fraction())
    value_heads: float = option(0.0, _fraction())
    up_channels: float = option(0.0, _fraction())
    select: str = option("random", Rule(lambda v: isinstance(v, str), "must be 'random' or an estimator name"))
    seed: int = option(0, integer())
    calibration: Any = option(None, saved=False)

    def validate(self) -> None:
        if not any(getattr(self, what) for what in RATIOS):
            raise PrunekitError("S2FT with every fraction at 0 trains nothing; set heads and/or channels above 0")
        if self.select != "random":
            from ..importance import ESTIMATORS
            ESTIMATORS.create(self.select)  # unknown names fail here, before the model changes


@TUNERS.register("s2ft")
class S2FT(Method):
    """Structured Sparse Fine-Tuning (Yang et al., NeurIPS 2024); see the module docstring and `S2FTConfig`."""

    config_class = S2FTConfig

    def __init__(self, config: S2FTConfig | None = None, **options):
        super().__init__(config, **options)
        self.blocks: list[Block] = []
        self.slices: dict[str, Slice] = {}  # module name -> trained slice

    # -- set-up
    def attach(self, model: nn.Module) -> None:
        self.blocks = coupled_blocks(model)
        counts = {what: self._count(what) for what in RATIOS}
        chosen = self._choose(model, counts)
        for p in model.parameters():
            p.requires_grad_(False)
        for block in tqdm(self.blocks, desc="s2ft: permute and slice", leave=False):
            self._slice(block, *(chosen[what].get(block.index, []) for what in RATIOS))
        for s in self.slices.values():
            s.delta.requires_grad_(True)

    def _units(self, what: str) -> list[tuple[int, int]]:
        """(block, unit) over the whole model for one kind of unit."""
        attention = what in ("heads", "value_heads")
        return [(b.index, u) for b in self.blocks for u in range(b.groups if attention else b.channels)]

    def _count(self, what: str) -> int:
        total = len(self._units(what))
        ratio = getattr(self.config, what)
        n = int(total * ratio)
        if ratio and not n:
            raise PrunekitError(f"S2FT's {what}={ratio} selects none of the model's {total} units; "
                                f"pass at least {1 / total:.3g}")
        return n

    def _choose(self, model, counts: dict[str, int]) -> dict[str, dict[int, list[int]]]:
        """what -> block index -> chosen units."""
        scores = None if self.config.select == "random" else self._scores(model)
        rng = random.Random(self.config.seed)
        chosen = {}
        for what in RATIOS:
            units = self._units(what)
            if scores is None:
                picked = rng.sample(units, counts[what])
            else:
                picked = sorted(units, key=lambda bu: -scores[what][bu[0]][bu[1]])[:counts[what]]
            chosen[what] = {}
            for b, u in sorted(picked):
                chosen[what].setdefault(b, []).append(u)
        return chosen if self.group is None else self.group.broadcast(chosen)  # scores differ by rank's data

    def _scores(self, model) -> dict[str, list[torch.Tensor]]:
        """what -> per block, a score per unit: the estimator's scores summed over the entries the unit trains."""
        import prunekit

        names = [n for b in self.blocks for n in b.names.values()]
        include = "^(" + "|".join(map(re.escape, names)) + ")$"
        s = prunekit.score(model, self.config.select, self.config.calibration, include=include, progress=False)
        out = {what: [] for what in RATIOS}
        for b in self.blocks:
            out["heads"].append(s.groups(b.names["o"], size=b.group_rows, dim=1))
            out["value_heads"].append(s.groups(b.names["v"], size=b.head_dim, dim=0))
            out["channels"].append(s.groups(b.names["down"], size=1, dim=1))
            up = s.groups(b.names["up"], size=1, dim=0)
            out["up_channels"].append(up + s.groups(b.names["gate"], size=1, dim=0) if "gate" in b.names else up)
        return out

    def _slice(self, block: Block, heads, channels, value_heads, up_channels) -> None:
        """Co-permutes the block so each chosen set is contiguous, then adds the trained slices."""
        attn, (o_range, v_range) = _order(block.groups, heads, value_heads)
        mlp, (down_range, up_range) = _order(block.channels, channels, up_channels)
        permute(block, attn, mlp)
        rows = {"q": _expand(attn, block.group_rows), "k": _expand(attn, block.head_dim),
                "v": _expand(attn, block.head_dim), "up": mlp, "gate": mlp}
        wanted = [("o", 1, o_range, block.group_rows, rows["q"]), ("down", 1, down_range, 1, mlp),
                  ("v", 0, v_range, block.head_dim, rows["v"])]
        wanted += [(role, 0, up_range, 1, mlp) for role in ("up", "gate") if role in block.layers]
        for role, dim, (start, end), size, axis_perm in wanted:
            if end > start:
                self.slices[block.names[role]] = Slice(block.layers[role], dim, start * size, end * size, axis_perm)

    # -- training
    def trainable(self) -> list[nn.Parameter]:
        return [s.delta for s in self.slices.values()]

    def trainable_count(self) -> int:
        return sum(s.count() for s in self.slices.values())

    # -- adapters
    def fuse(self) -> None:
        """Writes the trained slices into the weights (plain Linear speed); `unfuse` restores them exactly."""
        for s in self.slices.values():
            s.fuse()

    def unfuse(self) -> None:
        for s in self.slices.values():
            s.unfuse()

    def deltas(self) -> dict[str, torch.Tensor]:
        return {k: v for name, s in self.slices.items()
                for k, v in sparse_delta(f"{name}.weight", s.flat_indices(), s.masked().reshape(-1)).items()}


def coupled_blocks(model: nn.Module) -> list[Block]:
    """The model's blocks with their coupled attention and MLP layers, or an error naming what was looked for."""
    _, blocks = find_blocks(model)
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    out = []
    for i, block in enumerate(blocks):
        modules = dict(block.named_modules())
        layout = next((lay for lay in LAYOUTS if all(isinstance(modules.get(n), nn.Linear)
                                                     for n in lay.values() if n)), None)
        if layout is None or heads is None:
            looked = "; ".join(", ".join(n for n in lay.values() if n) for lay in LAYOUTS)
            raise PrunekitError(f"S2FT needs attention and MLP Linear layers it knows by name in every block and "
                                f"config.num_attention_heads; {type(model).__name__} block {i} has none of these "
                                f"sets: {looked}")
        prefix = next(n for n, m in model.named_modules() if m is block)
        layers = {role: modules[n] for role, n in layout.items() if n}
        q_rows, kv_rows = layers["q"].out_features, layers["v"].out_features
        if q_rows % heads or kv_rows % kv_heads or heads % kv_heads:
            raise PrunekitError(f"{prefix}: {q_rows} query rows and {kv_rows} value rows do not split into "
                                f"{heads} heads and {kv_heads} key/value heads")
        head_dim = q_rows // heads
        out.append(Block(i, layers, {role: f"{prefix}.{n}" for role, n in layout.items() if n}, kv_heads,
                         head_dim * heads // kv_heads, kv_rows // kv_heads, layers["up"].out_features))
    return out


def _order(n: int, first: list[int], second: list[int]) -> tuple[torch.Tensor, tuple[tuple, tuple]]:
    """A unit order [first only, both, second only, the rest] and the unit ranges of `first` and `second`."""
    a, b = set(first), set(second)
    groups = [sorted(a - b), sorted(a & b), sorted(b - a), sorted(set(range(n)) - a - b)]
    order = torch.tensor([u for g in groups for u in g], dtype=torch.long)
    split = len(groups[0])
    return order, ((0, len(a)), (split, split + len(b)))


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Unit order -> row order, for units of `size` consecutive rows."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


@torch.no_grad()
def permute(block: Block, attn: torch.Tensor, mlp: torch.Tensor) -> None:
    """Reorders the block's heads (by KV group) and MLP channels, in the weights, biases and prune masks of every
    coupled layer, which leaves the block's function unchanged. `attn` and `mlp` give the old unit at each new
    position."""
    q, kv = _expand(attn, block.group_rows), _expand(attn, block.head_dim)
    plan = [("q", 0, q), ("k", 0, kv), ("v", 0, kv), ("o", 1, q), ("up", 0, mlp), ("gate", 0, mlp),
            ("down", 1, mlp)]
    for role, dim, order in plan:
        layer = block.layers.get(role)
        if layer is None:
            continue
        tensors = [layer.weight] + ([layer._buffers[BUFFER]] if BUFFER in layer._buffers else [])
        if dim == 0 and layer.bias is not None:
            tensors.append(layer.bias)
        for t in tensors:
            t.copy_(t.index_select(dim, order.to(t.device)))
