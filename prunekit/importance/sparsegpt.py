"""SparseGPT: OBS mask selection and reconstruction of the kept weights, column block by column block."""
from __future__ import annotations

import warnings

import torch

from .. import masking
from ..calibration.stats import LayerStats, Needs
from .base import ESTIMATORS, Estimator

_INNER = 32  # columns per rank-1 update run inside a lazy batch (see prune)


@ESTIMATORS.register("sparsegpt")
class SparseGPT(Estimator):
    """Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023).

    With H = 2 X X^T / n the Hessian of the layer's squared reconstruction error, the columns are processed left
    to right. Pruning weight w_qj costs w^2 / [H_F^-1]_jj, where F holds the columns not yet processed, and the
    optimal (OBS) correction of the remaining weights of the row is -w / [H_F^-1]_jj * [H_F^-1]_j,F. The rows of
    the upper Cholesky factor of H^-1 give exactly these quantities for every F, so one factorisation serves all
    columns. Masks are chosen adaptively per block of `blocksize` columns (lazy batch updates), N:M per group of
    M columns as it is reached. Under a block granularity each lazy batch spans whole tile columns and prunes its
    share of the layer's tiles, ranked by the summed saliency of their weights; the OBS updates then run unchanged.

    Differences from the reference code: each block prunes its exact share of the layer's count, so the layer
    meets its budget to the weight (the reference thresholds with ties, and rounds per block); columns never seen
    in calibration get unit curvature but keep their weights, so only the mask puts zeros in the model.
    """

    needs = Needs.HESSIAN

    def __init__(self, blocksize: int = 128, damp: float = 0.01):
        if blocksize < 1 or not damp > 0:
            raise ValueError(f"need blocksize >= 1 and damp > 0; got {blocksize}, {damp}")
        self.blocksize, self.damp = blocksize, damp

    def scores(self, weight: torch.Tensor, stats: LayerStats) -> torch.Tensor:
        """OBS saliency w^2 / [H^-1]_jj with the full (damped) inverse."""
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(self._damped(stats.hessian(), self.damp)))
        return weight.square() / torch.diagonal(hinv).unsqueeze(0)

    @staticmethod
    def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
        h = hessian.clone()
        diag = torch.diagonal(h)
        diag[diag == 0] = 1.0  # inputs never active in calibration
        diag += damp * diag.mean()
        return h

    def inverse_cholesky(self, hessian: torch.Tensor) -> torch.Tensor:
        """Upper Cholesky factor of the damped H^-1, raising the damping tenfold (up to 4 times) if needed."""
        damp = self.damp
        for attempt in range(5):
            try:
                h = self._damped(hessian, damp)
                hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
                factor = torch.linalg.cholesky(hinv, upper=True)
                if attempt:
                    warnings.warn(f"SparseGPT: Hessian not positive definite, used damp={damp:g} instead of "
                                  f"{self.damp:g}", stacklevel=3)
                return factor
            except torch.linalg.LinAlgError:
                damp *= 10
        raise torch.linalg.LinAlgError(f"SparseGPT: Hessian not positive definite even with damp={damp / 10:g}")

    def refit_columns(self, weight: torch.Tensor, stats: LayerStats, keep: torch.Tensor) -> torch.Tensor:
        """Least squares on the calibration inputs X with the removed input channels gone: W_K' = W H[:, K] H_KK^-1,
        H = X^T X (damped as for pruning), the OBS update of the kept columns when whole columns go at once; it is
        the reconstruction of structured OBS pruning (Kurtic, Frantar, Alistarh, "ZipLM: Inference-Aware Structured
        Pruning of Language Models", NeurIPS 2023)."""
        h = self._damped(stats.hessian().to(weight.device).double(), self.damp)
        kept = keep.nonzero().squeeze(1)
        hk = h[kept][:, kept]
        solved = torch.linalg.solve(hk, h[kept] @ weight.double().t())  # H_KK^-1 H_K: [kept, out]
        return solved.t().to(weight.dtype)

    def prune(self, weight: torch.Tensor, stats: LayerStats, count: int, nm: tuple[int, int] | None,
              block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # Work on W^T so that a column of W is a contiguous row: two vector ops per column in the inner loop.
        wt = weight.float().t().contiguous()
        cols, rows = wt.shape
        key = ("sparsegpt inverse cholesky", self.damp, wt.device)
        if key not in stats.derived:  # pruning one layer at several levels (DP's curves) factors once
            stats.derived[key] = self.inverse_cholesky(stats.hessian().to(wt.device))
        u = stats.derived[key]
        step = nm[1] if nm is not None else block[1] if block is not None else 1  # lazy batches hold whole groups
        bs = max(step, self.blocksize // step * step)
        keep = torch.ones_like(wt, dtype=torch.bool)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            w1, u1, keep1 = wt[i1:i2], u[i1:i2, i1:i2], keep[i1:i2]
            d = torch.diagonal(u1).unsqueeze(1)
            if block is not None:  # tiles of W are (C, R) tiles of W^T; this batch's share of the layer's tiles
                area = block[0] * block[1]
                share = _share(count // area, i1 // block[1], i2 // block[1], cols // block[1])
                keep1.copy_(masking.block_mask(w1.square() / d.square(), share * area, (block[1], block[0])))
            elif nm is None:  # this block's exact share of the layer's count, rounded on cumulative sums
                share = _share(count, i1, i2, cols)
                keep1.copy_(masking.lowest(w1.square() / d.square(), share))
            # error of column i is w_i * scale_i: 1 / d_i where pruned, 0 where kept
            if nm is None:
                scale = (~keep1) / d
            else:  # each group's scale is set as the loop reaches it, and keep1 read off it after
                scale, inv_d, d2 = torch.empty_like(w1), 1 / d, d.square()
            err1 = torch.empty_like(w1)
            inner = max(step, _INNER // step * step)
            for j1 in range(0, i2 - i1, inner):
                # The batch's own columns are lazy-updated too, `inner` at a time: the rank-1 updates touch only
                # these columns, one matrix product the rest of the batch (the same arithmetic, less memory traffic).
                j2 = min(j1 + inner, i2 - i1)
                for i in range(j1, j2):
                    if nm is not None and i % nm[1] == 0:
                        # Per row of W the group's n highest w^2 / d^2 are kept (scale 0), the rest get 1 / d: five
                        # small ops, as this runs every m columns and on a GPU each op is a launch the loop waits on.
                        group = slice(i, i + nm[1])
                        saliency = w1[group].square().div_(d2[group])
                        scale[group] = inv_d[group]
                        scale[group].scatter_(0, saliency.topk(nm[0], dim=0).indices, 0.0)
                    torch.mul(w1[i], scale[i], out=err1[i])
                    w1[i:j2].addr_(u1[i, i:j2], err1[i], alpha=-1.0)  # OBS update of the columns still to come
                w1[j2:].addmm_(u1[j1:j2, j2:].t(), err1[j1:j2], alpha=-1.0)
            if nm is not None:
                torch.eq(scale, 0, out=keep1)  # 1 / d is never 0
            w1.mul_(keep1)  # exact zeros where pruned, whatever rounding left
            wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1.0)  # lazy update of the later blocks
        return wt.t(), keep.t()


def _share(total: int, start: int, stop: int, n: int) -> int:
    """Of `total` prunings spread evenly over n columns, those of columns [start, stop): rounded on cumulative sums,
    so the shares of consecutive ranges add up to `total` exactly."""
    return (total * stop + n // 2) // n - (total * start + n // 2) // n
