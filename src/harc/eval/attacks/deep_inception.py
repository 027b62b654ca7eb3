"""DeepInception (Li et al. 2023): the request hidden in nested fiction, layer inside layer.

The template is walledeval's copy of the authors' prompt. The paper's main setting is a
"science fiction" scene with 5 characters and 5 layers (walledeval defaults to "dream").
"""

from __future__ import annotations

import string

from harc.eval.attacks import sources
from harc.eval.attacks.base import Attack, Probe, normalize_requests, register_attack

_MEMBER = ("walledeval/prompts/presets/attacks/deep-inception.yaml",
           "d307d0c0f98776d2111d8631749a5368f456f8ecd5e5c2710a6573560657b767")


def as_task(request: str) -> str:
    """The request as a verb phrase that reads after "show how to": no final stop, lower start."""
    text = request.strip().rstrip(" .?!")
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


@register_attack
class DeepInception(Attack):
    name = "deep_inception"

    class Config(Attack.Config):
        scene: str = "science fiction"
        char_num: int = 5
        layer_num: int = 5

    def apply(self, requests: list[dict]) -> list[Probe]:
        tpl = string.Template(sources.read_yaml(sources.WALLEDEVAL, *_MEMBER)["template"])
        c = self.config
        return [self.probe(r, tpl.safe_substitute(prompt=as_task(r["prompt"]), scene=c.scene,
                                                  char_num=c.char_num, layer_num=c.layer_num).strip())
                for r in normalize_requests(requests)]
