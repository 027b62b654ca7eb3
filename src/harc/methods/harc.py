"""HARC (HARC-METHOD §4-5): prompt- and response-side coupling of the harmfulness and refusal
directions, KL retain and refusal CE, with periodic direction refreshes and a K ramp.

One forward of the adapted model per micro-batch serves both couplings, KL and CE: in a causal
model the residuals at the prompt's t_inst / t_post inside (prompt + response) equal those of the
prompt alone. Logits are computed only where a loss reads them (see `harc.losses`).

Beyond the paper, opt-in keys (their defaults are the paper's, bit for bit): where harm is read,
a pseudo-harmful refusal margin and a larger on-policy pseudo-harmful retain set, response
coupling at several offsets and recovery from a harmful opening, a margin curriculum and
hard-example weighting, and the two controls of the compare harness (shuffled labels, a random
harmfulness direction). docs/results/improvements.md gives the design and the ablation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from harc.activations import ResidualCapture, masked_mean
from harc.directions import NAMES, Directions, extract_directions, prompt_projections
from harc.errors import HarcError
from harc.layers import ramp_k, select_layers
from harc.lora import adapter_disabled, fused_lora
from harc.losses import (
    head_kl_retain,
    head_refusal_ce,
    prompt_coupling,
    pseudo_refusal,
    read_projection,
    response_coupling,
)
from harc.methods.base import Method, register_method
from harc.methods.batching import Example, MicroBatch, encode_example
from harc.methods.config import TrainConfig
from harc.methods.data import prompts_of
from harc.methods.harc_config import HARM_READS, TERMS, HarcConfig, LossWeights
from harc.methods.harc_extras import (
    augment_pseudo,
    framed_rows,
    random_directions,
    read_direction,
    recovery_rows,
)
from harc.methods.step import (
    KLCache,
    autocast,
    backbone,
    kl_reference,
    lm_head,
    no_input_cast,
)
from harc.models import decoder_layers


@dataclasses.dataclass(frozen=True)
class Coupling:
    """How one micro-step couples (the opt-in keys of `HarcConfig`); the defaults are the paper's.

    label_perm: [B] row permutation of the labels in the coupling terms (shuffled-labels
    control); None keeps the true labels.
    """

    harm_read: str = "t_inst"
    read_temp: float = 0.1
    pseudo_margin: float = 0.1
    resp_offsets: tuple[int, ...] = (0,)
    n_resp_tokens: int = 32
    hard_frac: float = 1.0
    label_perm: Tensor | None = None


def _windows(mb: MicroBatch, offsets: Sequence[int], n: int) -> tuple[list[Tensor], Tensor]:
    """[B, T] masks of the `n`-token windows starting `offsets` target tokens into each row's
    response (clipped to its poolable tokens), and [W, B] whether each window is non-empty."""
    cols = torch.arange(mb.ids.shape[1], device=mb.ids.device).unsqueeze(0)
    lo, pool = mb.resp_col.unsqueeze(1), mb.resp_pool.unsqueeze(1)
    masks = [((cols >= lo + off) & (cols < lo + pool.clamp(max=off + n))).float()
             for off in offsets]
    return masks, torch.stack([mb.resp_pool > off for off in offsets])


def _read_mask(mb: MicroBatch, boundaries: bool) -> Tensor:
    """[B, T] bool: the user content (first user-content token to t_inst), or its boundary
    tokens and t_inst."""
    cols = torch.arange(mb.ids.shape[1], device=mb.ids.device).unsqueeze(0)
    inst = mb.inst_col.unsqueeze(1)
    if boundaries:
        if mb.boundary is None:
            raise HarcError("harm_read=boundaries needs rows encoded with their boundaries")
        return mb.boundary | (cols == inst)
    return (cols >= mb.user_col.unsqueeze(1)) & (cols <= inst)


@contextlib.contextmanager
def micro_loss(model, mb: MicroBatch, dirs: Directions, layers: Sequence[int], *, margin: float,
               weights: Mapping[str, float] | None = None, chunk: int = 1024,
               coupling: Coupling | None = None, kl_cache: KLCache | None = None
               ) -> Iterator[tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]]:
    """Forward of one micro-batch on the model's device; yields (loss, terms, proj).

    loss: the weighted total (0-d, with grad); terms: couple, couple_resp, kl, ce and every opt-in
    term with a positive weight (0-d float32, with grad); proj: [L, B] detached cosines
    "prompt_p_ref", "prompt_p_harm", "resp_p_ref", "resp_p_harm". Run the backward inside the
    with-block: the capture hooks, the fused LoRA and the input-cast setting stay in place until
    it ends, so that activation checkpointing recomputes the ops the forward ran (under
    transformers versions that checkpoint a block's `__call__`, the hooks are part of what it
    recomputes). `coupling` holds the opt-in coupling changes (default: the paper's coupling).
    """
    c = coupling or Coupling()
    w = dict(weights or LossWeights().active())
    body, head = backbone(model), lm_head(model)
    h_base = kl_reference(model, mb, kl_cache)
    rows = torch.arange(mb.ids.shape[0], device=mb.ids.device)
    kind = mb.kind if c.label_perm is None else mb.kind[c.label_perm.to(mb.kind.device)]
    is_harmful = mb.is_harmful if c.label_perm is None else kind == 0
    read = HARM_READS[c.harm_read]
    multi = tuple(c.resp_offsets) != (0,)
    windows, valid = _windows(mb, c.resp_offsets, c.n_resp_tokens) if multi else ([], None)
    idx = list(layers)
    v_read = {s: dirs.v_harm[s] for s in idx} if read else {}

    def reduce(slot: int, h: Tensor):
        with torch.autocast(h.device.type, enabled=False):  # float32 window mean
            resp = (torch.stack([masked_mean(h, m) for m in windows]) if multi
                    else masked_mean(h, mb.window))
            out = (h[rows, mb.inst_col], h[rows, mb.post_col], resp)
            if read:  # per-token harmfulness reading [B, T]
                out += (F.cosine_similarity(h.float(), v_read[slot], dim=-1, eps=1e-8),)
            return out

    with ResidualCapture(model, idx, reduce=reduce, detach=False) as cap, no_input_cast(model), \
            fused_lora(model):
        with autocast(model):
            last = body(input_ids=mb.ids, attention_mask=mb.mask, position_ids=mb.pos,
                        use_cache=False).last_hidden_state
        h_inst, h_post, h_resp = (torch.stack([cap.out[s][j] for s in idx]) for j in range(3))
        # Rows picked with Python ints and stacked: a list index would copy it to the GPU (a sync).
        v = {n: torch.stack([getattr(dirs, n)[s] for s in idx]) for n in NAMES}
        p_harm = None
        if read:
            p_tok = torch.stack([cap.out[s][3] for s in idx])  # [L, B, T]
            p_harm = read_projection(p_tok, _read_mask(mb, read[1]), read[0], c.read_temp)
        couple, pr, ph = prompt_coupling(h_inst, h_post, v["v_harm"], v["v_ref"], is_harmful,
                                         margin, p_harm=p_harm, hard_frac=c.hard_frac)
        couple_resp, rpr, rph = response_coupling(h_resp, v["v_harm_resp"], v["v_ref_resp"],
                                                  is_harmful, margin, valid=valid,
                                                  hard_frac=c.hard_frac)
        ce = head_refusal_ce(head, last[mb.ce_rows, mb.ce_cols], mb.ce_targets, chunk)
        kl = (head_kl_retain(head, last[mb.kl_rows, mb.kl_cols], h_base, chunk)
              if h_base is not None else last.new_zeros((), dtype=torch.float32))
        terms = {"couple": couple, "couple_resp": couple_resp, "kl": kl, "ce": ce}
        if w.get("pseudo_ref", 0.0) > 0:
            terms["pseudo_ref"] = pseudo_refusal(pr, kind == 2, c.pseudo_margin)
        proj = {"prompt_p_ref": pr.detach(), "prompt_p_harm": ph.detach(),
                "resp_p_ref": rpr.detach(), "resp_p_harm": rph.detach()}
        yield sum(w[k] * terms[k] for k in terms), terms, proj


def micro_step(model, mb: MicroBatch, dirs: Directions, layers: Sequence[int], *, margin: float,
               weights: Mapping[str, float] | None = None, backward_scale: float | None = None,
               chunk: int = 1024, coupling: Coupling | None = None,
               kl_cache: KLCache | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """`micro_loss`, and with `backward_scale` its backward (loss x scale). Returns (terms, proj);
    the terms keep their grad unless backward ran."""
    with micro_loss(model, mb, dirs, layers, margin=margin, weights=weights, chunk=chunk,
                    coupling=coupling, kl_cache=kl_cache) as (loss, terms, proj):
        if backward_scale is not None:
            if loss.requires_grad:
                (loss * backward_scale).backward()
            terms = {k: v.detach() for k, v in terms.items()}
    return terms, proj


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
            with adapter_disabled(model):
                directions = self.extract()
        directions.check_fits(model)
        made_with = directions.meta.get("chat_template")
        if made_with and made_with != chat.template_hash():
            raise HarcError("the directions were extracted with another chat template, raw_template "
                            "or system prompt than this config's; re-extract or match them")
        if self.reads_elsewhere:
            with adapter_disabled(model):
                directions = self.read_extracted(directions.to("cpu"), directions.v_harm)
        self.base_dirs = directions.to("cpu")
        self.dirs = self.base_dirs
        self.layers = self.select(self.dirs, 0)
        self._dev_dirs: tuple[Directions, Directions] | None = None
        self.terms = tuple(cfg.weights.active())
        self.step = 0  # optimizer steps done (margin curriculum, shuffled-label seeds)
        self._micro = 0  # micro-steps done within the current optimizer step
        self._random = (random_directions(self.base_dirs.n_slots, self.base_dirs.v_harm.shape[1],
                                          cfg.seed) if cfg.control == "random_direction" else None)

    @classmethod
    def needs_extraction_sets(cls, cfg: HarcConfig, directions) -> bool:
        return (directions is None and not cfg.directions) or cfg.refresh_every > 0

    @classmethod
    def encode(cls, cfg: HarcConfig, chat, rec: Mapping, kind: int) -> Example:
        return encode_example(chat, rec, kind, cfg.n_resp_tokens,
                              boundaries=cfg.harm_read == "boundaries")

    @classmethod
    def prepare_data(cls, cfg: HarcConfig, model, chat, data: Mapping[str, Sequence]) -> dict:
        """Framed harmful rows (`frame_harmful`), recovery rows (`recovery_tokens`), both made
        from the original harmful records, and on-policy pseudo-harmful variants
        (`pseudo_augment`, made by the base model); the data unchanged by default."""
        out = dict(data)
        harmful = list(out["harmful"])
        if cfg.frame_harmful:
            out["harmful"] = out["harmful"] + framed_rows(harmful, cfg.frame_harmful, cfg.seed)
        if cfg.recovery_tokens:
            out["harmful"] = out["harmful"] + recovery_rows(harmful, chat.tokenizer,
                                                            cfg.recovery_tokens)
        if cfg.pseudo_augment and out.get("pseudo"):
            with adapter_disabled(model):
                out["pseudo"] = list(out["pseudo"]) + augment_pseudo(
                    model, chat, out["pseudo"], cfg.pseudo_augment,
                    exclude=prompts_of(out.get("exclude", [])), seed=cfg.seed,
                    max_new_tokens=cfg.max_response_tokens, batch_size=cfg.extract_batch_size)
        return out

    def weights(self) -> dict[str, float]:
        return self.cfg.weights.active()

    @property
    def reads_elsewhere(self) -> bool:
        """Whether v_harm is (re-)extracted where `harm_read` reads it."""
        return self.cfg.harm_read != "t_inst" and self.cfg.read_extract

    def margin(self) -> float:
        """The harmful-side hinge margin at the current step (the curriculum, if any)."""
        c = self.cfg
        if c.margin_final is None:
            return c.margin
        return c.margin + (c.margin_final - c.margin) * min(1.0, self.step / c.margin_ramp)

    def coupling_dirs(self) -> Directions:
        """The directions the coupling reads: the current ones, or with the random-direction
        control's seeded unit vectors in place of v_harm and v_harm_resp."""
        if self._random is None:
            return self.dirs
        return dataclasses.replace(self.dirs, v_harm=self._random[0], v_harm_resp=self._random[1])

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
                n_boot=c.n_boot, seed=c.seed, world=self.world)
        finally:
            self.model.train(was_training)

    def read_extracted(self, dirs: Directions, seed: Tensor) -> Directions:
        """`dirs` with v_harm re-extracted at the positions `harm_read` reads, located with the
        direction `seed` ([S, d]) on the extraction prompts under the current model."""
        mode, boundaries = HARM_READS[self.cfg.harm_read]
        was_training = self.model.training
        self.model.eval()
        try:
            unit, norm = read_direction(
                self.model, self.chat, prompts_of(self.data["extract_harmful"]),
                prompts_of(self.data["extract_harmless"]), seed, mode=mode, boundaries=boundaries,
                temp=self.cfg.read_temp, batch_size=self.cfg.extract_batch_size)
        finally:
            self.model.train(was_training)
        # The bootstrap was of cos(v_ref, v_harm) at t_inst: it no longer describes v_harm.
        return dataclasses.replace(dirs, v_harm=unit, norms={**dirs.norms, "v_harm": norm},
                                   boot_cos=None, meta={**dirs.meta,
                                                        "harm_read": self.cfg.harm_read})

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
                                       batch_size=self.cfg.extract_batch_size, world=self.world)
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
        if self.reads_elsewhere:
            fresh = self.read_extracted(fresh, self.dirs.v_harm)
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
    def coupling(self, batch_size: int) -> Coupling:
        c = self.cfg
        perm = None
        if c.control == "shuffled_labels":
            # A function of (seed, step, micro-step): the same on resume, no state to keep.
            # The micro-batch's index in the step: rank r of N runs r, r + N, ... (harc.distributed).
            micro = self.world.rank + self._micro * self.world.size
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + self.step * 1_009 + micro)
            perm = torch.randperm(batch_size, generator=g)
        return Coupling(harm_read=c.harm_read, read_temp=c.read_temp,
                        pseudo_margin=c.pseudo_margin, resp_offsets=tuple(c.resp_offsets),
                        n_resp_tokens=c.n_resp_tokens, hard_frac=c.hard_frac, label_perm=perm)

    def _step_args(self, mb: MicroBatch) -> dict[str, Any]:
        """What `micro_loss` takes besides the model and the micro-batch (counts the micro-step)."""
        device = next(self.model.parameters()).device
        if self._dev_dirs is None or self._dev_dirs[0] is not self.dirs:
            self._dev_dirs = (self.dirs, self.coupling_dirs().to(device))
        coupling = self.coupling(mb.ids.shape[0])
        self._micro += 1
        return dict(dirs=self._dev_dirs[1], layers=self.layers, margin=self.margin(),
                    weights=self.weights(), chunk=self.cfg.logits_chunk, coupling=coupling,
                    kl_cache=self.kl_cache)

    def micro_step(self, mb: MicroBatch, scale: float):
        return micro_step(self.model, mb, backward_scale=scale, **self._step_args(mb))

    @contextlib.contextmanager
    def loss(self, mb: MicroBatch):
        with micro_loss(self.model, mb, **self._step_args(mb)) as (loss, terms, proj):
            yield loss, {k: v.detach() for k, v in terms.items()}, proj

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"layers": self.layers}
        if self.cfg.margin_final is not None:
            fields["margin"] = self.margin()
        return fields

    def on_start(self, out: Path) -> dict[str, Any]:
        self.base_dirs.save(out / "base_directions.safetensors")
        return {"layers": self.layers, "heldout": self.heldout_check()}

    def after_step(self, step: int, last: bool, status: Callable[[str], None]) -> list[dict]:
        c = self.cfg
        self.step, self._micro = step, 0
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
        return {"layers": self.layers, "step": self.step}

    def save(self, folder: Path) -> None:
        self.dirs.save(folder / "directions.safetensors")
        self.base_dirs.save(folder / "base_directions.safetensors")

    def load(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.base_dirs = Directions.load(folder / "base_directions.safetensors")
        self.dirs = Directions.load(folder / "directions.safetensors")
        self.layers = list(state["layers"])
        self.step, self._micro = int(state.get("step", 0)), 0

    def adapter_meta(self) -> dict[str, Any]:
        return {"layers": self.layers}
