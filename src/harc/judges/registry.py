"""Judges registered by name; the built-in ones are imported on first lookup."""

from __future__ import annotations

from typing import Any

from harc.attacks.registry import Registry
from harc.judges.base import Judge

JUDGES: Registry[Judge] = Registry(
    "judge", Judge, [f"harc.judges.{m}" for m in ("refusal_string", "rubric", "latent")]
)


def register_judge(cls: type[Judge]) -> type[Judge]:
    """Class decorator: make a `Judge` subclass available to `get_judge(cls.name)`."""
    return JUDGES.register(cls)


def get_judge(name: str, **params: Any) -> Judge:
    """A configured judge; unknown names and unknown or ill-typed options raise `HarcError`."""
    return JUDGES.get(name, **params)


def list_judges() -> list[str]:
    return JUDGES.names()
