"""Where a block's weights are while the runner works on it: the one hook by which a model that keeps its blocks
elsewhere (prunekit.offload keeps them on disk) takes part in the block-by-block pass, so that the runner knows
nothing of how.

Such a model carries a Residency (`install`); the runner enters `capturing()` around its capture pass, in which the
blocks' forwards are replaced by recorders that need no weights, and `resident(block)` around each block's step.
Every other model gets the default, whose contexts do nothing.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

from torch import nn

ATTR = "_prunekit_residency"


class Residency:
    """Blocks held in memory all along: nothing to load or release. Subclasses say how theirs come and go."""

    def capturing(self) -> ContextManager:
        """Context: the runner's capture pass, whose recorders replace every block's forward."""
        return contextlib.nullcontext()

    def resident(self, block: nn.Module) -> ContextManager:
        """Context: `block`'s weights are in memory inside."""
        return contextlib.nullcontext()


_IN_MEMORY = Residency()


def install(model: nn.Module, residency: Residency) -> None:
    model.__dict__[ATTR] = residency  # not a submodule or buffer: outside state_dict, untouched by .to()


def residency_of(model: nn.Module) -> Residency:
    return model.__dict__.get(ATTR, _IN_MEMORY)
