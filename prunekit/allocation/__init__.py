"""Allocators, by name: `prunekit.allocation.ALLOCATORS.names()` lists them."""
from . import dp, ecoflap, global_rank, owl, uniform  # noqa: F401  (each file registers its allocator)
from .base import ALLOCATORS, Allocator, exact_counts, fit_to_budget

__all__ = ["ALLOCATORS", "Allocator", "exact_counts", "fit_to_budget"]
