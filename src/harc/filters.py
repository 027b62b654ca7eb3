"""Input filters: policy layers placed in front of a model (evaluated alone or with HARC)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from harc.errors import HarcError

BLOCKED = "[blocked by input filter]"

# A deliberately plain list: the point is to measure what a keyword filter misses and over-blocks.
KEYWORDS = (
    "bomb", "explosive", "weapon", "kill", "murder", "poison", "hack", "malware", "ransomware",
    "virus", "phishing", "steal", "fraud", "counterfeit", "drug", "meth", "cocaine", "heroin",
    "suicide", "self-harm", "terror", "extremist", "launder", "exploit", "attack", "violence",
    "abuse", "firearm", "gun", "assault", "illegal", "smuggle", "blackmail", "extort",
)


class KeywordFilter:
    """Blocks prompts that contain a listed keyword as a whole word (case-insensitive)."""

    name = "keyword"

    def __init__(self, keywords: Sequence[str] = KEYWORDS):
        self.pattern = re.compile(r"\b(" + "|".join(map(re.escape, keywords)) + r")", re.I)

    def flags(self, prompts: Sequence[str], **_) -> list[bool]:
        return [bool(self.pattern.search(p)) for p in prompts]


class LatentFilter:
    """Blocks prompts whose t_inst residual projects on v_harm above a threshold at one layer.

    The threshold defaults to the midpoint between the held-out harmful and harmless means, so the
    filter is calibrated on data disjoint from the evaluation prompts.
    """

    name = "latent"

    def __init__(self, model, chat, dirs, layer: int, threshold: float):
        self.model, self.chat, self.dirs = model, chat, dirs
        self.layer, self.threshold = layer, threshold

    @classmethod
    def calibrate(cls, model, chat, dirs, layer: int, harmful: Sequence[str],
                  harmless: Sequence[str]) -> LatentFilter:
        from harc.directions import prompt_projections

        h = prompt_projections(model, chat, harmful, dirs, [layer])[:, 0, 0].mean().item()
        b = prompt_projections(model, chat, harmless, dirs, [layer])[:, 0, 0].mean().item()
        return cls(model, chat, dirs, layer, (h + b) / 2)

    def flags(self, prompts: Sequence[str], **_) -> list[bool]:
        from harc.directions import prompt_projections

        proj = prompt_projections(self.model, self.chat, prompts, self.dirs, [self.layer])
        return (proj[:, 0, 0] > self.threshold).tolist()


FILTERS = ("keyword", "latent")


def check_filter_name(name: str) -> None:
    if name not in FILTERS:
        raise HarcError(f"unknown filter {name!r}; choose one of {FILTERS}")
