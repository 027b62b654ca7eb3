"""SFT baseline: refusal CE on the harmful prompts plus the KL retain term; HARC without the
coupling terms (the "no coupling" ablation: `harc` with weights.couple = weights.couple_resp = 0
gives the same loss and gradients, checked in the tests)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from harc.config import Config
from harc.lora import fused_lora
from harc.losses import head_kl_retain, head_refusal_ce
from harc.methods.base import Method, register_method
from harc.methods.batching import MicroBatch
from harc.methods.config import TrainConfig
from harc.methods.step import (
    KLCache,
    autocast,
    backbone,
    backward_terms,
    kl_reference,
    lm_head,
    no_input_cast,
)

TERMS = ("kl", "ce")


class SftWeights(Config):
    """Weights of the total loss: kl 10, ce 1 (HARC's released values for these two terms)."""

    prefix: ClassVar[str] = "weights."

    kl: float = 10.0
    ce: float = 1.0

    def check(self) -> None:
        for k in TERMS:
            w = getattr(self, k)
            self.need(w >= 0 and abs(w) != float("inf"), k, "must be a finite number >= 0")


class SftConfig(TrainConfig):
    """An SFT run: every `TrainConfig` key plus `weights` (see `SftWeights`)."""

    method: Literal["sft"] = "sft"
    weights: SftWeights = Field(default_factory=SftWeights)


def micro_step(model, mb: MicroBatch, *, weights: dict[str, float],
               backward_scale: float | None = None, chunk: int = 1024,
               kl_cache: KLCache | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Forward (and, with `backward_scale`, backward) of refusal CE + KL retain; the forward path
    is HARC's (same backbone call, fused LoRA, autocast), so the two agree to the last bit."""
    body, head = backbone(model), lm_head(model)
    h_base = kl_reference(model, mb, kl_cache)
    with no_input_cast(model), fused_lora(model):
        with autocast(model):
            last = body(input_ids=mb.ids, attention_mask=mb.mask, position_ids=mb.pos,
                        use_cache=False).last_hidden_state
        ce = head_refusal_ce(head, last[mb.ce_rows, mb.ce_cols], mb.ce_targets, chunk)
        kl = (head_kl_retain(head, last[mb.kl_rows, mb.kl_cols], h_base, chunk)
              if h_base is not None else last.new_zeros((), dtype=torch.float32))
        terms = backward_terms({"kl": kl, "ce": ce}, {k: weights[k] for k in TERMS},
                               backward_scale)
    return terms, {}


@register_method
class SftMethod(Method):
    name = "sft"
    Config: ClassVar[type[TrainConfig]] = SftConfig
    terms = TERMS

    def weights(self) -> dict[str, float]:
        return self.cfg.weights.model_dump()

    def micro_step(self, mb: MicroBatch, scale: float):
        return micro_step(self.model, mb, weights=self.weights(), backward_scale=scale,
                          chunk=self.cfg.logits_chunk, kl_cache=self.kl_cache)
