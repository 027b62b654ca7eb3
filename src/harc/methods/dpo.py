"""DPO baseline (Rafailov et al. 2023): the model's refusal is preferred over the harmful
completion of the same prompt, with HARC's KL retain term on the harmless and pseudo-harmful rows.

Loss per pair, as trl's `DPOTrainer` (loss_type "sigmoid", no label smoothing) computes it:
    -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
with sequence log-probabilities summed over the response tokens (EOS included) and the mean over
pairs. The reference is the same weights with the adapter disabled (one copy in memory); one
no-grad forward of the whole micro-batch gives both the reference log-probabilities and the KL
reference. Each harmful example brings two rows: the refusal (kind harmful) and the completion
(kind rejected, see `harc.methods.batching`).

HARC followed by DPO (the reference release's second stage) is a DPO run on the model with the
HARC adapter merged in: `harc compare` does that for an entry with `init: <harc entry>`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from harc.chat import ChatFormat
from harc.config import Config
from harc.lora import adapter_disabled, fused_lora
from harc.losses import Head, head_kl_retain
from harc.methods.base import Method, register_method
from harc.methods.batching import REJECTED, Example, MicroBatch, encode_example
from harc.methods.config import TrainConfig
from harc.methods.step import autocast, backbone, backward_terms, lm_head, no_input_cast

TERMS = ("dpo", "kl", "reward_margin")


class DpoWeights(Config):
    """Weights of the total loss: dpo 1, kl 10 (HARC's KL weight)."""

    prefix: ClassVar[str] = "weights."

    dpo: float = 1.0
    kl: float = 10.0

    def check(self) -> None:
        for k in ("dpo", "kl"):
            w = getattr(self, k)
            self.need(w >= 0 and abs(w) != float("inf"), k, "must be a finite number >= 0")


class DpoConfig(TrainConfig):
    """A DPO run: every `TrainConfig` key plus the method's own.

    beta: inverse temperature of the DPO loss (the reference release's HARC + DPO stage: 0.1).
    weights: see `DpoWeights`.
    """

    method: Literal["dpo"] = "dpo"
    beta: float = 0.1
    weights: DpoWeights = Field(default_factory=DpoWeights)

    def check(self) -> None:
        super().check()
        self.need(0 < self.beta < float("inf"), "beta", "must be a positive finite number")


def dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor]:
    """(mean DPO loss, mean reward margin) over pairs of sequence log-probabilities [P]; the
    reward margin is beta * (chosen log-ratio - rejected log-ratio). Zeros for no pairs."""
    if pi_chosen.numel() == 0:
        zero = pi_chosen.new_zeros((), dtype=torch.float32)
        return zero, zero
    margin = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach().mean()


def _logp_chunk(head: Head, h: Tensor, targets: Tensor) -> Tensor:
    return head(h).float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def token_logps(head: Head, h: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
    """log p(target) at each of N positions from hidden states [N, d], `chunk` positions of
    full-vocabulary logits at a time (recomputed in backward instead of kept)."""
    out = []
    for i in range(0, h.shape[0], chunk):
        args = (head, h[i: i + chunk], targets[i: i + chunk])
        if torch.is_grad_enabled() and h.requires_grad:
            out.append(checkpoint(_logp_chunk, *args, use_reentrant=False,
                                  preserve_rng_state=False))
        else:
            out.append(_logp_chunk(*args))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def sequence_logps(head: Head, last: Tensor, rows: Tensor, cols: Tensor, targets: Tensor,
                   n_rows: int, chunk: int = 1024) -> Tensor:
    """[n_rows] sums of the target log-probabilities of each row's response positions."""
    lp = token_logps(head, last[rows, cols], targets, chunk)
    return lp.new_zeros(n_rows).index_add(0, rows, lp)


def micro_step(model, mb: MicroBatch, *, beta: float, weights: dict[str, float],
               backward_scale: float | None = None, chunk: int = 1024
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Forward (and, with `backward_scale`, backward) of DPO + KL retain on one micro-batch."""
    body, head = backbone(model), lm_head(model)
    B = mb.ids.shape[0]
    chosen, rejected = mb.pairs[:, 0], mb.pairs[:, 1]
    inputs = dict(input_ids=mb.ids, attention_mask=mb.mask, position_ids=mb.pos, use_cache=False)
    with torch.no_grad(), adapter_disabled(model), autocast(model):
        ref = body(**inputs).last_hidden_state
        ref_c = sequence_logps(head, ref, mb.ce_rows, mb.ce_cols, mb.ce_targets, B, chunk)
        ref_r = sequence_logps(head, ref, mb.rej_rows, mb.rej_cols, mb.rej_targets, B, chunk)
        h_base = ref[mb.kl_rows, mb.kl_cols]
    with no_input_cast(model), fused_lora(model):
        with autocast(model):
            last = body(**inputs).last_hidden_state
        pi_c = sequence_logps(head, last, mb.ce_rows, mb.ce_cols, mb.ce_targets, B, chunk)
        pi_r = sequence_logps(head, last, mb.rej_rows, mb.rej_cols, mb.rej_targets, B, chunk)
        dpo, margin = dpo_loss(pi_c[chosen], pi_r[rejected], ref_c[chosen], ref_r[rejected], beta)
        kl = head_kl_retain(head, last[mb.kl_rows, mb.kl_cols], h_base, chunk)
        terms = backward_terms({"dpo": dpo, "kl": kl, "reward_margin": margin},
                               {"dpo": weights["dpo"], "kl": weights["kl"]}, backward_scale)
    return terms, {}


@register_method
class DpoMethod(Method):
    name = "dpo"
    Config: ClassVar[type[TrainConfig]] = DpoConfig
    terms = TERMS
    harmful_fields = ("prompt", "refusal", "completion")

    @classmethod
    def encode(cls, cfg: TrainConfig, chat: ChatFormat, rec, kind: int) -> Example:
        ex = encode_example(chat, rec, kind)
        if kind != 0:
            return ex
        rej = encode_example(chat, rec, REJECTED, target="completion")
        return Example(ex.enc, ex.kind, ex.window, rejected=rej)

    def weights(self) -> dict[str, float]:
        return self.cfg.weights.model_dump()

    def micro_step(self, mb: MicroBatch, scale: float):
        return micro_step(self.model, mb, beta=self.cfg.beta, weights=self.weights(),
                          backward_scale=scale, chunk=self.cfg.logits_chunk)
