"""Sparse fine-tuning: LIFT, S2FT, IST and SPT behind one `prepare(model, method, **options)`."""
# Each file registers its method (one import line per method).
from . import ist, lift, s2ft, spt  # noqa: E402,F401
from .base import TUNERS, Method, load_deltas, prepare, save_deltas

__all__ = ["TUNERS", "Method", "prepare", "save_deltas", "load_deltas"]
