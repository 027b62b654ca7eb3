"""Perplexity filter (Jain et al. 2023, "Baseline Defenses for Adversarial Attacks Against Aligned
Language Models"): block prompts whose log-perplexity under the guarded model exceeds a threshold.

The score of a prompt is the mean negative log-likelihood (nats per token) of its user-content
tokens inside the chat-rendered prompt, or, with `window`, the largest such mean over windows of
that many consecutive tokens (the paper's windowed variant, which catches an adversarial suffix in
a long natural prompt). By default the threshold is the largest score of the validation harmless
prompts, so that every one of them passes, as the paper sets it on prompts it must let through.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harc.chat import left_pad
from harc.errors import HarcError
from harc.eval.filters.base import Filter, PolicyContext, in_range, register_filter
from harc.models import unwrap


@torch.no_grad()
def content_nll(model, chat, prompts: Sequence[str], batch_size: int = 16,
                chunk: int = 2048) -> list[Tensor]:
    """Per prompt, the [n] negative log-likelihoods of its user-content tokens (the first one
    is predicted from the template head); logits only at those positions, `chunk` at a time."""
    base = unwrap(model)
    body, head = base.base_model, base.get_output_embeddings()
    cap = getattr(base.config, "final_logit_softcapping", None)
    dev = next(model.parameters()).device
    out: list[Tensor] = []
    for s in range(0, len(prompts), batch_size):
        encs = [chat.encode_prompt(p) for p in prompts[s: s + batch_size]]
        ids, mask, pos = left_pad(encs, chat.tokenizer.pad_token_id, dev)
        h = body(input_ids=ids, attention_mask=mask, position_ids=pos,
                 use_cache=False).last_hidden_state
        T = ids.shape[1]
        rows, cols = [], []
        for i, e in enumerate(encs):
            start, end = T - len(e) + chat.head_len, T - chat.tail_len  # content tokens
            rows += [i] * (end - start)
            cols += list(range(start - 1, end - 1))  # the positions that predict them
        r, c = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
        nll = []
        for j in range(0, len(rows), chunk):
            logits = head(h[r[j: j + chunk], c[j: j + chunk]]).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            nll.append(F.cross_entropy(logits, ids[r[j: j + chunk], c[j: j + chunk] + 1],
                                       reduction="none"))
        flat = torch.cat(nll).cpu()
        sizes = [len(e) - chat.head_len - chat.tail_len for e in encs]
        out += list(flat.split(sizes))
    return out


def log_perplexity(nll: Tensor, window: int | None = None) -> float:
    """Mean NLL, or the largest mean over `window` consecutive tokens (the whole prompt when it is
    shorter than the window)."""
    if window is None or len(nll) <= window:
        return float(nll.mean())
    return float(nll.unfold(0, window, 1).mean(1).max())


@register_filter
class PerplexityFilter(Filter):
    name = "perplexity"

    class Config(Filter.Config):
        threshold: float | None = None  # log-perplexity, nats/token; null: calibrated
        window: int | None = None  # tokens per window (the windowed variant); null: whole prompt

        def check(self) -> None:
            in_range(self, "threshold", 1e-6, 100.0)
            self.need(self.window is None or self.window >= 2, "window", "must be >= 2 or null")

    def bind(self, ctx: PolicyContext) -> PerplexityFilter:
        super().bind(ctx)
        self.threshold = self.config.threshold
        if self.threshold is None:
            harmless = self.scores(ctx.val_harmless)
            if not harmless:
                raise HarcError("policy layer 'perplexity' calibrates on validation harmless "
                                "prompts and got none; give threshold=")
            harmful = self.scores(ctx.val_harmful)
            self.threshold = max(harmless)
            self.calibration = {
                "threshold": self.threshold, "rule": "max over validation harmless prompts",
                "window": self.config.window, "n": [len(harmful), len(harmless)],
                "val_harmful_blocked": sum(x > self.threshold for x in harmful) / max(len(harmful), 1),
                "val_harmless_mean": sum(harmless) / len(harmless)}
        return self

    def scores(self, prompts: Sequence[str]) -> list[float]:
        c = self.ctx
        nll = content_nll(c.model, c.chat, list(prompts), c.batch_size)
        return [log_perplexity(x, self.config.window) for x in nll]

    def flags(self, prompts: Sequence[str]) -> list[bool]:
        return [s > self.threshold for s in self.scores(prompts)]
