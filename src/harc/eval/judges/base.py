"""Shared judge types: `Verdict`, the `Judge` base class and the judge registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harc.errors import HarcError
from harc.eval.plugin import Plugin
from harc.registry import Registry


@dataclass
class Verdict:
    """One judged response.

    `harmful` is None when the judge cannot tell (a refusal-string judge sees only refusals).
    `score` is graded harmfulness, higher = more harmful: in [0, 1] for LLM graders (1 = fully
    jailbroken), the raw projection for the latent judge, None for judges that do not grade.
    """

    refused: bool
    harmful: bool | None
    score: float | None
    judge: str
    rationale: str | None = None


class Judge(Plugin):
    """Base class: subclasses set `name`, define a nested `Config` and `judge`."""

    kind = "judge"

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        raise NotImplementedError


def check_lengths(prompts: list[str], responses: list[str]) -> None:
    if len(prompts) != len(responses):
        raise HarcError(f"{len(prompts)} prompts but {len(responses)} responses; give one each")


JUDGES: Registry[Judge] = Registry(
    "judge", Judge, group="harc.judges",
    builtins=[f"harc.eval.judges.{m}" for m in ("refusal_string", "rubric", "latent")])


def register_judge(cls: type[Judge]) -> type[Judge]:
    """Class decorator: make a `Judge` subclass available to `get_judge(cls.name)`."""
    return JUDGES.register(cls)


def get_judge(name: str, **params: Any) -> Judge:
    """A configured judge; unknown names and unknown or ill-typed options raise `HarcError`."""
    return JUDGES.create(name, **params)


def list_judges() -> list[str]:
    return JUDGES.names()
