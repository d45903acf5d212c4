"""Allocators, by name: `prunekit.allocation.ALLOCATORS.names()` lists them."""
from ..registry import Registry
from .base import Allocator, exact_counts, fit_to_budget

ALLOCATORS: Registry[Allocator] = Registry("allocator", Allocator)

from . import dp, ecoflap, global_rank, owl, uniform  # noqa: E402,F401  (each file registers its allocator)

__all__ = ["ALLOCATORS", "Allocator", "exact_counts", "fit_to_budget"]
