"""Circuit breakers by representation rerouting (RR; Zou et al. 2024, arXiv 2406.04313).

At the chosen slots (residual entering a block, as everywhere in harc), with `h` the adapted
model's residual and `h0` the same weights' with the adapter disabled:
- rerouting, on harmful rows (prompt + harmful completion): mean over (slot, token) of
  relu(cos(h, h0)): harmful representations are pushed orthogonal to where they were;
- retain, on harmless and pseudo-harmful rows (prompt + answer): mean over (slot, token) of
  ||h - h0||_2: benign representations stay put.
Means run over real (non-padding) tokens of the whole sequence, prompt and response, as in the
reference code; its retain term also divides by padding positions, which makes it depend on the
batch's padding, so here the mean is over real tokens only. Total at optimizer step t of T:
c_rr * rerouting + c_retain * retain with c_rr = alpha (1 - t / 2T), c_retain = alpha t / 2T
(Algorithm 1 of the paper). Both forwards stop after the deepest chosen slot.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from harc.activations import ResidualCapture
from harc.chat import ChatFormat
from harc.errors import HarcError
from harc.lora import adapter_disabled, fused_lora
from harc.methods.base import Method, register_method
from harc.methods.batching import Example, MicroBatch, encode_example
from harc.methods.config import TrainConfig
from harc.methods.step import autocast, backbone, backward_terms, no_input_cast
from harc.models import decoder_layers

TERMS = ("reroute", "retain")
# The paper's Llama-3-8B layers (10 and 20 of 32 blocks), scaled to other depths.
PAPER_LAYERS, PAPER_DEPTH = (10, 20), 32


class CircuitBreakersConfig(TrainConfig):
    """A circuit-breakers (RR) run: every `TrainConfig` key plus the method's own.

    layers: slots whose residuals are rerouted and retained (null: the paper's 10 and 20 of 32
        blocks, scaled to the model's depth).
    cb_alpha: alpha of the coefficient schedule (the reference code's lorra_alpha, 10).
    """

    method: Literal["circuit_breakers"] = "circuit_breakers"
    layers: list[int] | None = None
    cb_alpha: float = 10.0

    def check(self) -> None:
        super().check()
        self.need(0 < self.cb_alpha < float("inf"), "cb_alpha", "must be a positive finite number")
        self.need(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0),
                  "layers", "must be null or a non-empty list of slot indices")


def default_layers(n_layers: int) -> list[int]:
    """The paper's slots scaled to a model of `n_layers` blocks (distinct, within 1..n)."""
    return sorted({min(max(round(s * n_layers / PAPER_DEPTH), 1), n_layers) for s in PAPER_LAYERS})


def coefficients(step: int, total: int, alpha: float) -> dict[str, float]:
    """The schedule at optimizer step `step` (0-based) of `total`: c_rr, c_retain."""
    frac = step / (2 * total)
    return {"reroute": alpha * (1 - frac), "retain": alpha * frac}


def rerouting_loss(h: Tensor, h0: Tensor, mask: Tensor) -> Tensor:
    """Mean over (slot, real token) of relu(cos(h, h0)); h, h0 are [L, N, T, d], mask [N, T]."""
    m = mask.to(h.device, torch.float32)
    if m.sum() == 0:
        return h.new_zeros((), dtype=torch.float32)
    cos = F.cosine_similarity(h.float(), h0.float(), dim=-1, eps=1e-8)
    return (F.relu(cos) * m).sum() / (m.sum() * h.shape[0])


def retain_loss(h: Tensor, h0: Tensor, mask: Tensor) -> Tensor:
    """Mean over (slot, real token) of ||h - h0||_2; h, h0 are [L, N, T, d], mask [N, T]."""
    m = mask.to(h.device, torch.float32)
    if m.sum() == 0:
        return h.new_zeros((), dtype=torch.float32)
    return ((h.float() - h0.float()).norm(dim=-1) * m).sum() / (m.sum() * h.shape[0])


def micro_step(model, mb: MicroBatch, layers: Sequence[int], *, coeffs: Mapping[str, float],
               backward_scale: float | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Forward (and, with `backward_scale`, backward) of rerouting + retain on one micro-batch."""
    body, idx = backbone(model), sorted(layers)
    inputs = dict(input_ids=mb.ids, attention_mask=mb.mask, position_ids=mb.pos)
    with torch.no_grad(), adapter_disabled(model), autocast(model):
        out = ResidualCapture(model, idx, stop_early=True).run(body, **inputs)
        h0 = torch.stack([out[s] for s in idx])
    harmful, retain = mb.is_harmful, mb.retain_rows
    with no_input_cast(model), fused_lora(model):
        with autocast(model):
            out = ResidualCapture(model, idx, detach=False, stop_early=True).run(body, **inputs)
        h = torch.stack([out[s] for s in idx])
        terms = backward_terms(
            {"reroute": rerouting_loss(h[:, harmful], h0[:, harmful], mb.mask[harmful]),
             "retain": retain_loss(h[:, retain], h0[:, retain], mb.mask[retain])},
            {k: coeffs[k] for k in TERMS}, backward_scale)
    return terms, {}


@register_method
class CircuitBreakersMethod(Method):
    name = "circuit_breakers"
    Config: ClassVar[type[TrainConfig]] = CircuitBreakersConfig
    terms = TERMS
    harmful_fields = ("prompt", "completion")

    def __init__(self, cfg: CircuitBreakersConfig, model, chat, data, *, directions=None):
        super().__init__(cfg, model, chat, data)
        n = len(decoder_layers(model))
        self.layers = sorted(cfg.layers) if cfg.layers is not None else default_layers(n)
        if max(self.layers) > n:
            raise HarcError(f"config key 'layers': slots must lie in 0..{n}")
        self.t = 0  # optimizer steps done: the schedule's t

    @classmethod
    def encode(cls, cfg: TrainConfig, chat: ChatFormat, rec, kind: int) -> Example:
        return encode_example(chat, rec, kind, target="completion" if kind == 0 else None)

    def weights(self) -> dict[str, float]:
        return coefficients(self.t, self.cfg.steps, self.cfg.cb_alpha)

    def micro_step(self, mb: MicroBatch, scale: float):
        return micro_step(self.model, mb, self.layers, coeffs=self.weights(), backward_scale=scale)

    def log_fields(self) -> dict[str, Any]:
        return {"layers": self.layers, "coeffs": self.weights()}

    def after_step(self, step: int, last: bool, status: Callable[[str], None]) -> list[dict]:
        self.t = step
        return []

    def state(self) -> dict[str, Any]:
        return {"t": self.t}

    def load(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])

    def adapter_meta(self) -> dict[str, Any]:
        return {"layers": self.layers}
