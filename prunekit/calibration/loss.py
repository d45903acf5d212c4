"""The model's loss on a calibration batch, and gradients of it with respect to chosen weights only."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Callable

import torch
from torch import nn

from ..errors import CalibrationError
from .runner import call_model

Loss = Callable[[nn.Module, dict], torch.Tensor]


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own loss: with the batch's labels, or next-token labels for a causal LM (padding ignored)."""
    if "labels" not in batch and "input_ids" in batch:
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        batch = {**batch, "labels": labels}
    try:
        out = call_model(model, batch, labels=True)
    except TypeError as e:
        raise CalibrationError(f"cannot get a loss from {type(model).__name__} ({e}); pass loss=fn, "
                               f"fn(model, batch) -> scalar tensor") from None
    loss = getattr(out, "loss", None)
    if loss is None:
        raise CalibrationError(f"{type(model).__name__} returns no loss for these inputs; give calibration batches "
                               f"with labels, or loss=fn, fn(model, batch) -> scalar tensor")
    return loss


@contextlib.contextmanager
def grads_for(model: nn.Module, weights: Sequence[torch.Tensor]):
    """Gradients enabled for `weights` only, the model in eval mode (no dropout: scores should not depend on a
    random mask); requires_grad flags and the training flag restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        model.eval()
        with torch.enable_grad():  # prune() measures under no_grad
            yield
    finally:
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def samples(batches: Sequence[dict], limit: int | None = None) -> Iterator[dict]:
    """The calibration samples one at a time (each a batch of one), at most `limit` of them."""
    seen = 0
    for batch in batches:
        for i in range(len(next(iter(batch.values())))):
            if limit is not None and seen >= limit:
                return
            yield {k: v[i:i + 1] for k, v in batch.items()}
            seen += 1
