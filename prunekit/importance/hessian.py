"""Second-order saliencies from the model's loss: OBD with the empirical Fisher, the Hutchinson trace of each
layer's Hessian, and NViT's structural saliency for channels and heads. (OBS with reconstruction is SparseGPT,
in sparsegpt.py: it uses the layer-wise Hessian of the output error instead of the loss's.)"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..calibration.loss import Loss, grads_for, model_loss, samples
from ..calibration.stats import Needs
from .base import ESTIMATORS, Estimator


def _per_slice(values: torch.Tensor, dim: int) -> torch.Tensor:
    """values summed over every dim but `dim`: one number per output (dim 0) or input (dim 1) channel."""
    return values.transpose(0, dim).reshape(values.shape[dim], -1).sum(1)


class GradientStats:
    """One layer's per-sample gradients g_n of the loss, reduced as they arrive: sum_n g_n^2 (the empirical
    Fisher diagonal times n) and, per sample, the sums of g_n * W over each output and each input channel (what a
    structure's saliency needs: its square must be taken per sample, before summing over samples)."""

    def __init__(self, weight: torch.Tensor):
        self.square_sum = torch.zeros_like(weight, dtype=torch.float32)
        self.count = 0
        self._rows: list[torch.Tensor] = []
        self._cols: list[torch.Tensor] = []

    def add(self, grad: torch.Tensor, weight: torch.Tensor) -> None:
        g = grad.detach().float()
        self.square_sum += g.square()
        self.count += 1
        term = g * weight.detach().float()
        self._rows.append(_per_slice(term, 0))
        self._cols.append(_per_slice(term, 1))

    @property
    def fisher(self) -> torch.Tensor:
        """Diagonal of the empirical Fisher, mean over samples of g_n^2."""
        return self.square_sum / max(self.count, 1)

    def channel_terms(self, dim: int) -> torch.Tensor:
        """[samples, channels] of sum over the channel of g_n * W, for output (dim 0) or input (dim 1) channels."""
        return torch.stack(self._rows if dim == 0 else self._cols)


def per_sample_gradients(model, targets: Sequence, batches: list[dict], loss: Loss = model_loss,
                         limit: int | None = None, progress: bool = True) -> dict:
    """{target module: GradientStats} over every calibration sample (each its own forward and backward, so that
    each sample's gradient is squared on its own; a batched gradient would square the sum instead)."""
    weights = [t.module.weight for t in targets]
    stats = {t.module: GradientStats(t.weight) for t in targets}
    total = sum(len(next(iter(b.values()))) for b in batches)
    with grads_for(model, weights):
        for sample in tqdm(samples(batches, limit), total=min(total, limit or total), desc="per-sample gradients",
                           disable=not progress, unit="sample"):
            grads = torch.autograd.grad(loss(model, sample), weights)
            for t, g in zip(targets, grads):
                stats[t.module].add(g.t() if t.transposed else g, t.weight)  # as [out, in]
    return stats


class _FromGradients(Estimator):
    """Shared options and gathering of the estimators built on per-sample gradients of the loss."""

    needs = Needs.GRADIENTS

    def __init__(self, samples: int | None = None, loss: Loss | None = None):
        if samples is not None and samples < 1:
            raise ValueError(f"samples must be >= 1 (or None for all), got {samples}")
        self.samples, self.loss = samples, loss or model_loss

    def gather(self, model, targets, batches, progress=True) -> dict:
        return per_sample_gradients(model, targets, batches, self.loss, self.samples, progress)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(samples={self.samples})"


@ESTIMATORS.register("fisher")
class Fisher(_FromGradients):
    """Optimal Brain Damage with the empirical Fisher: S_ij = w_ij^2 F_ii / 2, F the diagonal of the mean over
    samples of g_n g_n^T (LeCun, Denker, Solla, "Optimal Brain Damage", NeurIPS 1989; the Fisher as Hessian
    approximation as in Theis et al., "Faster gaze prediction with dense networks and Fisher pruning", 2018).

    Needs labels or a loss: the batch's labels, next tokens for a causal LM, or loss=fn(model, batch). Each sample's
    gradient comes from its own backward and every sample is accumulated. Layer score: the layer's summed saliency.
    """

    def scores(self, weight, stats: GradientStats) -> torch.Tensor:
        return weight.square() * stats.fisher / 2

    def layer_score(self, weight, stats: GradientStats) -> float:
        return float(self.scores(weight, stats).sum())


@ESTIMATORS.register("structural_hessian")
class StructuralHessian(_FromGradients):
    """NViT's Hessian-aware structural saliency (Yang, Yin, Shen, Molchanov, Li, Kautz, "Global Vision Transformer
    Pruning with Hessian-Aware Saliency", CVPR 2023).

    Removing structure S changes the loss by about g_S . dW + dW^T H dW / 2 with dW = -W_S; at a trained minimum
    the first term averages out, and with the Fisher E[g g^T] for H the change is I_S = E_n[(sum_{s in S} g_ns
    w_s)^2] / 2: each sample's gradient-times-weight summed over the structure, squared, averaged over samples. It is
    in units of loss, so it is comparable across layers and across structures of any size (channels, heads, a
    head across q, k, v and o: see `structure_saliency`).

    latency: optional fn(weight, size, dim) -> seconds saved by removing each group; with it a group scores
    I_S - eta * latency (NViT's latency-aware regularisation: cheaper-to-keep groups go first otherwise). Per
    weight, S = {w} gives w^2 F_ii / 2 (as Fisher); the layer score is the mean channel saliency.
    """

    def __init__(self, samples: int | None = None, loss: Loss | None = None,
                 latency: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None, eta: float = 0.0):
        super().__init__(samples, loss)
        self.latency, self.eta = latency, eta

    def scores(self, weight, stats: GradientStats) -> torch.Tensor:
        return weight.square() * stats.fisher / 2

    def group_scores(self, weight, stats: GradientStats, size=1, dim=0):
        saliency = structure_saliency([(stats, size, dim)])
        if self.latency is not None:
            saliency = saliency - self.eta * torch.as_tensor(self.latency(weight, size, dim), dtype=saliency.dtype)
        return saliency

    def structure_scores(self, parts, count: int) -> torch.Tensor:
        """I_S with S spanning every part: per sample the parts' sums of g * w are added per structure, then
        squared (the latency term, when given, is subtracted per part)."""
        total = None
        for part in parts:
            terms = part.stats.channel_terms(part.dim)
            grouped = part.pick(terms.view(terms.shape[0], -1, part.size).sum(2).t()).t()  # [samples, slices]
            if total is None:
                total = torch.zeros(terms.shape[0], count, dtype=torch.float64)
            total.index_add_(1, part.items.cpu(), grouped.double().cpu())
        saliency = total.square().mean(0) / 2
        if self.latency is not None:
            for part in parts:
                cost = torch.as_tensor(self.latency(part.weight, part.size, part.dim), dtype=torch.float64)
                saliency.index_add_(0, part.items.cpu(), -self.eta * part.pick(cost))
        return saliency

    def layer_score(self, weight, stats: GradientStats) -> float:
        return float(self.group_scores(weight, stats).mean())


def structure_saliency(parts: Sequence[tuple[GradientStats, int, int]]) -> torch.Tensor:
    """NViT saliency of structures spanning several layers: parts are (stats, size, dim), each cutting its layer's
    channels along dim into groups of `size`, group j of every part belonging to structure j (a head: its rows of
    q, k and v, dim 0, and its columns of o, dim 1, all with size head_dim). Per sample the terms are summed over
    all parts before squaring."""
    total = None
    for stats, size, dim in parts:
        terms = stats.channel_terms(dim)
        grouped = terms.view(terms.shape[0], -1, size).sum(2)
        if total is not None and grouped.shape != total.shape:
            raise ValueError(f"parts cut into different numbers of structures: {total.shape[1]} and {grouped.shape[1]}")
        total = grouped if total is None else total + grouped
    return total.square().mean(0) / 2


class HutchinsonStats:
    """Per layer, Hutchinson estimates from probes v: v . Hv (its trace) and v * Hv (its diagonal)."""

    def __init__(self, weight: torch.Tensor):
        self.trace, self.diagonal, self.count = 0.0, torch.zeros_like(weight, dtype=torch.float32), 0


@ESTIMATORS.register("hutchinson")
class Hutchinson(Estimator):
    """Hessian-trace sensitivity per layer, by Hutchinson's estimator tr(H) = E[v^T H v] with Rademacher v
    (Hutchinson 1990; per layer for allocation as in HAWQ-V2, Dong et al., NeurIPS 2020).

    H is the Hessian of the mean loss over the calibration samples. Each probe draws, per sample, one v over every
    target at once and takes one Hessian-vector product (a double backward) of that sample's loss; v_l . (Hv)_l is
    unbiased for each layer's own trace, cross-layer terms averaging out, and samples one at a time keep memory at
    one sample's double-backward graph. Layer score: the mean curvature tr(H_l) / n_l. Per weight: the Hutchinson
    diagonal v * Hv (unbiased for H_ii) in the OBD saliency w^2 H_ii / 2. Each product's variance is
    2 (||H_ll||_F^2 - sum diag^2) plus the cross-layer ||H_l,other||_F^2, so the error falls as
    1 / sqrt(probes * samples).
    """

    needs = Needs.GRADIENTS

    def __init__(self, probes: int = 1, samples: int | None = None, seed: int = 0, loss: Loss | None = None):
        if probes < 1 or (samples is not None and samples < 1):
            raise ValueError(f"need probes >= 1 and samples >= 1 (or None for all); got {probes}, {samples}")
        self.probes, self.samples, self.seed, self.loss = probes, samples, seed, loss or model_loss

    def gather(self, model, targets, batches, progress=True) -> dict:
        weights = [t.module.weight for t in targets]
        stats = {t.module: HutchinsonStats(t.weight) for t in targets}
        generator = torch.Generator(device=weights[0].device).manual_seed(self.seed)
        total = sum(len(next(iter(b.values()))) for b in batches)
        steps = self.probes * min(total, self.samples or total)
        # fused attention kernels have no double backward; the math kernel computes the same attention
        with grads_for(model, weights), sdpa_kernel(SDPBackend.MATH), \
                tqdm(total=steps, desc=self.name, disable=not progress, unit="product") as bar:
            for _ in range(self.probes):
                for sample in samples(batches, self.samples):
                    vs = [torch.randint(0, 2, w.shape, generator=generator, device=w.device).to(w.dtype) * 2 - 1
                          for w in weights]
                    grads = torch.autograd.grad(self.loss(model, sample), weights, create_graph=True)
                    hvs = torch.autograd.grad(grads, weights, grad_outputs=vs)
                    for t, v, hv in zip(targets, vs, hvs):
                        st, vhv = stats[t.module], (v * hv).detach().float()
                        st.trace += float(vhv.sum())
                        st.diagonal += vhv.t() if t.transposed else vhv  # as [out, in]
                        st.count += 1
                    bar.update()
        for st in stats.values():
            st.trace /= st.count
            st.diagonal /= st.count
        return stats

    def scores(self, weight, stats: HutchinsonStats) -> torch.Tensor:
        return weight.square() * stats.diagonal / 2

    def layer_score(self, weight, stats: HutchinsonStats) -> float:
        return stats.trace / weight.numel()

    def __repr__(self) -> str:
        return f"Hutchinson(probes={self.probes}, samples={self.samples}, seed={self.seed})"
