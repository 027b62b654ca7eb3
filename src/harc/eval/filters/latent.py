"""Latent filter: blocks prompts whose t_inst residual projects on v_harm above a threshold."""

from __future__ import annotations

from collections.abc import Sequence

from harc.directions import prompt_projections
from harc.errors import HarcError
from harc.eval.filters.base import Filter, PolicyContext, in_range, register_filter


@register_filter
class LatentFilter(Filter):
    """The threshold defaults to the midpoint between the validation harmful and harmless means
    at the plane layer, so the filter is calibrated on data disjoint from the evaluation."""

    name = "latent"
    needs_directions = True

    class Config(Filter.Config):
        threshold: float | None = None  # a cosine; null: calibrate on validation prompts

        def check(self) -> None:
            in_range(self, "threshold", -1.0, 1.0)

    def bind(self, ctx: PolicyContext) -> LatentFilter:
        super().bind(ctx)
        self.threshold = self.config.threshold
        if self.threshold is None:
            if not ctx.val_harmful or not ctx.val_harmless:
                raise HarcError("policy layer 'latent' calibrates its threshold on validation "
                                "prompts and got none (heldout.json beside the directions); "
                                "give threshold=")
            h, b = (self._proj(p).mean().item() for p in (ctx.val_harmful, ctx.val_harmless))
            self.threshold = (h + b) / 2
            self.calibration = {"threshold": self.threshold, "harmful_mean": h,
                                "harmless_mean": b, "layer": ctx.layer,
                                "n": [len(ctx.val_harmful), len(ctx.val_harmless)]}
        return self

    def _proj(self, prompts: Sequence[str]):
        c = self.ctx
        return prompt_projections(c.model, c.chat, prompts, c.dirs, [c.layer])[:, 0, 0]

    def flags(self, prompts: Sequence[str]) -> list[bool]:
        return (self._proj(prompts) > self.threshold).tolist()
