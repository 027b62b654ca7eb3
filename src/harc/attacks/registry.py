"""Attacks registered by name; the built-in ones are imported on first lookup.

Importing the plugin modules lazily keeps `import harc` cheap and lets one broken optional plugin
(say GCG without its GPU stack) fail only when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

from harc.attacks.base import Attack
from harc.errors import HarcError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class, with the plugin modules that register the built-ins."""

    def __init__(self, kind: str, base: type, modules: list[str]):
        self.kind, self.base, self.modules = kind, base, modules
        self._items: dict[str, type] = {}
        self._loaded = False

    def register(self, cls: type[T]) -> type[T]:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"register_{self.kind} needs a {self.base.__name__} subclass")
        name = getattr(cls, "name", "")
        if not name:
            raise TypeError(f"{cls.__qualname__} must set a class attribute `name`")
        old = self._items.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise HarcError(f"{self.kind} name {name!r} is already taken by {old.__qualname__}")
        self._items[name] = cls
        return cls

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for m in self.modules:
                importlib.import_module(m)

    def cls(self, name: str) -> type[T]:
        self._load()
        if name not in self._items:
            raise HarcError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def get(self, name: str, **params: Any) -> T:
        return self.cls(name)(**params)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)


_BUILTINS = ["direct", "templates", "deep_inception", "code_attack", "pap", "pair", "prefill",
             "ablation", "gcg", "taxonomy"]
ATTACKS: Registry[Attack] = Registry("attack", Attack, [f"harc.attacks.{m}" for m in _BUILTINS])


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make an `Attack` subclass available to `get_attack(cls.name)`."""
    return ATTACKS.register(cls)


def get_attack(name: str, **params: Any) -> Attack:
    """A configured attack; unknown names and unknown or ill-typed options raise `HarcError`."""
    return ATTACKS.get(name, **params)


def list_attacks() -> list[str]:
    return ATTACKS.names()
