"""Runtime latent guard: an output guard that reads the model's own response-side harmfulness
while it generates, and stops with a refusal when it crosses a threshold.

At the plane layer, after each generated token, the guard takes the mean residual of the response
so far (v_harm_resp is a difference of such means over the first response tokens, §2) and its
cosine with v_harm_resp; from `min_tokens` tokens on, a cosine above the threshold stops the row
and its text becomes `replacement`. The threshold is calibrated on validation pairs, the
synthetic (prompt, harmful opening) pairs against (prompt, benign answer) pairs, never on an
evaluation set: each pair is scored by the largest such cosine over its response, teacher-forced,
which is what the guard would have seen, and the cut that best separates the two sides is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from harc.activations import ResidualCapture
from harc.chat import left_pad
from harc.errors import HarcError
from harc.eval.filters.base import Filter, Generate, PolicyContext, in_range, register_filter
from harc.eval.judges.latent import fit_threshold

REFUSAL = "I'm sorry, but I can't help with that."


class LatentMonitor:
    """The guard's state over one generate call: the running response sum of each row."""

    def __init__(self, v: Tensor, slot: int, threshold: float, min_tokens: int, replacement: str):
        self.v, self.slot, self.threshold = v, slot, threshold
        self.min_tokens, self.replacement = min_tokens, replacement
        self.sums: Tensor | None = None
        self.counts: Tensor | None = None

    def _grow(self, n: int, like: Tensor) -> None:
        if self.sums is None or self.sums.shape[0] < n:
            sums = like.new_zeros(n, like.shape[-1], dtype=torch.float32)
            counts = like.new_zeros(n, dtype=torch.long)
            if self.sums is not None:
                sums[: self.sums.shape[0]] = self.sums
                counts[: self.counts.shape[0]] = self.counts
            self.sums, self.counts = sums, counts

    def __call__(self, h: Tensor, rows: list[int]) -> Tensor:
        idx = torch.as_tensor(rows, device=h.device)
        self._grow(int(idx.max()) + 1, h)
        self.sums[idx] += h.float()
        self.counts[idx] += 1
        cos = F.cosine_similarity(self.sums[idx], self.v.to(h.device)[None], dim=-1)
        return (self.counts[idx] >= self.min_tokens) & (cos > self.threshold)


@torch.no_grad()
def running_scores(model, chat, pairs: Sequence[tuple[str, str]], v: Tensor, slot: int,
                   min_tokens: int, batch_size: int = 16) -> list[float]:
    """Per teacher-forced (prompt, response) pair: the largest cosine with `v` of the running
    response mean at `slot`, from `min_tokens` tokens on (over the whole response if shorter)."""
    dev = next(model.parameters()).device
    cap = ResidualCapture(model, [slot], stop_early=True)
    out = []
    for s in range(0, len(pairs), batch_size):
        encs = [chat.encode_pair(p, r, add_eos=False) for p, r in pairs[s: s + batch_size]]
        ids, mask, pos = left_pad([e.ids for e in encs], chat.tokenizer.pad_token_id, dev)
        h = cap.run(model, input_ids=ids, attention_mask=mask, position_ids=pos)[slot].float()
        T = ids.shape[1]
        for i, e in enumerate(encs):
            start = T - len(e.ids) + e.resp_start
            run = h[i, start: start + e.resp_len].cumsum(0)
            cos = F.cosine_similarity(run, v.to(dev)[None], dim=-1)
            out.append(float(cos[min(min_tokens, e.resp_len) - 1:].max()))
    return out


@register_filter
class LatentGuard(Filter):
    name = "latent_guard"
    needs_directions = True

    class Config(Filter.Config):
        threshold: float | None = None  # a cosine; null: calibrated on validation pairs
        min_tokens: int = 4  # response tokens before the guard may stop a row
        replacement: str = REFUSAL

        def check(self) -> None:
            in_range(self, "threshold", -1.0, 1.0)
            self.need(1 <= self.min_tokens <= 256, "min_tokens", "must lie in [1, 256]")

    def bind(self, ctx: PolicyContext) -> LatentGuard:
        super().bind(ctx)
        self.slot = ctx.layer
        self.v = ctx.dirs.v_harm_resp[self.slot].float()
        self.threshold = self.config.threshold
        if self.threshold is None:
            harm, benign = list(ctx.harmful_openings), list(ctx.benign_answers)
            if not harm or not benign:
                raise HarcError("policy layer 'latent_guard' calibrates on validation (prompt, "
                                "harmful opening) and (prompt, benign answer) pairs and got none; "
                                "give threshold=")
            scores = running_scores(ctx.model, ctx.chat, harm + benign, self.v, self.slot,
                                    self.config.min_tokens, ctx.batch_size)
            labels = [True] * len(harm) + [False] * len(benign)
            self.threshold = fit_threshold(scores, labels)
            hs, bs = scores[: len(harm)], scores[len(harm):]
            self.calibration = {
                "threshold": self.threshold, "layer": self.slot, "n": [len(harm), len(benign)],
                "rule": "best accuracy: synthetic harmful openings vs benign answers",
                "val_harmful_stopped": sum(x > self.threshold for x in hs) / len(hs),
                "val_benign_stopped": sum(x > self.threshold for x in bs) / len(bs)}
        return self

    def monitor(self) -> LatentMonitor:
        return LatentMonitor(self.v, self.slot, self.threshold, self.config.min_tokens,
                             self.config.replacement)

    def respond(self, generate: Generate, prompts: list[str], prefills: list[str | None],
                steer) -> list[str]:
        return generate(prompts, prefills, steer, monitor=self.monitor())

    def check_output(self, prompts: Sequence[str], responses: Sequence[str]) -> list[bool]:
        """The guard's decision on finished responses (teacher-forced): what a server that cannot
        watch its decoder applies after generation. True: the response crossed the threshold."""
        c = self.ctx
        keep = [i for i, r in enumerate(responses) if r.strip()]
        scores = running_scores(c.model, c.chat, [(prompts[i], responses[i]) for i in keep],
                                self.v, self.slot, self.config.min_tokens, c.batch_size)
        out = [False] * len(responses)
        for i, x in zip(keep, scores, strict=True):
            out[i] = x > self.threshold
        return out
