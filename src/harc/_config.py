"""Value checking shared by the training config and the plugin (attack, judge, eval) configs."""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

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


def type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value) for `value` against the annotation `tp`.

    Besides `scalar`'s parsing, a comma-separated string is accepted for a list of strings (an
    override such as `eval.attacks=dan,aim`), and a fixed-length tuple checks its length and each
    item. Nothing else is converted; an annotation that cannot be checked is trusted."""
    if tp is Any:
        return True, value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, v = coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return value in args, value
    if origin in (list, tuple):
        if isinstance(value, str) and args and args[0] is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            return False, value
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            return False, value
        kinds = args if fixed else [args[0] if args else Any] * len(value)
        items = [coerce(v, a) for v, a in zip(value, kinds, strict=True)]
        out = [v for _, v in items]
        return all(ok for ok, _ in items), tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is Callable or origin is Callable:
        return callable(value), value
    if tp in (bool, int, float):
        return scalar(value, tp)
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value
