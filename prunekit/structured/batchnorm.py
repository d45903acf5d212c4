"""Batch-norm recalibration after structured pruning.

Removing channels upstream of a BatchNorm changes the distribution of what it normalises, but its running mean and
variance still describe the dense model's; a convolutional network can lose most of its accuracy to that alone.
Re-estimating them on calibration data (as for SWA, Izmailov et al. 2018, or after pruning, e.g. Li et al.,
"EagleEye", ECCV 2020) is forward-only and costs one pass.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.runner import call_model

NORMS = nn.modules.batchnorm._BatchNorm


def batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, NORMS) and m.track_running_stats]


def recalibrate(model: nn.Module, batches: list[dict], progress: bool = False) -> int:
    """Replaces every BatchNorm's running statistics by the average of its per-batch statistics over `batches`
    (PyTorch's cumulative average: each batch weighted alike), the rest of the model in eval mode (dropout off);
    restores train flags and momenta. Returns how many BatchNorms were recalibrated."""
    norms = batch_norms(model)
    if not norms:
        return 0
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average instead of an exponential one
            m.train()
        with torch.no_grad():
            for batch in tqdm(batches, desc="batch-norm statistics", unit="batch", disable=not progress):
                call_model(model, batch)
    finally:
        for m, training in flags.items():
            m.training = training
        for m, momentum in momenta.items():
            m.momentum = momentum
    return len(norms)
