"""Importance estimators, by name: `prunekit.importance.ESTIMATORS.names()` lists them."""
from ..registry import Registry
from .base import Estimator, Scores

ESTIMATORS: Registry[Estimator] = Registry("importance")

from . import hessian, magnitude, sparsegpt, wanda, zeroth_order  # noqa: E402,F401  (each file registers its estimator)

__all__ = ["ESTIMATORS", "Estimator", "Scores"]
