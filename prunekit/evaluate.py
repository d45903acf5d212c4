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
