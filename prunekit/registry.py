"""A name -> class registry, so that adding a method is one file plus one decorator."""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import PrunekitError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type):
        self.kind, self.base = kind, base  # what an instance given in place of a name must be
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            if name in self._items:
                raise RuntimeError(f"{self.kind} {name!r} is registered twice")
            cls.name = name
            self._items[name] = cls
            return cls

        return add

    def names(self) -> list[str]:
        return sorted(self._items)

    def create(self, spec: str | T, **options) -> T:
        """An instance from a registered name (with options), or the instance itself if one is given."""
        if not isinstance(spec, str):
            if not isinstance(spec, self.base):
                raise PrunekitError(f"the {self.kind} must be a name ({', '.join(self.names())}) or an instance "
                                    f"of {self.base.__name__}, got {spec!r}")
            if options:
                raise PrunekitError(f"options {sorted(options)} only apply when the {self.kind} is given by name")
            return spec
        if spec not in self._items:
            raise PrunekitError(f"unknown {self.kind} {spec!r}; known: {', '.join(self.names())}")
        try:
            return self._items[spec](**options)
        except TypeError as e:
            raise PrunekitError(f"bad options for {self.kind} {spec!r}: {e}") from None
