"""Sparse fine-tuning: LIFT, S2FT, IST and SPT behind one `prepare(model, method, **options)` (or
`prepare(model, config)` with a method's config dataclass)."""
# Each file registers its method (one import line per method).
from . import ist, lift, s2ft, spt  # noqa: E402,F401
from .base import TUNERS, Method, prepare
from .config import Config
from .deltas import load_deltas, save_deltas
from .ist import ISTConfig
from .lift import LIFTConfig
from .s2ft import S2FTConfig
from .spt import SPTConfig

__all__ = ["TUNERS", "Method", "prepare", "save_deltas", "load_deltas", "Config", "LIFTConfig", "S2FTConfig",
           "ISTConfig", "SPTConfig"]
