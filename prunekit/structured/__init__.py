"""Structured pruning: removes whole attention heads, MLP channels and conv filters, so the pruned model is a smaller
model of its own class (prunekit.prune with Budget(granularity="structured")).

Torch-Pruning's dependency graph keeps coupled layers consistent; importance comes from prunekit's estimators
(EstimatorImportance adapts any of them to Torch-Pruning's Importance protocol), per-structure amounts from
prunekit's allocators. Custom layers: register_pruner; custom attention classes: register_attention.
"""
from .attention import Heads, register_attention
from .graph import register_pruner
from .importance import EstimatorImportance
from .pipeline import prune_structured

__all__ = ["EstimatorImportance", "Heads", "prune_structured", "register_attention", "register_pruner"]
