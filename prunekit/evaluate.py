"""Perplexity of a causal LM over token windows, as docs/protocol.md measures it; sentence-embedding recall; a pruned
classifier's agreement with its dense self."""
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


def sentence_embeddings(model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 64,
                        max_length: int = 128) -> torch.Tensor:
    """L2-normalised mean of the last hidden states over real tokens (sentence-transformers' pooling for
    all-MiniLM-L6-v2), at most `max_length` tokens per sentence."""
    out = []
    device = model_device(model)
    with evaluating(model):
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def recall_at_1(queries: torch.Tensor, documents: torch.Tensor) -> float:
    """Fraction of queries whose most similar document (cosine, unit vectors) is their own (same index)."""
    best = (queries @ documents.t()).argmax(1)
    return float((best == torch.arange(len(queries), device=best.device)).float().mean())


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """model(images) in eval mode, in batches, as float32 on the CPU."""
    with evaluating(model):
        device = model_device(model)
        return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                          for i in range(0, len(images), batch_size)])


def agreement(reference: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """How far a pruned classifier's [N, classes] logits are from its dense (reference) self's on the same inputs:
    top-1 agreement (the share of inputs with the same top class), top-5 overlap (the mean share of the reference's
    five best classes among the pruned model's five best) and the mean KL divergence KL(reference || pruned) of
    the softmax distributions, in nats."""
    if reference.shape != pruned.shape or reference.dim() != 2:
        raise ValueError(f"agreement takes two [N, classes] logit tensors of one shape; got {tuple(reference.shape)} "
                         f"and {tuple(pruned.shape)}")
    top1 = (reference.argmax(1) == pruned.argmax(1)).float().mean()
    ref5, pruned5 = reference.topk(5, dim=1).indices, pruned.topk(5, dim=1).indices
    top5 = (ref5[:, :, None] == pruned5[:, None, :]).any(2).float().mean()
    log_p, log_q = F.log_softmax(reference.double(), 1), F.log_softmax(pruned.double(), 1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    return {"top1_agreement": float(top1), "top5_overlap": float(top5), "kl": float(kl)}
