"""Shared judge types: `Verdict` and the `Judge` base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from harc.attacks.base import build_config
from harc.errors import HarcError


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


class Judge:
    """Base class: subclasses set `name`, define a nested `Config` dataclass and `judge`."""

    name: ClassVar[str] = ""

    @dataclass
    class Config:
        pass

    def __init__(self, **params: Any):
        self.config = build_config(self.Config, params, f"judge {self.name!r}")

    def judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def check_lengths(prompts: list[str], responses: list[str]) -> None:
    if len(prompts) != len(responses):
        raise HarcError(f"{len(prompts)} prompts but {len(responses)} responses; give one each")
