"""SmoothLLM (Robey et al. 2023, "SmoothLLM: Defending Large Language Models Against Jailbreaking
Attacks"): answer `copies` randomly perturbed copies of each prompt, call each answer jailbroken
when it is not a refusal (the paper's keyword check; here harc's refusal phrases), take the
majority (jailbroken only when more than half are) and return an answer that agrees with it.

Perturbations at rate q of the prompt's characters, as in the reference code: "swap" replaces
q of the characters with random printable ones, "insert" adds a random character after q of them,
"patch" replaces one contiguous run of q of them. Copies are seeded by (seed, prompt, copy), so a
prompt always gets the same copies and its generations can be cached.
"""

from __future__ import annotations

import hashlib
import random
import string
from typing import Literal

from harc.eval.filters.base import Filter, Generate, register_filter
from harc.refusal import is_refusal

PRINTABLE = string.printable


def perturb(text: str, kind: str, rate: float, rng: random.Random) -> str:
    """One perturbed copy of `text` (see the module docstring)."""
    chars = list(text)
    n = int(len(chars) * rate)
    if kind == "swap":
        for i in rng.sample(range(len(chars)), n):
            chars[i] = rng.choice(PRINTABLE)
    elif kind == "insert":
        for i in rng.sample(range(len(chars)), n):
            chars[i] += rng.choice(PRINTABLE)
    elif kind == "patch":
        start = rng.randint(0, len(chars) - n)
        chars[start: start + n] = [rng.choice(PRINTABLE) for _ in range(n)]
    else:
        raise ValueError(f"unknown perturbation {kind!r}")
    return "".join(chars)


@register_filter
class SmoothLLM(Filter):
    name = "smoothllm"

    class Config(Filter.Config):
        copies: int = 10  # N, perturbed copies per prompt (the paper's default)
        rate: float = 0.1  # q, fraction of characters perturbed
        perturbation: Literal["swap", "insert", "patch"] = "swap"
        seed: int = 0

        def check(self) -> None:
            self.need(1 <= self.copies <= 100, "copies", "must lie in [1, 100]")
            self.need(0 < self.rate < 1, "rate", "must lie in (0, 1)")

    def copies_of(self, prompt: str) -> list[str]:
        c = self.config
        out = []
        for j in range(c.copies):
            digest = hashlib.sha256(f"{c.seed}\x00{j}\x00{prompt}".encode()).digest()
            copy = perturb(prompt, c.perturbation, c.rate, random.Random(digest))
            # An all-whitespace copy cannot be rendered; its original stands in.
            out.append(copy if copy.strip() else prompt)
        return out

    def respond(self, generate: Generate, prompts: list[str], prefills: list[str | None],
                steer) -> list[str]:
        n = self.config.copies
        copies = [c for p in prompts for c in self.copies_of(p)]
        answers = generate(copies, [f for f in prefills for _ in range(n)], steer)
        out = []
        for i in range(len(prompts)):
            mine = answers[i * n: (i + 1) * n]
            broken = [not is_refusal(a) for a in mine]
            majority = sum(broken) > n / 2
            out.append(next(a for a, b in zip(mine, broken) if b == majority))
        return out
