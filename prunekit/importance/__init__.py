"""Importance estimators, by name: `prunekit.importance.ESTIMATORS.names()` lists them."""
from . import admm, beta_rank, dsnot, hessian, lrp, magnitude, mask_sparsity, sparsegpt, wanda, zeroth_order  # noqa: F401  (each file registers its estimator)
from .base import ESTIMATORS, Estimator, Scores

__all__ = ["ESTIMATORS", "Estimator", "Scores"]
