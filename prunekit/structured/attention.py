"""Attention layouts: where the heads of an attention module live in its projections, and how to remove some.

Torch-Pruning's dependency graph couples q, k, v and o channel by channel, but it cannot tell a head from a
channel, and on rotary decoder attention (Llama, Qwen2) its search through the slices and concatenations of
the rotary embedding never finishes. So heads are found here, from the module's own layout, and removed with
Torch-Pruning's per-layer prune functions; everything else goes through the graph.

A layout is a function module -> Heads | None; register_attention adds one for a custom attention class.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch_pruning as tp
from torch import nn


@dataclass(eq=False)
class Heads:
    """One attention module's projections. q, k, v produce [heads * head_dim] rows each (rows of `qkv`, in
    q, k, v order, when fused); o reads [heads * head_dim] columns. Query head h reads KV head h // (heads / kv)
    (grouped-query attention, as Hugging Face's repeat_kv lays them out)."""

    module: nn.Module
    o: nn.Linear
    heads: int
    kv_heads: int
    head_dim: int
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv: nn.Linear | None = None  # fused q, k, v (timm)
    extra_rows: list = field(default_factory=list)  # layers with one row per query channel (timm's gate, norm)
    update: Callable[["Heads"], None] = lambda heads: None  # writes the new head counts into the module
    config_keys: tuple[str, ...] = ()  # config fields that hold the head counts ("" when none can)
    why_no_config: str = ""  # when the config cannot say the pruned head count, why

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def query_rows(self) -> list[tuple[nn.Linear, int]]:
        """(layer, row offset) of the query rows: [h * head_dim, (h+1) * head_dim) + offset is head h."""
        return [(self.qkv, 0)] if self.qkv is not None else [(self.q, 0)]

    def kv_rows(self) -> list[tuple[nn.Linear, int]]:
        if self.qkv is not None:
            width = self.kv_heads * self.head_dim
            return [(self.qkv, self.heads * self.head_dim), (self.qkv, self.heads * self.head_dim + width)]
        return [(self.k, 0), (self.v, 0)]

    def projections(self) -> list[nn.Linear]:
        return [m for m in (self.q, self.k, self.v, self.qkv, self.o) if m is not None] + list(self.extra_rows)

    def remove(self, query_heads: list[int], kv_heads: list[int]) -> None:
        """Removes those query heads (rows of q, columns of o) and KV heads (rows of k and v); a KV head may go only
        with every query head that reads it, and every group must keep the same number of query heads."""
        d = self.head_dim
        rows = lambda heads, offset: [offset + h * d + i for h in heads for i in range(d)]  # noqa: E731
        q_rows = rows(query_heads, 0)
        fused_rows = []
        for layer, offset in self.query_rows():
            if layer is self.qkv:
                fused_rows += rows(query_heads, offset)
            elif q_rows:
                tp.prune_linear_out_channels(layer, q_rows)
        for layer, offset in self.kv_rows():
            if layer is self.qkv:
                fused_rows += rows(kv_heads, offset)
            elif kv_heads:
                tp.prune_linear_out_channels(layer, rows(kv_heads, 0))
        if fused_rows:
            tp.prune_linear_out_channels(self.qkv, fused_rows)
        for layer in self.extra_rows:
            _prune_rows(layer, q_rows)
        if q_rows:
            tp.prune_linear_in_channels(self.o, q_rows)
        self.heads -= len(query_heads)
        self.kv_heads -= len(kv_heads)
        self.update(self)


def _prune_rows(layer: nn.Module, rows: list[int]) -> None:
    if not rows:
        return
    if isinstance(layer, nn.Linear):
        tp.prune_linear_out_channels(layer, rows)
    elif isinstance(layer, nn.LayerNorm):
        tp.prune_layernorm_out_channels(layer, rows)


def _set(module: nn.Module, **values) -> None:
    """Sets the attributes the module already has (class versions differ in which they keep)."""
    for name, value in values.items():
        if hasattr(module, name):
            setattr(module, name, value)


def separate_projections(module: nn.Module) -> Heads | None:
    """Hugging Face decoder and ViT attention: q_proj, k_proj, v_proj, o_proj and a head_dim attribute (Llama,
    Mistral, Qwen2, ViT in transformers 5). The config's head_dim field is read by these classes, so the pruned
    head count fits in num_attention_heads / num_key_value_heads."""
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in names) or not hasattr(module, "head_dim"):
        return None
    d = int(module.head_dim)

    def update(h: Heads) -> None:
        _set(h.module, num_key_value_groups=h.group, num_heads=h.heads, num_attention_heads=h.heads,
             num_key_value_heads=h.kv_heads)

    return Heads(module, module.o_proj, module.q_proj.out_features // d, module.k_proj.out_features // d, d,
                 q=module.q_proj, k=module.k_proj, v=module.v_proj, update=update,
                 config_keys=("num_attention_heads", "num_key_value_heads", "head_dim"))


def bert_attention(module: nn.Module) -> Heads | None:
    """BERT-style attention (BERT, MiniLM, RoBERTa): `self` holds query, key, value, `output.dense` is the output
    projection. BertConfig derives the head size as hidden_size / num_attention_heads, so no config can describe
    fewer heads of the same size: a head-pruned BERT reloads through prunekit.load_pruned only."""
    inner, output = getattr(module, "self", None), getattr(module, "output", None)
    if inner is None or not all(isinstance(getattr(inner, n, None), nn.Linear) for n in ("query", "key", "value")):
        return None
    dense = getattr(output, "dense", None)
    d = getattr(inner, "attention_head_size", None)
    if not isinstance(dense, nn.Linear) or d is None:
        return None

    def update(h: Heads) -> None:
        _set(inner, num_attention_heads=h.heads, all_head_size=h.heads * h.head_dim)

    heads = inner.query.out_features // d
    return Heads(module, dense, heads, heads, int(d), q=inner.query, k=inner.key, v=inner.value, update=update,
                 why_no_config="its config derives the head size from hidden_size / num_attention_heads, so no "
                               "head count keeps the size")


def fused_qkv(module: nn.Module) -> Heads | None:
    """timm attention: one qkv Linear (rows: q, k, v, each heads x head_dim), proj, num_heads and head_dim
    attributes; an optional gate Linear and scale norm have one row per query channel."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not hasattr(module, "num_heads") \
            or not hasattr(module, "head_dim"):
        return None
    d, heads = int(module.head_dim), int(module.num_heads)
    if qkv.out_features != 3 * heads * d:
        return None
    extra = [m for m in (getattr(module, "gate", None), getattr(module, "norm", None))
             if isinstance(m, (nn.Linear, nn.LayerNorm))]

    def update(h: Heads) -> None:
        _set(h.module, num_heads=h.heads, attn_dim=h.heads * h.head_dim)

    return Heads(module, proj, heads, heads, d, qkv=qkv, extra_rows=extra, update=update,
                 why_no_config="timm models have no config to record the head count")


LAYOUTS: list[Callable[[nn.Module], Heads | None]] = [separate_projections, bert_attention, fused_qkv]


def register_attention(layout: Callable[[nn.Module], Heads | None]) -> None:
    """Adds a layout (module -> Heads, or None when the module is not one of its kind), tried before the built-in
    ones, for attention classes of your own."""
    LAYOUTS.insert(0, layout)


def find_attention(model: nn.Module) -> list[Heads]:
    """Every attention module of the model that a layout recognises, outermost first (a BERT attention and its
    `self` are one)."""
    found, taken = [], set()
    for module in model.modules():
        if module in taken:
            continue
        for layout in LAYOUTS:
            heads = layout(module)
            if heads is not None:
                found.append(heads)
                taken.update(heads.module.modules())
                break
    return found
