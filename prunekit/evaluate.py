"""Perplexity of a causal LM over token windows, as PROTOCOL.md measures it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibration.runner import evaluating, model_device


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over every predicted token of the [N, L] windows, computed in float32."""
    total, count = 0.0, 0
    device = model_device(model)
    with evaluating(model):
        for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           reduction="sum"))
            count += targets.numel()
    return math.exp(total / count)
