"""CodeAttack (Ren et al. 2024): the request encoded as data in a code-completion task.

The words of the request are pushed into a Python list or stack (reversed, so `decode` must pop
them) or held in a string; the model is asked to complete code whose `output_list` spells out the
steps. Templates are PyRIT's copies of the authors' prompts; the encoders are written here. The
"verbose" templates ask for 100-word paragraphs instead of short steps (the paper's "+" variant).
"""

from __future__ import annotations

import json
import re
from typing import Literal

from harc.eval.attacks import sources
from harc.eval.attacks.base import Attack, Probe, normalize_requests, register_attack

_C = "pyrit/datasets/converters/code_attack_"
_TEMPLATES = {
    ("python_list", False): "5ee9b97edde6d7700c915b63833e4b64acf3072e56a8477778876e9e122da908",
    ("python_list", True): "6fe00255a7cb09d1769a98df614c0ed6b57c4d23cfcef5f4baa36b64a03c549f",
    ("python_stack", False): "90c96bec1c7ec11f9dbe8528a8cbc27160e3ceb676f3b9ff2d4793fb7a319209",
    ("python_stack", True): "9149505b35bb9c82dc1e3bc871832f33f73b393f61d883d18078f9084bda0f7a",
    ("python_string", False): "a0b34cf5e48cb9de94d264980185098fc945643d0222bf37c6aad5777dc0e0ad",
    ("python_string", True): "6bb73221a7f25b81743468c23894098d261ce1a2331b8b158de55c8589570cbb",
}


def _literal(s: str) -> str:
    # JSON string syntax is valid Python: quotes, backslashes and control characters are escaped
    return json.dumps(s, ensure_ascii=False)


def encode(request: str, encoding: str) -> str:
    """The `wrapped_input` lines that initialise the data structure the template decodes."""
    if encoding == "python_list":
        return "\n".join(f"    my_list.append({_literal(w)})" for w in request.split())
    if encoding == "python_stack":
        words = [w for w in re.split(r"[\s\-]+", request) if w]
        if len(words) == 1:  # a single token is spelled out, as in the reference code
            words = list(words[0])
        return "\n".join(f"    my_stack.append({_literal(w)})" for w in reversed(words))
    return f"    my_string = {_literal(request)}"


@register_attack
class CodeAttack(Attack):
    name = "code_attack"

    class Config(Attack.Config):
        encoding: Literal["python_list", "python_stack", "python_string"] = "python_stack"
        verbose: bool = True

    def apply(self, requests: list[dict]) -> list[Probe]:
        c = self.config
        member = f"{_C}{c.encoding}{'_plus' if c.verbose else ''}.yaml"
        tpl = sources.read_yaml(sources.PYRIT, member, _TEMPLATES[c.encoding, c.verbose])["value"]
        return [self.probe(r, sources.render(tpl, wrapped_input=encode(r["prompt"], c.encoding)),
                           meta={"encoding": c.encoding})
                for r in normalize_requests(requests)]
