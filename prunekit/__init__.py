"""prunekit: prune PyTorch models to a budget, run them fast, fine-tune them cheaply."""
from .api import prune, score
from .budget import Budget
from .errors import BudgetError, CalibrationError, MaskMismatchError, PrunekitError, TargetError
from .io import load_pruned, save_pruned
from .masks import masks, pruned_nonzero, remove_masks
from .offload import load_offloaded
from .report import LayerRow, PruneReport
from .version import __version__


def __getattr__(name):
    # prunekit.tuning loads on first use: it imports peft, which prune() users need not pay for; kernels and
    # structured (Torch-Pruning) likewise.
    if name in ("tuning", "kernels", "structured"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "prune", "score", "Budget", "PruneReport", "LayerRow", "save_pruned", "load_pruned",
           "load_offloaded", "masks", "pruned_nonzero", "remove_masks", "PrunekitError", "BudgetError",
           "CalibrationError", "TargetError", "MaskMismatchError"]
