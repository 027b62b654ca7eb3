"""Conditional activation steering, CAST-style (Lee et al. 2024, "Programming Refusal with
Conditional Activation Steering"): steer towards refusal only the prompts that the model itself
reads as harmful.

Condition: the prompt's harmfulness projection, cos(h(t_inst), v_harm) at the plane layer, above a
threshold calibrated on validation prompts (the cut that best separates validation harmful from
harmless prompts). Behaviour: the refusal direction added from t_post onwards (the last prompt
token and every generated token, `harc.generation.Steer` mode "add"), at each steered slot as
`strength` times v_ref's raw difference of means there (strength 1 adds the mean activation gap
between harmful and harmless prompts, the usual activation-addition scale).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harc.directions import prompt_projections
from harc.errors import HarcError
from harc.eval.filters.base import Filter, Generate, PolicyContext, in_range, register_filter
from harc.eval.judges.latent import fit_threshold
from harc.generation import Steer


@register_filter
class Cast(Filter):
    name = "cast"
    needs_directions = True

    class Config(Filter.Config):
        threshold: float | None = None  # a cosine; null: calibrated on validation prompts
        strength: float = 1.0  # multiple of v_ref's raw difference of means added
        slots: list[int] | None = None  # slots steered; null: the plane layer

        def check(self) -> None:
            in_range(self, "threshold", -1.0, 1.0)
            self.need(0 < self.strength <= 20, "strength", "must lie in (0, 20]")
            self.need(self.slots is None or (len(self.slots) > 0 and min(self.slots) >= 0),
                      "slots", "must be null or a non-empty list of slot indices")

    def bind(self, ctx: PolicyContext) -> Cast:
        super().bind(ctx)
        d = ctx.dirs
        slots = self.config.slots or [ctx.layer]
        if max(slots) >= d.n_slots:
            raise HarcError(f"policy layer 'cast' option 'slots': slots must lie in "
                            f"0..{d.n_slots - 1}")
        vectors = torch.zeros_like(d.v_ref)
        for s in slots:
            vectors[s] = d.v_ref[s] * d.norms["v_ref"][s] * self.config.strength
        self.steer = Steer("add", vectors, alpha=1.0, slots=tuple(sorted(slots)))
        self.threshold = self.config.threshold
        if self.threshold is None:
            h, b = self._proj(ctx.val_harmful), self._proj(ctx.val_harmless)
            if not h or not b:
                raise HarcError("policy layer 'cast' calibrates on validation harmful and "
                                "harmless prompts and got none; give threshold=")
            self.threshold = fit_threshold(h + b, [True] * len(h) + [False] * len(b))
            self.calibration = {
                "threshold": self.threshold, "layer": ctx.layer, "n": [len(h), len(b)],
                "rule": "best accuracy: validation harmful vs harmless prompts",
                "val_harmful_steered": sum(x > self.threshold for x in h) / len(h),
                "val_harmless_steered": sum(x > self.threshold for x in b) / len(b)}
        self.calibration.update({"slots": sorted(slots), "strength": self.config.strength})
        return self

    def _proj(self, prompts: Sequence[str]) -> list[float]:
        c = self.ctx
        if not prompts:
            return []
        return prompt_projections(c.model, c.chat, list(prompts), c.dirs, [c.layer],
                                  c.batch_size)[:, 0, 0].tolist()

    def respond(self, generate: Generate, prompts: list[str], prefills: list[str | None],
                steer) -> list[str]:
        on = [p > self.threshold for p in self._proj(prompts)]
        out = [""] * len(prompts)
        for cond in (True, False):
            idx = [i for i, c in enumerate(on) if c == cond]
            if idx:
                texts = generate([prompts[i] for i in idx], [prefills[i] for i in idx], steer,
                                 add=self.steer if cond else None)
                for i, t in zip(idx, texts):
                    out[i] = t
        return out
