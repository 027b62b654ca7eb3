"""Names a package exports but imports on first use (PEP 562), so that importing the package
does not pay for torch, transformers and peft."""

import importlib
import sys
from collections.abc import Callable, Mapping


def lazy_getattr(package: str, where: Mapping[str, str]) -> Callable[[str], object]:
    """The module `__getattr__` of `package`: a name of `where` comes from the module `where`
    gives, on first use, and is then kept in the package so the next access is plain."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
