"""The base of configurable evaluation plugins (attacks, judges, policy layers)."""

from __future__ import annotations

from typing import Any, ClassVar

from harc.config import Config, build


class Plugin:
    """Base of configurable plugins (attacks, judges, policy layers): a `name`, a nested `Config`
    validated at construction, and the parameters recorded for results.json."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "plugin"

    class Config(Config):
        pass

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        # Cross-field checks (`need`) name the option as validation errors do.
        if "Config" in cls.__dict__ and cls.name:
            cls.Config.owner = f"{cls.kind} {cls.name!r} option"

    def __init__(self, **params: Any):
        self.config = build(self.Config, params, f"{self.kind} {self.name!r} option")

    def params(self) -> dict[str, Any]:
        """The options as recorded in results: callables and objects by their type name."""
        out = {}
        for k, v in self.config:
            out[k] = v if v is None or isinstance(v, (str, int, float, bool, list, dict, tuple)) \
                else type(v).__name__
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
