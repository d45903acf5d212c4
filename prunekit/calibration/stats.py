"""Statistics of a layer's inputs, gathered over calibration tokens. Pure accumulators, no hooks here.

Everything is kept as sums plus a token count, so that shards gathered on several ranks add up exactly.
"""
from __future__ import annotations

import enum

import torch

from ..errors import CalibrationError


class Needs(enum.Flag):
    """What an estimator or allocator needs the runner to gather for each layer."""

    NONE = 0
    INPUT_NORMS = enum.auto()  # per input feature: sum over tokens of x_j^2
    HESSIAN = enum.auto()  # X^T X over tokens (its diagonal gives the norms too)
    # Gathered by the estimator itself (Estimator.gather) from whole-model passes over the dense model:
    GRADIENTS = enum.auto()  # gradients of the model's loss (labels, or next tokens for an LM)
    LOSS = enum.auto()  # the model's loss, forward passes only
    RELEVANCE = enum.auto()  # relevance propagated back from the output (LRP)
    ACTIVATIONS = enum.auto()  # statistics of layer inputs and outputs on the dense model
    TRAINING = enum.auto()  # a short training phase (the estimator changes the model)
    WHOLE_MODEL = GRADIENTS | LOSS | RELEVANCE | ACTIVATIONS | TRAINING


# X^T X accumulation: column panels of _PANEL, each panel's diagonal block in sub-panels of _SUBPANEL (measured
# fastest of the widths tried for 576- and 1536-wide inputs of 4096 tokens on 2 cores: 9% below one level of 256).
_PANEL, _SUBPANEL = 384, 128


class LayerStats:
    """Accumulates what `needs` asks for from inputs x of shape [..., in_features]."""

    def __init__(self, needs: Needs, in_features: int, device: torch.device | str = "cpu"):
        self.needs = needs
        self.count = 0
        self.reduced = False  # summed over the ranks of a process group since the last update (see all_reduce)
        self.derived: dict = {}  # quantities estimators compute from these statistics; cleared by update()
        # X^T X; only its lower triangle (and the diagonal blocks) is accumulated (see `update`), read by `gram()`.
        self._xtx = torch.zeros(in_features, in_features, device=device) if Needs.HESSIAN in needs else None
        self.sq = torch.zeros(in_features, device=device) if self._xtx is None and Needs.INPUT_NORMS in needs else None

    def update(self, x: torch.Tensor) -> None:
        self.derived.clear()
        self.reduced = False
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        if self._xtx is None:
            if self.sq is not None:
                self.sq += x.square().sum(0)
        else:
            # Lower triangle of X^T X by column panels, in torch's own BLAS: below each panel's diagonal block one
            # product, the block itself in narrower sub-panels, so little of the upper triangle is computed. (SciPy's
            # ssyrk does exactly half, but its OpenBLAS threads keep spinning after each call and slowed the block's
            # next matmuls to half speed on 2 cores: slower overall, measured.)
            d = x.shape[1]
            for i in range(0, d, _PANEL):
                j = min(i + _PANEL, d)
                for k in range(i, j, _SUBPANEL):
                    self._xtx[k:j, k:k + _SUBPANEL].addmm_(x[:, k:j].t(), x[:, k:k + _SUBPANEL])
                self._xtx[j:, i:j].addmm_(x[:, j:].t(), x[:, i:j])

    def all_reduce(self, group) -> None:
        """Adds the statistics of every rank of `group` (a prunekit.distributed.Group) into each, once: layers that
        share one LayerStats (q, k and v) reduce it a single time."""
        if self.reduced:
            return
        group.sum_([t for t in (self._xtx, self.sq) if t is not None])
        self.count = int(group.sum_number(self.count))
        self.derived.clear()
        self.reduced = True

    def gram(self) -> torch.Tensor:
        """X^T X summed over every calibration token."""
        if self._xtx is None:
            raise RuntimeError("X^T X was not gathered; the estimator must declare Needs.HESSIAN")
        lower = self._xtx.tril()
        return lower + lower.tril(-1).t()

    @property
    def input_sq_norms(self) -> torch.Tensor:
        """||X_j||^2 summed over every calibration token, per input feature j."""
        return self.sq if self.sq is not None else torch.diagonal(self._xtx).clone()

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, the Hessian of the layer-wise squared error ||W X - W' X||^2 / n (SparseGPT)."""
        return self.gram() * (2.0 / max(self.count, 1))


def empty_stats(targets, needs: Needs, device=None) -> dict:
    """Fresh LayerStats per target module (on `device`, else where the module is); a pass may make layers that
    share an input share one."""
    return {t.module: LayerStats(needs, t.numel // t.shape[0], device or next(t.module.parameters()).device)
            for t in targets}  # a convolution's columns: in x kh x kw (hooks.input_rows)


def gathered(target, stats: dict, group=None) -> LayerStats:
    """The target's statistics after a pass (summed over the ranks of `group`, if given), refusing a layer that no
    calibration token reached."""
    st = stats[target.module]
    if group is not None:
        st.all_reduce(group)
    if st.count == 0:
        raise CalibrationError(f"{target.name} received no calibration tokens (every token masked as padding?)")
    return st
