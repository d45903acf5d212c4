"""Each fine-tuning method's options as one dataclass, like peft's LoraConfig: checked in one place when it is
built, shown by its repr, saved as json beside the deltas and read back by `load_deltas`.

    config = LIFTConfig(rank=16)          # prepare(model, "lift", rank=16) builds the same config from keywords
    tuned = prepare(model, config)

Every field names a `Rule` (what its value must be), checked in `__post_init__`; a config's `validate` adds the
rules that span fields. Fields declared with `saved=False` are inputs of one run (batches, functions, a progress
flag): left out of the repr and the json.

Batches (IST's suppression batches, SPT's sensitivity batches) follow one rule: an iterable of batches, such as a
list or a DataLoader. A single batch is refused rather than guessed at, since a dict is itself iterable (over its
keys) and a tensor over its rows: wrap it in a list.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch

from ..errors import PrunekitError


@dataclass(frozen=True)
class Rule:
    """What an option's value must be: a test, and the words that say it in the error after the option's name."""

    test: Callable[[Any], bool]
    says: str
    show: Callable[[Any], str] = repr  # how the error shows a value that fails

    def check(self, owner: str, name: str, value) -> None:
        if not self.test(value):
            raise PrunekitError(f"{owner}'s {name} {self.says}, got {self.show(value)}")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def number(test: Callable[[float], bool], says: str) -> Rule:
    """A finite real number (not a bool) that passes `test`."""
    return Rule(lambda v: _real(v) and test(v), says)


def integer(low: int | None = None, note: str = "") -> Rule:
    """An integer (not a bool), at least `low` when given."""
    if low is None:
        return Rule(_int, f"must be an integer{note}")
    return Rule(lambda v: _int(v) and v >= low, f"must be an integer >= {low}{note}")


def optional(rule: Rule, says: str | None = None) -> Rule:
    """None, or a value the rule accepts."""
    return Rule(lambda v: v is None or rule.test(v), says or f"{rule.says}, or None", rule.show)


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"must be one of {', '.join(choices)}")


def _regex(value) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError):
        return False
    return isinstance(value, str)


FLAG = Rule(lambda v: isinstance(v, bool), "must be True or False")
PATTERN = optional(Rule(_regex, "must be a regular expression over module names"))
LOSS_FN = optional(Rule(callable, "must be a function (outputs, batch) -> loss"))
_BATCHES = "must be an iterable of batches (a list or a DataLoader); wrap a single batch in a list"
BATCHES = optional(Rule(lambda v: isinstance(v, Iterable) and not isinstance(v, (Mapping, torch.Tensor, str)),
                        _BATCHES, lambda v: type(v).__name__), _BATCHES)


def option(default=None, rule: Rule | None = None, *, saved: bool = True) -> Any:
    """A config field: its default and its rule; saved=False for an input of one run (not in repr or json)."""
    return field(default=default, repr=saved, compare=saved, metadata={"rule": rule, "saved": saved})


CONFIGS: dict[str, type[Config]] = {}  # method name -> its config class


@dataclass
class Config:
    """The options of one fine-tuning method (subclasses: one per method, with `method` its registered name)."""

    method: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CONFIGS[cls.method] = cls

    def __post_init__(self):
        for f in fields(self):
            rule = f.metadata.get("rule")
            if rule is not None:
                rule.check(self.label(), f.name, getattr(self, f.name))
        self.validate()

    @classmethod
    def label(cls) -> str:
        """The method as errors name it: LIFT, S2FT, IST, SPT."""
        return cls.method.upper()

    def validate(self) -> None:
        """Rules that span fields; none unless a method adds them."""

    def to_dict(self) -> dict:
        """The saved options (json-ready): every field but the inputs of one run."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["saved"]}

    @classmethod
    def from_dict(cls, options: dict) -> Config:
        """The config `to_dict` wrote, checked again."""
        saved = {f.name for f in fields(cls) if f.metadata["saved"]}
        unknown = sorted(set(options) - saved)
        if unknown:
            raise PrunekitError(f"saved {cls.label()} options {unknown} are not options of {cls.__name__} "
                                f"({', '.join(sorted(saved))}); were they saved by another prunekit version?")
        return cls(**options)
