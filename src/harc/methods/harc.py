"""HARC (HARC-METHOD §4-5): prompt- and response-side coupling of the harmfulness and refusal
directions, KL retain and refusal CE, with periodic direction refreshes and a K ramp.

One forward of the adapted model per micro-batch serves both couplings, KL and CE: in a causal
model the residuals at the prompt's t_inst / t_post inside (prompt + response) equal those of the
prompt alone. Logits are computed only where a loss reads them (see `harc.losses`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor

from harc.activations import ResidualCapture, masked_mean
from harc.config import Config
from harc.directions import NAMES, Directions, extract_directions, prompt_projections
from harc.errors import HarcError
from harc.layers import SCORES, ramp_k, select_layers
from harc.lora import fused_lora
from harc.losses import head_kl_retain, head_refusal_ce, prompt_coupling, response_coupling
from harc.methods.base import Method, register_method
from harc.methods.batching import MicroBatch
from harc.methods.config import TrainConfig
from harc.methods.data import prompts_of
from harc.methods.step import autocast, backbone, kl_reference, lm_head, no_input_cast
from harc.models import decoder_layers

TERMS = ("couple", "couple_resp", "kl", "ce")


class LossWeights(Config):
    """Weights of the total loss (§4): couple 1, couple_resp 1, kl 10, ce 1."""

    prefix: ClassVar[str] = "weights."

    couple: float = 1.0
    couple_resp: float = 1.0
    kl: float = 10.0
    ce: float = 1.0

    def check(self) -> None:
        for k in TERMS:
            w = getattr(self, k)
            self.need(w >= 0 and w == w and abs(w) != float("inf"), k,
                      "must be a finite number >= 0")


class HarcConfig(TrainConfig):
    """A HARC run: every `TrainConfig` key plus the method's own.

    directions: optional `harc extract` output used as the base directions; null extracts them
        at the start from `data.extract_*`.
    weights: see `LossWeights`.
    margin: hinge margin m of the coupling losses, 0 < m <= 1 (released 0.5; reference code 0.3).
    n_resp_tokens: response window of the response coupling (§1: 32 tokens).
    refresh_every: re-extract and blend the directions every this many steps (0: never).
    beta: blend weight of the fresh directions: normalize((1-beta) v_base + beta v_fresh).
    n_boot: bootstrap resamples of cos(v_ref, v_harm) at each extraction (0: none).
    k_start / k_final / ramp_step: K selected layers before / from optimizer step `ramp_step`.
    layer_score: "variant_d" (reference code) or "legacy" (hyper-parameter notes).
    band: [low, high_offset]: only slots low <= l <= n_layers - high_offset are eligible.
    layers: fixed slot list; disables selection and the K ramp. null: select.
    """

    method: Literal["harc"] = "harc"
    directions: str | None = None
    weights: LossWeights = Field(default_factory=LossWeights)
    margin: float = 0.5
    n_resp_tokens: int = 32
    refresh_every: int = 200
    beta: float = 0.3
    n_boot: int = 100
    k_start: int = 2
    k_final: int = 4
    ramp_step: int = 1000
    layer_score: str = "variant_d"
    band: tuple[int, int] = (4, 4)
    layers: list[int] | None = None

    def check(self) -> None:
        super().check()
        need = self.need
        need(0 < self.margin <= 1, "margin", "must satisfy 0 < margin <= 1")
        need(self.n_resp_tokens > 0, "n_resp_tokens", "must be positive")
        need(self.refresh_every >= 0, "refresh_every", "must be >= 0 (0: never)")
        need(0 <= self.beta <= 1, "beta", "must lie in [0, 1]")
        need(self.n_boot >= 0, "n_boot", "must be >= 0")
        need(self.k_start >= 1, "k_start", "must be >= 1")
        need(self.k_final >= 1, "k_final", "must be >= 1")
        need(self.ramp_step >= 0, "ramp_step", "must be >= 0")
        need(self.layer_score in SCORES, "layer_score", f"must be one of {SCORES}")
        need(min(self.band) >= 0, "band", "must be [low, high_offset] >= 0")
        need(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0), "layers",
             "must be null or a non-empty list of slot indices")


def micro_step(model, mb: MicroBatch, dirs: Directions, layers: Sequence[int], *, margin: float,
               weights: Mapping[str, float] | None = None, backward_scale: float | None = None,
               chunk: int = 1024) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Forward (and, with `backward_scale`, backward) of one micro-batch on the model's device.

    Returns (terms, proj): terms has couple, couple_resp, kl, ce (0-d float32; with grad unless
    backward ran); proj holds [L, B] cosines "prompt_p_ref", "prompt_p_harm", "resp_p_ref",
    "resp_p_harm". The backward runs while the capture hooks are still registered: under
    transformers versions that checkpoint a block's `__call__`, the hooks are part of what the
    backward pass recomputes.
    """
    body, head = backbone(model), lm_head(model)
    h_base = kl_reference(model, mb)
    rows = torch.arange(mb.ids.shape[0], device=mb.ids.device)

    def reduce(_slot: int, h: Tensor):
        with torch.autocast(h.device.type, enabled=False):  # float32 window mean
            return h[rows, mb.inst_col], h[rows, mb.post_col], masked_mean(h, mb.window)

    idx = list(layers)
    with ResidualCapture(model, idx, reduce=reduce, detach=False) as cap, no_input_cast(model), \
            fused_lora(model):
        with autocast(model):
            last = body(input_ids=mb.ids, attention_mask=mb.mask, position_ids=mb.pos,
                        use_cache=False).last_hidden_state
        h_inst, h_post, h_resp = (torch.stack([cap.out[s][j] for s in idx]) for j in range(3))
        # Rows picked with Python ints and stacked: a list index would copy it to the GPU (a sync).
        v = {n: torch.stack([getattr(dirs, n)[s] for s in idx]) for n in NAMES}
        couple, pr, ph = prompt_coupling(h_inst, h_post, v["v_harm"], v["v_ref"], mb.is_harmful,
                                         margin)
        couple_resp, rpr, rph = response_coupling(h_resp, v["v_harm_resp"], v["v_ref_resp"],
                                                  mb.is_harmful, margin)
        ce = head_refusal_ce(head, last[mb.ce_rows, mb.ce_cols], mb.ce_targets, chunk)
        kl = (head_kl_retain(head, last[mb.kl_rows, mb.kl_cols], h_base, chunk)
              if h_base is not None else last.new_zeros((), dtype=torch.float32))
        terms = {"couple": couple, "couple_resp": couple_resp, "kl": kl, "ce": ce}
        if backward_scale is not None:
            w = weights or LossWeights().model_dump()
            loss = sum(w[k] * terms[k] for k in TERMS) * backward_scale
            if loss.requires_grad:
                loss.backward()
            terms = {k: v.detach() for k, v in terms.items()}
    proj = {"prompt_p_ref": pr.detach(), "prompt_p_harm": ph.detach(),
            "resp_p_ref": rpr.detach(), "resp_p_harm": rph.detach()}
    return terms, proj


@contextlib.contextmanager
def base_only(model):
    """The model without its adapter (a no-op before one is attached)."""
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with ctx:
        yield


@register_method
class HarcMethod(Method):
    name = "harc"
    Config: ClassVar[type[TrainConfig]] = HarcConfig
    terms = TERMS

    def __init__(self, cfg: HarcConfig, model, chat, data, *, directions: Directions | None = None):
        super().__init__(cfg, model, chat, data)
        n_slots = len(decoder_layers(model)) + 1
        if cfg.layers is not None and max(cfg.layers) >= n_slots:
            raise HarcError(f"config key 'layers': slots must lie in 0..{n_slots - 1}")
        if directions is None and cfg.directions:
            directions = Directions.load(cfg.directions, model)
        if directions is None:
            with base_only(model):
                directions = self.extract()
        directions.check_fits(model)
        made_with = directions.meta.get("chat_template")
        if made_with and made_with != chat.template_hash():
            raise HarcError("the directions were extracted with another chat template, raw_template "
                            "or system prompt than this config's; re-extract or match them")
        self.base_dirs = directions.to("cpu")
        self.dirs = self.base_dirs
        self.layers = self.select(self.dirs, 0)
        self._dev_dirs: tuple[Directions, Directions] | None = None

    @classmethod
    def needs_extraction_sets(cls, cfg: HarcConfig, directions) -> bool:
        return (directions is None and not cfg.directions) or cfg.refresh_every > 0

    def weights(self) -> dict[str, float]:
        return self.cfg.weights.model_dump()

    # ---- directions and layers
    def extract(self) -> Directions:
        d, c = self.data, self.cfg
        was_training = self.model.training
        self.model.eval()
        try:
            h_resp = d["extract_harmful_resp"]
            return extract_directions(
                self.model, self.chat, harmful=prompts_of(d["extract_harmful"]),
                harmless=prompts_of(d["extract_harmless"]),
                harmful_completions=[(r["prompt"], r["completion"]) for r in h_resp],
                refusals=[(r["prompt"], r["refusal"]) for r in h_resp],
                helpful=[(r["prompt"], r["response"]) for r in d["extract_harmless_resp"]],
                n_resp_tokens=c.n_resp_tokens, batch_size=c.extract_batch_size,
                n_boot=c.n_boot, seed=c.seed)
        finally:
            self.model.train(was_training)

    def select(self, dirs: Directions, step: int) -> list[int]:
        c = self.cfg
        if c.layers is not None:
            return sorted(c.layers)
        try:
            return select_layers(dirs, ramp_k(step, c.k_start, c.k_final, c.ramp_step),
                                 c.layer_score, c.band[0], c.band[1])
        except ValueError as e:
            raise HarcError(f"layer selection: {e}") from e

    @torch.no_grad()
    def heldout_check(self, dirs: Directions | None = None, layers=None) -> dict:
        """Mean cos(h(t_inst), v_harm) and cos(h(t_post), v_ref) of held-out harmful vs harmless
        prompts on the selected layers: the gap should stay (or grow) positive."""
        dirs, layers = dirs or self.dirs, layers or self.layers
        out = {}
        for side in ("harmful", "harmless"):
            prompts = prompts_of(self.data.get(f"val_{side}", []))
            if not prompts:
                return {}
            was = self.model.training
            self.model.eval()
            try:
                p = prompt_projections(self.model, self.chat, prompts, dirs, slots=layers,
                                       batch_size=self.cfg.extract_batch_size)
            finally:
                self.model.train(was)
            out[side] = {"p_harm": p[..., 0].mean(0).tolist(), "p_ref": p[..., 1].mean(0).tolist()}
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        out["gap_harm"] = mean(out["harmful"]["p_harm"]) - mean(out["harmless"]["p_harm"])
        out["gap_ref"] = mean(out["harmful"]["p_ref"]) - mean(out["harmless"]["p_ref"])
        return out

    def refresh(self, step: int) -> dict:
        """Re-extract with the current adapter, blend against the base, re-select layers (§5)."""
        t0 = time.perf_counter()
        fresh = self.extract()
        new = self.base_dirs.blend(fresh, self.cfg.beta)
        new.meta = {**self.base_dirs.meta, "blend_beta": self.cfg.beta, "refreshed_at": step}
        layers = self.select(new, step)
        mean, lo, hi = fresh.bootstrap_interval()
        sel = layers

        def cos_mean(a: Directions, b: Directions, name: str) -> float:
            return float((getattr(a, name)[sel] * getattr(b, name)[sel]).sum(-1).mean())

        rec = {
            "event": "refresh", "step": step, "old_layers": self.layers, "layers": layers,
            "drift_fresh_vs_base": {n: cos_mean(fresh, self.base_dirs, n) for n in NAMES},
            "drift_new_vs_previous": {n: cos_mean(new, self.dirs, n) for n in NAMES},
            "cos_ref_harm_boot": {"layers": sel, "mean": mean[sel].tolist(),
                                  "lo": lo[sel].tolist(), "hi": hi[sel].tolist()},
        }
        self.dirs, self.layers = new, layers
        rec["heldout"] = self.heldout_check()
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        return rec

    # ---- the step
    def micro_step(self, mb: MicroBatch, scale: float):
        device = next(self.model.parameters()).device
        if self._dev_dirs is None or self._dev_dirs[0] is not self.dirs:
            self._dev_dirs = (self.dirs, self.dirs.to(device))
        return micro_step(self.model, mb, self._dev_dirs[1], self.layers, margin=self.cfg.margin,
                          weights=self.weights(), backward_scale=scale,
                          chunk=self.cfg.logits_chunk)

    def log_fields(self) -> dict[str, Any]:
        return {"layers": self.layers}

    def on_start(self, out: Path) -> dict[str, Any]:
        self.base_dirs.save(out / "base_directions.safetensors")
        return {"layers": self.layers, "heldout": self.heldout_check()}

    def after_step(self, step: int, last: bool, status: Callable[[str], None]) -> list[dict]:
        c = self.cfg
        if c.refresh_every and step % c.refresh_every == 0 and not last:
            status("refreshing directions")
            rec = self.refresh(step)
            status("")
            return [rec]
        k = ramp_k(step, c.k_start, c.k_final, c.ramp_step)
        if c.layers is None and k != len(self.layers):
            old, self.layers = self.layers, self.select(self.dirs, step)
            return [{"event": "ramp", "step": step, "old_layers": old, "layers": self.layers}]
        return []

    def on_end(self, out: Path) -> dict[str, Any]:
        self.dirs.save(out / "directions.safetensors")
        return {"layers": self.layers, "heldout": self.heldout_check()}

    def state(self) -> dict[str, Any]:
        return {"layers": self.layers}

    def save(self, folder: Path) -> None:
        self.dirs.save(folder / "directions.safetensors")
        self.base_dirs.save(folder / "base_directions.safetensors")

    def load(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.base_dirs = Directions.load(folder / "base_directions.safetensors")
        self.dirs = Directions.load(folder / "directions.safetensors")
        self.layers = list(state["layers"])

    def adapter_meta(self) -> dict[str, Any]:
        return {"layers": self.layers}
