"""Policy layers placed around a model, evaluated alone and on top of any adapter.

A layer is a plugin with a typed `Config`, registered by name (the `harc.filters` entry-point
group). It acts at either or both of two points:
- `flags(prompts)`: an input guard. Flagged prompts are answered with `BLOCKED` and never
  generated (keyword, latent, perplexity, self-check);
- `respond(generate, prompts, prefills, steer)`: wraps generation. It may rewrite the prompts or
  the chat format (a system prompt), add a residual edit (conditional steering), generate
  perturbed copies and vote (SmoothLLM), or guard the output while it is generated (a runtime
  monitor). The default generates plainly.
A layer is bound to a `PolicyContext` (the model it guards, the chat format, directions and
validation data) before use; anything it calibrates, it calibrates there, on validation data
only, and records in `calibration`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harc.errors import HarcError
from harc.eval.plugin import Plugin
from harc.registry import Registry

BLOCKED = "[blocked by input filter]"

# generate(prompts, prefills, steer, *, chat=None, add=None, monitor=None) -> responses: greedy
# generation of the guarded model. `chat` replaces its chat format, `add` is a residual edit
# applied together with the attack's `steer`, `monitor` a runtime monitor (`harc.generation.Monitor`).
Generate = Callable[..., list[str]]


@dataclass
class PolicyContext:
    """What a layer may use: the guarded model, its chat format, directions with the layer to
    read them at, and validation data (disjoint from every evaluation set) for calibration:
    harmful and harmless prompts, (prompt, harmful opening) and (prompt, benign answer) pairs."""

    model: Any
    chat: Any
    dirs: Any = None
    layer: int | None = None
    val_harmful: Sequence[str] = field(default_factory=list)
    val_harmless: Sequence[str] = field(default_factory=list)
    batch_size: int = 16
    harmful_openings: Sequence[tuple[str, str]] = field(default_factory=list)
    benign_answers: Sequence[tuple[str, str]] = field(default_factory=list)


class Filter(Plugin):
    """A policy layer: an input guard (`flags`), a wrapper of generation (`respond`), or both."""

    kind = "filter"
    needs_directions: ClassVar[bool] = False

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.calibration: dict[str, Any] = {}

    def bind(self, ctx: PolicyContext) -> Filter:
        """Attach to a model (and calibrate); returns self."""
        if self.needs_directions and (ctx.dirs is None or ctx.layer is None):
            raise HarcError(f"policy layer {self.name!r} needs directions; run `harc extract` "
                            "first and pass them (--directions)")
        self.ctx = ctx
        return self

    def flags(self, prompts: Sequence[str]) -> list[bool]:
        """Which prompts to block (default: none)."""
        return [False] * len(prompts)

    def respond(self, generate: Generate, prompts: list[str], prefills: list[str | None],
                steer) -> list[str]:
        """Responses to prompts that passed `flags` (default: plain generation)."""
        return generate(prompts, prefills, steer)

    def generation_key(self) -> dict | None:
        """What this layer changes in generations (part of their cache key); None for a pure input
        guard, whose unblocked prompts share the plain model's generations."""
        if type(self).respond is Filter.respond:
            return None
        return {"layer": self.name, "params": self.params(), "calibration": self.calibration}

    def record(self) -> dict[str, Any]:
        """The layer as results record it: name, options and calibration."""
        return {"name": self.name, "params": self.params(), "calibration": self.calibration}


def in_range(cfg, key: str, lo: float, hi: float) -> None:
    """A threshold-like option is null (calibrated) or lies in [lo, hi]: else one line."""
    value = getattr(cfg, key)
    cfg.need(value is None or lo <= value <= hi, key, f"must lie in [{lo}, {hi}] or be null "
             "(calibrated on validation data)")


FILTERS: Registry[Filter] = Registry(
    "filter", Filter, group="harc.filters",
    builtins=[f"harc.eval.filters.{m}" for m in (
        "keyword", "latent", "perplexity", "smoothllm", "self_check", "system_prompt",
        "latent_guard", "cast")])


def register_filter(cls: type[Filter]) -> type[Filter]:
    """Class decorator: make a `Filter` subclass available by its name."""
    return FILTERS.register(cls)


def get_filter(name: str, **params: Any) -> Filter:
    return FILTERS.create(name, **params)
