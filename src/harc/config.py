"""One config system for every part of harc: typed pydantic models, YAML in, one `key=value`
override parser, one-line errors, and the resolved config out.

Every config (training methods, evaluation, the run, attacks, judges, policy layers) subclasses
`Config`. Values arriving as text (command-line overrides, YAML 1.1's "1e-4") are parsed by
pydantic; on top of that a comma-separated string is accepted for a list of strings
(`eval.attacks=dan,aim`) and a bool is never taken for a number. Unknown keys are refused with a
did-you-mean hint. Cross-field rules live in a `check()` method, run after field validation.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from harc.errors import HarcError

C = TypeVar("C", bound="Config")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


class Config(BaseModel):
    """Base of every harc config: unknown keys are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              arbitrary_types_allowed=True, protected_namespaces=())
    # How errors name a key of this config: "config key 'lr'" (plugins pass their own owner to
    # `build`, e.g. "attack 'dan' option 'variant'").
    owner: ClassVar[str] = "config key"
    prefix: ClassVar[str] = ""  # the section a nested config sits in, e.g. "lora."

    @model_validator(mode="before")
    @classmethod
    def _text_inputs(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for name, field in cls.model_fields.items():
            if name not in data:
                continue
            tp, value = _strip_optional(field.annotation), data[name]
            if (typing.get_origin(tp) is list and typing.get_args(tp) == (str,)
                    and isinstance(value, str)):
                data[name] = [v.strip() for v in value.split(",") if v.strip()]
            elif tp in (int, float) and isinstance(value, bool):
                raise HarcError(f"{cls.label(name)} must be a number, got {value!r}")
        return data

    @model_validator(mode="after")
    def _cross_field(self):
        self.check()
        return self

    def check(self) -> None:
        """Cross-field rules; raise HarcError naming the key. Subclasses override."""

    @classmethod
    def label(cls, key: str) -> str:
        return f"{cls.owner} '{cls.prefix}{key}'"

    def need(self, ok: bool, key: str, why: str) -> None:
        """Raise a one-line HarcError for `key` unless `ok`."""
        if not ok:
            value: Any = self
            for part in key.split("."):
                value = getattr(value, part, None)
            raise HarcError(f"{self.label(key)}: {why} (got {value!r})")


def _loc(loc: Sequence) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int) or p >= 0)


def _model_at(cls: type[BaseModel], loc: Sequence) -> type[BaseModel] | None:
    """The nested config class that owns the key at `loc` (for did-you-mean hints)."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part)) if isinstance(part, str) else None
        tp = _strip_optional(field.annotation) if field else None
        if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
            return None
        cls = tp
    return cls


def _one_line(cls: type[Config], e: ValidationError, owner: str) -> str:
    err = e.errors(include_url=False)[0]
    loc = err["loc"]
    prefix = cls.prefix
    # Errors inside list items or union members carry extra loc parts: name the config key.
    named = [p for p in loc if isinstance(p, str) and not p.startswith(("function-", "list["))
             and p not in ("int", "float", "str", "bool", "none")]
    key = prefix + (_loc(named) or _loc(loc))
    if err["type"] == "extra_forbidden":
        section = _model_at(cls, loc)
        names = list(section.model_fields) if section else []
        near = difflib.get_close_matches(str(loc[-1]), names, n=1)
        section = key.rpartition(".")[0]
        hint = f"; did you mean '{section + '.' if section else ''}{near[0]}'?" if near else \
            f"; known: {', '.join(names)}"
        return f"unknown {owner} '{key}'{hint}"
    if err["type"] == "missing":
        return f"{owner} {key!r} is required"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{owner} {key!r}: {msg[0].lower() + msg[1:]}, got {err.get('input')!r}"


def build(cls: type[C], raw: Mapping | None = None, owner: str | None = None) -> C:
    """Validate a mapping into `cls`; any problem is one HarcError line naming the key.

    `owner` names what is configured in messages, e.g. "attack 'dan' option" (default: the
    class's `owner`, "config key")."""
    owner = owner or cls.owner
    if raw is not None and not isinstance(raw, Mapping):
        raise HarcError(f"the {owner}s must be a mapping of {', '.join(cls.model_fields)}")
    try:
        return cls.model_validate(dict(raw or {}))
    except ValidationError as e:
        raise HarcError(_one_line(cls, e, owner)) from None


def read_yaml(path: str | Path) -> tuple[dict, Path]:
    """A YAML config file as a mapping, and its folder (relative paths resolve against it)."""
    path = Path(path)
    if not path.is_file():
        raise HarcError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise HarcError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise HarcError(f"{path} is not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise HarcError(f"{path} must hold a mapping of config keys")
    return raw, path.parent.resolve()


def apply_overrides(raw: Mapping, items: Sequence[str]) -> dict:
    """`raw` with `key=value` overrides applied (dots reach into sections; values are YAML, so
    `band=[2, 3]` is a list and `x=null` is None). The one override parser of every command."""
    out = _deep_copy(raw)
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise HarcError(f"override {item!r} must look like key=value (e.g. lr=2e-4, lora.r=16)")
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise HarcError(f"override {item!r}: {p!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = text
    return out


def _deep_copy(raw: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def to_dict(cfg: BaseModel) -> dict:
    """Plain, JSON- and YAML-safe dict of a config (what `build` reads back)."""
    return cfg.model_dump(mode="json")


def to_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
