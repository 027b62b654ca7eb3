"""No attack: the request as is, the baseline every attack is compared with."""

from __future__ import annotations

from harc.eval.attacks.base import Attack, Probe, normalize_requests, register_attack


@register_attack
class Direct(Attack):
    name = "direct"

    def apply(self, requests: list[dict]) -> list[Probe]:
        return [self.probe(r, r["prompt"]) for r in normalize_requests(requests)]
