"""Policy layers placed in front of a model, evaluated alone and on top of any adapter.

A layer is a plugin with a typed `Config`. It is bound to a `PolicyContext` (the model it guards,
the chat format, directions and validation prompts) before use; anything it calibrates, it
calibrates there, on validation prompts only, and records in `calibration`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harc.errors import HarcError
from harc.eval.plugin import Plugin
from harc.registry import Registry

BLOCKED = "[blocked by input filter]"


@dataclass
class PolicyContext:
    """What a layer may use: the guarded model, its chat format, directions with the layer to
    read them at, and validation prompts (disjoint from every evaluation set) for calibration."""

    model: Any
    chat: Any
    dirs: Any = None
    layer: int | None = None
    val_harmful: Sequence[str] = field(default_factory=list)
    val_harmless: Sequence[str] = field(default_factory=list)
    batch_size: int = 16


class Filter(Plugin):
    """An input filter: `flags(prompts)` marks the prompts to block."""

    kind = "filter"
    needs_directions: ClassVar[bool] = False

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.calibration: dict[str, Any] = {}

    def bind(self, ctx: PolicyContext) -> Filter:
        """Attach to a model (and calibrate); returns self."""
        if self.needs_directions and (ctx.dirs is None or ctx.layer is None):
            raise HarcError(f"filter {self.name!r} needs directions; run `harc extract` first "
                            "and pass them (--directions)")
        self.ctx = ctx
        return self

    def flags(self, prompts: Sequence[str]) -> list[bool]:
        raise NotImplementedError


FILTERS: Registry[Filter] = Registry("filter", Filter, group="harc.filters",
                                     builtins=["harc.eval.filters.keyword",
                                               "harc.eval.filters.latent"])


def register_filter(cls: type[Filter]) -> type[Filter]:
    """Class decorator: make a `Filter` subclass available by its name."""
    return FILTERS.register(cls)


def get_filter(name: str, **params: Any) -> Filter:
    return FILTERS.create(name, **params)
