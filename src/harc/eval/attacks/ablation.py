"""Refusal-direction ablation (Arditi et al. 2024): the request unchanged, a residual edit asked.

This is a white-box attack on the model, not on the prompt. The probe only names the edit in
`steer`; the generation engine projects the refusal direction out of the residual stream. HARC
should survive it better than an undefended model, because its harmfulness signal still drives
refusal when the refusal direction is removed.
"""

from __future__ import annotations

from harc.eval.attacks.base import Attack, Probe, normalize_requests, register_attack


@register_attack
class Ablation(Attack):
    name = "ablation"

    def apply(self, requests: list[dict]) -> list[Probe]:
        return [self.probe(r, r["prompt"], steer="ablate_refusal")
                for r in normalize_requests(requests)]
