"""Checks for the built-in capability items (`harc-capability`): `{"prompt", "answer", "check"}`.

Each check is deliberately simple and deterministic, so a capability regression after training
is visible offline without a judge model:
- "number": the last number in the response equals `answer` (commas and a trailing ".0" ignored);
- "contains": `answer` appears in the response as whole words, case-insensitive; several
  acceptable answers are separated by "|";
- "word_count": the response has exactly `answer` words;
- "exact": the response equals `answer` once both are normalised (case, punctuation, spaces);
- "lowercase" / "uppercase": the response has letters and all of them are lower / upper case
  (`answer` is not used).
The check names match `harc.evaluate.check_answer`.
"""

from __future__ import annotations

import re

from harc.data.hygiene import normalize
from harc.errors import HarcError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_WORD = re.compile(r"\w[\w'’-]*")


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def _contains(answer: str, response: str) -> bool:
    hay = f" {normalize(response)} "
    return any(f" {normalize(a)} " in hay for a in answer.split("|") if normalize(a))


def _cased(response: str, upper: bool) -> bool:
    letters = [c for c in response if c.isalpha()]
    return bool(letters) and all(c.isupper() if upper else c.islower() for c in letters)


CHECKS = {
    "number": lambda a, r: (n := _number(r)) is not None and abs(n - float(a)) < 1e-6,
    "contains": _contains,
    "word_count": lambda a, r: len(_WORD.findall(r)) == int(a),
    "exact": lambda a, r: normalize(r) == normalize(a),
    "lowercase": lambda a, r: _cased(r, upper=False),
    "uppercase": lambda a, r: _cased(r, upper=True),
}


def check(item: dict, response: str) -> bool:
    """Whether `response` passes the item's check."""
    kind = item.get("check")
    if kind not in CHECKS:
        raise HarcError(f"capability item has unknown check {kind!r}; one of {sorted(CHECKS)}")
    try:
        return bool(CHECKS[kind](str(item["answer"]), response))
    except (KeyError, ValueError) as e:
        raise HarcError(f"capability item {item.get('prompt', '')[:40]!r}: bad answer for "
                        f"check {kind!r} ({e})") from None
