"""Keyword filter: blocks prompts that contain a listed word (a deliberately plain baseline that
shows what such a filter misses and over-blocks)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import Field

from harc.eval.filters.base import Filter, register_filter

KEYWORDS = (
    "bomb", "explosive", "weapon", "kill", "murder", "poison", "hack", "malware", "ransomware",
    "virus", "phishing", "steal", "fraud", "counterfeit", "drug", "meth", "cocaine", "heroin",
    "suicide", "self-harm", "terror", "extremist", "launder", "exploit", "attack", "violence",
    "abuse", "firearm", "gun", "assault", "illegal", "smuggle", "blackmail", "extort",
)


@register_filter
class KeywordFilter(Filter):
    """Blocks prompts that contain a listed keyword at a word start (case-insensitive)."""

    name = "keyword"

    class Config(Filter.Config):
        keywords: list[str] = Field(default_factory=lambda: list(KEYWORDS))

    def __init__(self, **params):
        super().__init__(**params)
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, self.config.keywords)) + r")",
                                  re.I)

    def flags(self, prompts: Sequence[str]) -> list[bool]:
        return [bool(self.pattern.search(p)) for p in prompts]
