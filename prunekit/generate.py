"""Greedy generation, timed: what `prunekit generate` prints and benchmarks/cpu_inference.py measures.

The prompt's forward pass (prefill) and each new token are timed apart (a streamer stamps every token as it
comes), after a warm-up that lets backend="auto" measure its paths once for the prompt's batch size and for one row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    tokens: torch.Tensor  # the new tokens [n]
    prompt_tokens: int
    prefill_seconds: float  # the prompt's forward pass, to the first new token
    decode_seconds: float  # every new token after the first
    resident_bytes: int  # the model's parameters and buffers

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed: new tokens after the first, per second."""
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_seconds:.2f} s; {len(self.tokens)} new "
                f"tokens at {self.tokens_per_second:.1f} tokens/s; weights resident {self.resident_bytes / 2**20:.1f}"
                f" MiB")


class _Stamps:
    """A generate() streamer that records when each batch of tokens arrives (the first is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if tensor.is_meta or key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, warm_up: bool = True) -> Generation:
    """Greedy decoding of exactly `max_new_tokens` after `input_ids` [1, n], timed."""
    if warm_up:  # the prompt's batch size and one row, measured by any auto dispatch before the clock starts
        _run(model, input_ids, 2, None)
    stamps = _Stamps()
    start = time.perf_counter()
    out = _run(model, input_ids, max_new_tokens, stamps)
    first, last = stamps.times[1], stamps.times[-1]  # [0] is the prompt, put before the forward pass
    return Generation(out[0, input_ids.shape[1]:], input_ids.shape[1], first - start, last - first,
                      resident_bytes(model))


def _run(model: nn.Module, input_ids: torch.Tensor, n: int, streamer) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, streamer=streamer,
                              pad_token_id=getattr(model.generation_config, "eos_token_id", None))
