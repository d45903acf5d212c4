"""Errors prunekit raises for bad input. All are ValueErrors, raised before any weight changes."""


class PrunekitError(ValueError):
    """Base class: something about the input cannot work; the message says what and how to fix it."""


class BudgetError(PrunekitError):
    """The budget is malformed or no allocation can meet it."""


class CalibrationError(PrunekitError):
    """Calibration data is missing, of the wrong type or shape, or holds NaN/Inf."""


class TargetError(PrunekitError):
    """The model has nothing to prune, or a requested layer cannot be pruned."""


class MaskMismatchError(PrunekitError):
    """Saved masks do not fit the weights they belong to."""
