"""Scalar parsing shared by the training config and the plugin (attack, judge, eval) configs."""

from __future__ import annotations

from typing import Any

_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def scalar(value: Any, tp: type) -> tuple[bool, Any]:
    """(ok, value) for `value` as a bool, int or float `tp`.

    Strings are parsed because command-line `key=value` overrides arrive as text and YAML 1.1
    reads "1e-4" as a string; ints are accepted where floats are expected; a bool is never a
    number."""
    if isinstance(value, str):
        if tp is bool:
            return (True, _BOOLS[value.lower()]) if value.lower() in _BOOLS else (False, value)
        try:
            return True, tp(value)
        except ValueError:
            return False, value
    if tp is bool:
        return isinstance(value, bool), value
    ok = isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    return ok, tp(value) if ok else value
