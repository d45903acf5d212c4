"""Layer-wise reconstruction maths shared by ADMM and DSnoT, on a layer's Hessian H = X Xᵀ (rows of W independent):
the error ||W₀ X − Ŵ X||², the least-squares refit of the kept weights on a fixed support, and DSnoT's
prune-and-grow swaps. Pure functions of tensors."""
from __future__ import annotations

import torch

_INF = float("inf")


def curvature(hessian: torch.Tensor) -> torch.Tensor:
    """H with unit curvature on inputs never active in calibration (as SparseGPT): their weights cost nothing, and a
    zero diagonal would stall the solvers."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    return h


def reconstruction_error(w0: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """Σ_rows (w₀ − ŵ)ᵀ H (w₀ − ŵ): ||W₀ X − Ŵ X||² for H = X Xᵀ. The product in float32, its sum in float64 (a
    float64 product took twice the time and moved the candidates' errors by < 1e-6 of their size)."""
    d = (w0 - w).float()
    return float(((d @ h.float()) * d).double().sum())


def refit_on_support(w0: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, start: torch.Tensor,
                     iterations: int, rtol: float = 1e-6) -> torch.Tensor:
    """The least-squares weights on each row's support, H_SS ŵ_S = (H w₀)_S, by conjugate gradients preconditioned
    with diag(H), every row at once, from `start` (zero outside the support). Each step lowers every row's error
    by exactly α rᵀz (the error is twice CG's quadratic plus a constant), so the steps stop once one lowers the
    layer's error by less than `rtol` of what is left, or after `iterations`."""
    mask = keep.to(w0.dtype)
    x = start * mask
    w0h, xh = w0 @ h, x @ h
    b = w0h * mask
    r = b - xh * mask
    inverse_diag = mask / torch.diagonal(h).unsqueeze(0)
    z = r * inverse_diag
    p = z.clone()
    rz = (r * z).sum(1)
    left = float(((w0 - x) * (w0h - xh)).double().sum())  # reconstruction_error from the products above
    for _ in range(iterations):
        ap = (p @ h) * mask
        alpha = rz / (p * ap).sum(1).clamp_min(1e-30)
        x += alpha.unsqueeze(1) * p
        gain = float((alpha * rz).sum())
        left -= gain
        if gain <= rtol * max(left, 0.0):
            break
        r -= alpha.unsqueeze(1) * ap
        z = r * inverse_diag
        new = (r * z).sum(1)
        p = z + (new / rz.clamp_min(1e-30)).unsqueeze(1) * p
        rz = new
    return x * mask


def swap(w0: torch.Tensor, h: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, nm, cycles: int):
    """Greedy prune-and-grow swaps, every row at once, while a swap lowers the row's error; returns (Ŵ, keep).

    With d = w₀ − ŵ and g = H d per row: growing j (ŵ_j = w₀_j) changes the error by −2 d_j g_j + d_j² H_jj;
    pruning i after it by 2 ŵ_i g_i + ŵ_i² H_ii − 2 d_j ŵ_i H_ij."""
    w, keep = w.clone(), keep.clone()
    rows = torch.arange(w.shape[0], device=w.device)
    diag = torch.diagonal(h).unsqueeze(0)
    d = w0 - w
    g = d @ h
    group = torch.arange(w.shape[1], device=w.device) // (nm[1] if nm is not None else w.shape[1])
    for _ in range(cycles):
        grow = torch.where(keep, _INF, -2 * d * g + d.square() * diag)
        j = grow.argmin(1)
        dj = d[rows, j].unsqueeze(1)
        cut = 2 * w * g + w.square() * diag - 2 * dj * w * h[j]
        allowed = keep & (group.unsqueeze(0) == group[j].unsqueeze(1))
        cut = torch.where(allowed, cut, _INF)
        i = cut.argmin(1)
        gain = grow[rows, j] + cut[rows, i]
        better = gain < -1e-12 * (d.square() * diag).sum(1).clamp_min(1e-30)
        if not bool(better.any()):
            break
        r, i, j = rows[better], i[better], j[better]
        wi, dj = w[r, i], d[r, j]
        g[r] += -dj.unsqueeze(1) * h[j] + wi.unsqueeze(1) * h[i]
        d[r, j], d[r, i] = 0.0, d[r, i] + wi
        w[r, j], w[r, i] = w0[r, j], 0.0
        keep[r, j], keep[r, i] = True, False
    return w, keep
