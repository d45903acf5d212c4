"""LIFT: fine-tune only the principal weights, the largest entries of a low-rank approximation of each matrix.

Liu, Pang, Balabanov, Yang, Huang, Yin, Yang, Liu, "LIFT the Veil for the Truth: Principal Weights Emerge after
Rank Reduction for Reasoning-Focused Supervised Fine-Tuning", ICML 2025 (arXiv:2506.00772). For each weight
matrix W of the model's blocks: W_r = the rank-`filter_rank` truncated SVD of W; the trainable entries are the
top-K of |W_r|, with K = `rank` · (out + in), the parameter count of a rank-`rank` LoRA of that matrix (capped at
the matrix size). Every `interval` optimizer steps the selection is recomputed from the current weights; Adam's
moments carry over for entries that stay selected, new entries start from zero moments.

Defaults are the paper's LLaMA-2-7B arithmetic configuration (reference scripts: LoRA-equivalent rank 128,
filter rank 64, refresh every 400 steps, randomized SVD with q = 2 · filter_rank); embeddings and the LM head do
not train. Where the reference keeps a dense gradient and dense-shaped buffers for every matrix and masks them
in the optimizer, here gradients are reduced to the selected entries as autograd produces them and the optimizer
(torch's AdamW) holds state for the selected entries only (`prunekit.tuning.sparse`): memory close to LoRA's.
Entries pruned by prunekit are never selected (they stay zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunekitError
from ..targets import PRUNABLE, find_blocks, find_targets
from .base import TUNERS, Method, pruned
from .config import PATTERN, Config, integer, one_of, option
from .deltas import sparse_delta
from .sparse import change, reselect, select, selection

SVDS = ("randomized", "exact")


def matrix(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a matrix, [out, in] (a convolution's: [out, in x kernel height x kernel width], the
    matrix its output is of its input patches), sharing the weight's storage and flat order."""
    return module.weight.view(module.weight.shape[0], -1)


def low_rank(weight: torch.Tensor, rank: int, svd: str = "randomized", niter: int = 2) -> torch.Tensor:
    """The rank-`rank` truncated SVD approximation of a matrix, in float32: exact, or randomized (Halko et al.,
    with q = 2 · rank oversampled directions and `niter` power iterations)."""
    w = weight.detach().float()
    rank = min(rank, *w.shape)
    if svd == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        v = vh.mT
    else:
        u, s, v = torch.svd_lowrank(w, q=min(2 * rank, *w.shape), niter=niter)
    return (u[:, :rank] * s[:rank]) @ v[:, :rank].mT


@dataclass
class LIFTConfig(Config):
    """LIFT's options. rank: trainable entries per matrix as a LoRA rank, K = rank · (out + in); filter_rank: rank
    of the approximation whose magnitudes choose them; interval: optimizer steps between selections (0: never
    refresh); svd: "randomized" or "exact"; niter: power iterations of the randomized SVD; include / exclude:
    regexes over module names (default: every Linear, and every Conv2d as its [out, in x kh x kw] matrix, of the
    repeated blocks)."""

    method: ClassVar[str] = "lift"
    rank: int = option(128, integer(1))
    filter_rank: int = option(64, integer(1))
    interval: int = option(400, integer(0))
    svd: str = option("randomized", one_of(*SVDS))
    niter: int = option(2, integer(0))
    include: str | None = option(None, PATTERN)
    exclude: str | None = option(None, PATTERN)


@TUNERS.register("lift")
class LIFT(Method):
    """Low-rank Informed sparse Fine-Tuning (Liu et al., ICML 2025); see the module docstring and `LIFTConfig`.

    Train with `optimizer(lr)` (torch's AdamW over the selected entries; its step hook refreshes the selection), in
    a plain loop or as `transformers.Trainer(..., optimizers=(tuned.optimizer(lr), None))`. Trainer's gradient
    clipping does not see the reduced gradients; set max_grad_norm=0 there.
    """

    config_class = LIFTConfig

    def __init__(self, config: LIFTConfig | None = None, **options):
        super().__init__(config, **options)
        self.layers: dict[str, nn.Module] = {}

    def budget(self, module: nn.Module) -> int:
        """K for one matrix: a rank-`rank` LoRA's parameter count."""
        return self.config.rank * sum(matrix(module).shape)

    def largest_rank(self, module: nn.Module) -> int:
        """The largest rank whose K fits in the matrix's unpruned entries."""
        keep = pruned(module)
        return (module.weight.numel() if keep is None else int(keep.sum())) // sum(matrix(module).shape)

    def principal(self, module: nn.Module) -> torch.Tensor:
        """Flat indices of the top-K entries of |low-rank approximation|, pruned entries excluded."""
        score = low_rank(matrix(module), self.config.filter_rank, self.config.svd, self.config.niter).abs()
        keep = pruned(module)
        if keep is not None:
            score = score.masked_fill(~keep.view(score.shape), -1.0)  # below every |value|: never chosen
        return score.view(-1).topk(self.budget(module)).indices

    def attach(self, model: nn.Module) -> None:
        kinds = PRUNABLE + (nn.Conv2d,)
        inside = {m for block in find_blocks(model, kinds)[1] for m in block.modules()}  # a CNN's blocks too
        targets = find_targets(model, self.config.include, self.config.exclude, kinds=kinds, default=inside)
        tightest = min(targets, key=lambda t: self.largest_rank(t.module))
        if self.largest_rank(tightest.module) < self.config.rank:
            limit = self.largest_rank(tightest.module)
            raise PrunekitError(f"LIFT rank {self.config.rank} trains more entries than {tightest.name} "
                                f"({'x'.join(map(str, tightest.shape))}) has unpruned; pass rank <= {limit}, or "
                                f"exclude the smallest layers")
        indices = {t.name: self.principal(t.module) for t in tqdm(targets, desc="lift: principal weights",
                                                                   leave=False)}
        if self.group is not None:  # the randomized SVD draws differ by rank: rank 0's choice for every rank
            self.group.broadcast_(list(indices.values()))
        for p in model.parameters():
            p.requires_grad_(False)
        for t in targets:
            select(t.module.weight, indices[t.name])
            self.layers[t.name] = t.module

    def trainable(self) -> list[torch.Tensor]:
        return [selection(m.weight).values for m in self.layers.values()]

    def trainable_count(self) -> int:
        return sum(selection(m.weight).indices.numel() for m in self.layers.values())

    def after_step(self) -> None:
        if self.config.interval and self.steps % self.config.interval == 0:
            self.refresh()

    def refresh(self) -> None:
        """Chooses the principal weights again from the current weights (moments carry over where they stay)."""
        chosen = {name: self.principal(module) for name, module in self.layers.items()}
        if self.group is not None:
            self.group.broadcast_(list(chosen.values()))
        for name, module in self.layers.items():
            reselect(module.weight, chosen[name], self._optimizer)

    def deltas(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in self.layers.items():
            out.update(sparse_delta(f"{name}.weight", *change(module.weight)))
        return out
