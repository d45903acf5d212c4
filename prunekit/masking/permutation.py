"""Input-channel permutations that let an N:M mask keep more importance.

An N:M mask keeps the N best of every M consecutive inputs of a row, so which inputs share a group decides what can
be kept: two important channels side by side compete for the same N places. Reordering the inputs (and whatever
produces them, so that the layer computes the same function) before choosing the groups moves such channels apart.
Following RIA (Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language Models",
ICLR 2024, section 3.3): channels sorted by their summed importance are dealt to the groups in a snake order, so
that every group gets one of each quantile; then, one position of the groups at a time, the channels at that
position are reassigned to the groups by a balanced assignment (scipy's linear_sum_assignment) that maximises the
importance every group keeps. An assignment can always keep the current order, so no step loses importance.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from .nm import check_nm, nm_mask

MAX_GROUPS = 256  # groups one assignment problem spans: its cost matrix is groups^2 x rows
MAX_ROUNDS = 3  # passes over the M positions; each pass keeps at least as much, most gain is in the first


def kept(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score an N:M mask keeps of [rows, cols] scores in their current column order."""
    return float((scores * nm_mask(scores, n, m)).sum())


def snake(scores: torch.Tensor, m: int) -> torch.Tensor:
    """RIA's channel allocation: columns sorted by summed score, the i-th M-th of them to position i of every group,
    every other position in reverse, so that each group holds one column from each quantile."""
    cols = scores.shape[1]
    order = torch.argsort(scores.sum(0), stable=True)
    perm = torch.empty_like(order)
    size = cols // m
    for position in range(m):
        part = order[position * size:(position + 1) * size]
        perm[position::m] = part if position % 2 == 0 else part.flip(0)
    return perm


def _gains(scores: torch.Tensor, n: int, m: int, position: int) -> torch.Tensor:
    """[candidate, group]: what group keeps when the column now at `position` of `candidate`'s group is put there.

    With the group's other M-1 scores of a row sorted s_1 >= s_2 >= ..., adding v keeps s_1 + ... + s_(N-1) +
    max(v, s_N) (v displaces s_N only if larger), so the gain is a sum over rows of an elementwise maximum."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    others = torch.cat([groups[:, :, :position], groups[:, :, position + 1:]], dim=2).sort(dim=2, descending=True)[0]
    fixed = others[:, :, :n - 1].sum((0, 2))  # [group]
    floor = others[:, :, n - 1]  # [rows, group]: s_N
    moving = groups[:, :, position]  # [rows, candidate]
    gains = torch.empty(cols // m, cols // m, dtype=scores.dtype)
    step = max(1, 2 ** 24 // max(1, rows * (cols // m)))  # candidates per slice: about 64 MB of float32
    for c in range(0, cols // m, step):
        gains[c:c + step] = torch.maximum(moving[:, c:c + step, None], floor[:, None, :]).sum(0)
    return gains + fixed[None, :]


def refine(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int, rounds: int = MAX_ROUNDS,
           max_groups: int = MAX_GROUPS) -> torch.Tensor:
    """perm improved by balanced reassignments, position by position, within spans of at most `max_groups` groups."""
    perm = perm.clone()
    groups = scores.shape[1] // m
    spans = [(g, min(groups, g + max_groups)) for g in range(0, groups, max_groups)]
    for _ in range(rounds):
        before = kept(scores[:, perm], n, m)
        for g0, g1 in spans:
            cols = perm[g0 * m:g1 * m]
            for position in range(m):
                gains = _gains(scores[:, cols].double(), n, m, position).numpy()
                _, where = linear_sum_assignment(gains, maximize=True)  # candidate i goes to group where[i]
                moved = cols[position::m].clone()
                cols[position + m * torch.from_numpy(where)] = moved
            perm[g0 * m:g1 * m] = cols
        if kept(scores[:, perm], n, m) <= before * (1 + 1e-9):
            break
    return perm


def nm_permutation(scores: torch.Tensor, n: int, m: int, rounds: int = MAX_ROUNDS,
                   max_groups: int = MAX_GROUPS) -> torch.Tensor:
    """A column order (a permutation of range(cols)) for [rows, cols] non-negative scores under which an N:M mask
    keeps at least as much score as in the given order, usually more: the better of the given order and RIA's
    snake allocation, refined by balanced assignments."""
    check_nm(scores.shape[1], n, m)
    if not torch.isfinite(scores).all() or (scores < 0).any():
        raise ValueError("permutation scores must be finite and non-negative")
    scores = scores.detach().float().cpu()
    identity = torch.arange(scores.shape[1])
    start = snake(scores, m)
    if kept(scores[:, start], n, m) < kept(scores, n, m):
        start = identity
    return refine(scores, start, n, m, rounds, max_groups)
