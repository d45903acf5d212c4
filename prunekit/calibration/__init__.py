"""Calibration: validated input batches, the block-by-block runner and layer statistics."""
from .inputs import as_batches
from .runner import sequential
from .stats import LayerStats, Needs

__all__ = ["as_batches", "sequential", "LayerStats", "Needs"]
