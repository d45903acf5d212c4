"""Importance estimators, by name: `prunekit.importance.ESTIMATORS.names()` lists them."""
from ..registry import Registry
from .base import Estimator, Scores

ESTIMATORS: Registry[Estimator] = Registry("importance", Estimator)

# Each file registers its estimator.
from . import admm, beta_rank, dsnot, hessian, lrp, magnitude, mask_sparsity, sparsegpt, wanda, zeroth_order  # noqa: E402,F401

__all__ = ["ESTIMATORS", "Estimator", "Scores"]
