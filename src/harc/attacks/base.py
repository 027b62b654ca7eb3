"""Shared attack types: `Probe` (what the target model is asked) and the `Attack` base class.

Every attack turns harmful requests `{"prompt", "category"?}` into probes. Its options live in a
nested `Config` dataclass whose fields are type-checked when the attack is built, so a typo in a
YAML file or on the command line fails at once with the key named, not mid-evaluation.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from harc._config import coerce, type_name
from harc.errors import HarcError


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


# ---------------------------------------------------------------------------------------------
# Typed configs


def build_config(cls: type, params: dict, owner: str):
    """Instantiate dataclass `cls` from `params`, naming the offending key on any mismatch."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        known = ", ".join(fields) or "none"
        raise HarcError(f"{owner} has no option {unknown[0]!r}; its options: {known}")
    values = {}
    for key, value in params.items():
        ok, v = coerce(value, hints[key])
        if not ok:
            raise HarcError(
                f"{owner} option {key!r} must be {type_name(hints[key])}, got {value!r}"
            )
        values[key] = v
    missing = [
        n for n, f in fields.items()
        if n not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise HarcError(f"{owner} needs option {missing[0]!r}")
    cfg = cls(**values)
    check = getattr(cfg, "check", None)
    if check:  # cross-field rules, e.g. a value range
        check()
    return cfg


class Attack:
    """Base class: subclasses set `name`, define a nested `Config` dataclass and `apply`."""

    name: ClassVar[str] = ""
    iterative: ClassVar[bool] = False  # True: call `run(requests, target, judge)`, not `apply`

    @dataclass
    class Config:
        pass

    def __init__(self, **params: Any):
        self.config = build_config(self.Config, params, f"attack {self.name!r}")

    def apply(self, requests: list[dict]) -> list[Probe]:
        raise NotImplementedError

    def probe(self, request: dict, prompt: str, **kw: Any) -> Probe:
        return Probe(prompt=prompt, source_prompt=request["prompt"], attack=self.name,
                     category=request.get("category"), **kw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"
