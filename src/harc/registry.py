"""The one plugin registry: attacks, judges, policy layers, training methods and datasets.

A registry maps names to plugins (classes, or instances such as dataset entries). Built-in plugins
are modules imported on the first lookup, which keeps `import harc` cheap and lets one broken
optional plugin fail only when it is asked for. Third-party packages add plugins without touching
harc through Python entry points in the registry's group (`harc.attacks`, `harc.judges`,
`harc.filters`, `harc.methods`, `harc.datasets`): an entry point may name a plugin class (or
dataset entry) or a module whose import registers its plugins.

    [project.entry-points."harc.attacks"]
    my_attack = "my_pkg.attacks:MyAttack"
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from harc.errors import HarcError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> plugin, with the built-in modules and the entry-point group that fill it."""

    def __init__(self, kind: str, base: type, *, builtins: Sequence[str] = (),
                 group: str | None = None, instances: bool = False,
                 unknown_hint: str = ""):
        self.kind, self.base, self.instances = kind, base, instances
        self.builtins, self.group, self.unknown_hint = list(builtins), group, unknown_hint
        self._items: dict[str, T] = {}
        self._loaded = False

    def register(self, item: T, *, name: str | None = None, replace: bool = False) -> T:
        """Add a plugin (usable as a class decorator); names are unique unless `replace`."""
        ok = isinstance(item, self.base) if self.instances else (
            isinstance(item, type) and issubclass(item, self.base))
        if not ok:
            raise TypeError(f"a {self.kind} plugin must be a {self.base.__name__}"
                            f"{'' if self.instances else ' subclass'}, got {item!r}")
        name = name or getattr(item, "name", "")
        if not name:
            raise TypeError(f"{item!r} must set a `name`")
        old = self._items.get(name)
        if old is not None and not replace and not self._same(old, item):
            raise HarcError(f"{self.kind} {name!r} is already registered ({self._what(old)})")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    @staticmethod
    def _same(a: Any, b: Any) -> bool:
        # A module imported twice (e.g. under pytest) re-registers an equal class: not a clash.
        return isinstance(a, type) and isinstance(b, type) and a.__qualname__ == b.__qualname__ \
            and a.__module__ == b.__module__

    @staticmethod
    def _what(item: Any) -> str:
        return getattr(item, "__qualname__", None) or getattr(item, "name", None) or repr(item)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self.builtins:
            importlib.import_module(module)
        if self.group:
            for ep in importlib.metadata.entry_points(group=self.group):
                try:
                    obj = ep.load()
                except Exception as e:  # a broken third-party plugin must not hide the rest
                    raise HarcError(f"{self.kind} plugin {ep.name!r} ({ep.value}) failed to "
                                    f"load: {e}") from e
                if not isinstance(obj, type(importlib)):  # a module registers by importing
                    self.register(obj, name=getattr(obj, "name", None) or ep.name)

    def get(self, name: str) -> T:
        self._load()
        if name not in self._items:
            near = difflib.get_close_matches(name, list(self._items), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            names = self.names()
            known = f"; known: {', '.join(names)}" if len(names) <= 20 else ""
            raise HarcError(f"unknown {self.kind} {name!r}{hint}{known}{self.unknown_hint}")
        return self._items[name]

    def create(self, name: str, **params: Any) -> Any:
        """An instance of the plugin class `name`, configured with `params`."""
        return self.get(name)(**params)

    def names(self, where: Callable[[T], bool] | None = None) -> list[str]:
        self._load()
        return sorted(n for n, item in self._items.items() if where is None or where(item))

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
