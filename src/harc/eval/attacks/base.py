"""Shared attack types: `Probe` (what the target model is asked) and the `Attack` base class.

Every attack turns harmful requests `{"prompt", "category"?}` into probes. Its options live in a
nested `Config` (a `harc.config.Config`) that is validated when the attack is built, so a typo in
a YAML file or on the command line fails at once with the key named, not mid-evaluation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harc.errors import HarcError
from harc.eval.plugin import Plugin
from harc.registry import Registry


@dataclass
class Probe:
    """One input for the target model, with enough provenance to score and group it later."""

    prompt: str  # the final user message
    source_prompt: str  # the original harmful request, which judges grade the response against
    attack: str
    category: str | None = None
    prefill: str | None = None  # assistant response start the engine must force (prefilling)
    steer: str | None = None  # named residual edit the engine must apply, e.g. "ablate_refusal"
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def normalize_requests(requests: list[dict] | list[str]) -> list[dict]:
    """Check the request records once, so attacks can index them without defensive code."""
    if isinstance(requests, (str, dict)):
        raise HarcError("requests must be a list of {'prompt': ..., 'category': ...} records")
    out = []
    for i, r in enumerate(requests):
        if isinstance(r, str):
            r = {"prompt": r}
        if not isinstance(r, dict):
            raise HarcError(f"request {i} must be a dict with a 'prompt', got {type(r).__name__}")
        p = r.get("prompt")
        if not isinstance(p, str) or not p.strip():
            raise HarcError(f"request {i}: 'prompt' must be a non-empty string")
        c = r.get("category")
        if c is not None and not isinstance(c, str):
            raise HarcError(f"request {i}: 'category' must be a string or absent")
        out.append(r)
    return out


class Attack(Plugin):
    """Base class: subclasses set `name`, define a nested `Config` and `apply`."""

    kind = "attack"
    iterative: ClassVar[bool] = False  # True: call `run(requests, target, judge)`, not `apply`

    def apply(self, requests: list[dict]) -> list[Probe]:
        raise NotImplementedError

    def probe(self, request: dict, prompt: str, **kw: Any) -> Probe:
        return Probe(prompt=prompt, source_prompt=request["prompt"], attack=self.name,
                     category=request.get("category"), **kw)


_BUILTINS = ["direct", "templates", "deep_inception", "code_attack", "pap", "pair", "prefill",
             "ablation", "gcg", "taxonomy"]
ATTACKS: Registry[Attack] = Registry("attack", Attack, group="harc.attacks",
                                     builtins=[f"harc.eval.attacks.{m}" for m in _BUILTINS])


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make an `Attack` subclass available to `get_attack(cls.name)`."""
    return ATTACKS.register(cls)


def get_attack(name: str, **params: Any) -> Attack:
    """A configured attack; unknown names and unknown or ill-typed options raise `HarcError`."""
    return ATTACKS.create(name, **params)


def list_attacks() -> list[str]:
    return ATTACKS.names()
