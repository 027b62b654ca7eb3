"""The HARC method's config: the paper's keys (HARC-METHOD §4-5) and the opt-in improvements,
whose defaults are the paper's (docs/results/improvements.md)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from harc.config import Config
from harc.layers import SCORES
from harc.methods.config import TrainConfig
from harc.synth import PSEUDO_FRAMES

TERMS = ("couple", "couple_resp", "kl", "ce")  # the paper's four (§4)
EXTRA_TERMS = ("pseudo_ref",)  # opt-in: a term is computed and logged only at weight > 0
# harm_read -> (reduction over positions, boundary tokens only)
HARM_READS = {"t_inst": None, "max_user": ("max", False), "softmax_user": ("softmax", False),
              "boundaries": ("max", True)}
CONTROLS = ("none", "shuffled_labels", "random_direction")


class LossWeights(Config):
    """Weights of the total loss (§4): couple 1, couple_resp 1, kl 10, ce 1.

    pseudo_ref: weight of the pseudo-harmful refusal margin `relu(p_r + pseudo_margin)` on
        pseudo-harmful rows (0: off, the paper). It keeps benign-but-alarming prompts on the
        non-refusing side of v_ref, against the false refusals the coupling adds.
    """

    prefix: ClassVar[str] = "weights."

    couple: float = 1.0
    couple_resp: float = 1.0
    kl: float = 10.0
    ce: float = 1.0
    pseudo_ref: float = 0.0

    def check(self) -> None:
        for k in TERMS + EXTRA_TERMS:
            w = getattr(self, k)
            self.need(w >= 0 and w == w and abs(w) != float("inf"), k,
                      "must be a finite number >= 0")

    def active(self) -> dict[str, float]:
        """The paper's four terms, plus each opt-in term with a positive weight."""
        return {k: w for k, w in self.model_dump().items() if k in TERMS or w > 0}


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

    Opt-in changes (defaults = the paper; docs/results/improvements.md):
    harm_read: where the prompt coupling reads harmfulness: "t_inst" (the paper); "max_user"
        (the largest reading over the user content: a wrapper's trailing text can no longer hide
        the request's harm, which the base model registers at the request's own end);
        "softmax_user" (a soft maximum at temperature `read_temp`: gradient to every strong
        reading, not only the top one); "boundaries" (the largest reading over sentence and line
        ends of the user content, `ChatFormat.boundaries`: where an embedded request ends,
        without the noise of every token).
    read_temp: temperature of "softmax_user" (cosine units).
    read_extract: with harm_read other than t_inst, v_harm is re-extracted where it is read
        (harmful minus harmless residuals at the read positions, found with the current
        direction) at the start and at each refresh; false keeps the t_inst direction (the base
        model's t_inst direction already reads the harm at embedded request ends,
        docs/results/README.md).
    pseudo_margin: margin of `weights.pseudo_ref`: pseudo-harmful rows want p_r <= -margin.
    pseudo_augment: new pseudo-harmful retain prompts per training pseudo prompt (0: none): the
        model's own paraphrase and benign framings of it, answered by the model (refused answers
        dropped), kept disjoint from XSTest and the prompts in data["exclude"]: a larger, more
        varied retain set than the authored one, against false refusals.
    frame_harmful: framed copies per harmful training record (0: none): the prompt inside the
        same benign framings `pseudo_augment` puts around pseudo-harmful prompts (a lead-in or a
        trailing remark, `harc.synth.PSEUDO_FRAMES`; never a jailbreak template), trained to
        refuse. The coupling can only learn to read a request's harm past trailing text if some
        training prompts have trailing text; with the framings on both sides they carry no label.
        A data augmentation: report it as one (its trailing remarks resemble style injection).
    resp_offsets: starts (in target tokens) of the response-coupling windows, each
        `n_resp_tokens` long; [0] is the paper. Several offsets couple the later response too,
        where prefilling and ablation attacks act.
    recovery_tokens: harmful-opening lengths k (tokens); each harmful record with a completion
        gets one more row "prompt + first k tokens of its harmful completion -> refusal" (k
        cycling through the list), trained with CE and response coupling on the refusal after
        the opening (never on the opening): a harmful continuation under way flips to refusal.
    margin_final / margin_ramp: margin curriculum: the harmful-side margin moves linearly from
        `margin` to `margin_final` over the first `margin_ramp` optimizer steps (null: constant),
        so the hinges keep a gradient after they reach zero at the start margin.
    hard_frac: each coupling term averages only its hardest (least-coupled) fraction of rows
        per layer (1: all rows, the paper): the gradient stays on the rows not yet coupled.
    control: "none"; "shuffled_labels" (a seeded permutation of the rows' harmful / harmless /
        pseudo labels in every coupling term, CE and KL untouched); "random_direction" (seeded
        random unit directions replace v_harm and v_harm_resp in the coupling; layers are still
        selected on the real directions). Controls of the compare harness (issue #13).
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
    harm_read: str = "t_inst"
    read_temp: float = 0.1
    read_extract: bool = True
    pseudo_margin: float = 0.1
    pseudo_augment: int = 0
    frame_harmful: int = 0
    resp_offsets: list[int] = Field(default_factory=lambda: [0])
    recovery_tokens: list[int] = Field(default_factory=list)
    margin_final: float | None = None
    margin_ramp: int = 0
    hard_frac: float = 1.0
    control: str = "none"

    def check(self) -> None:
        super().check()
        need = self.need
        need(self.harm_read in HARM_READS, "harm_read", f"must be one of {tuple(HARM_READS)}")
        need(self.read_temp > 0, "read_temp", "must be positive")
        need(0 <= self.pseudo_margin <= 1, "pseudo_margin", "must lie in [0, 1]")
        need(0 <= self.pseudo_augment <= 1 + len(PSEUDO_FRAMES), "pseudo_augment",
             f"must lie in 0..{1 + len(PSEUDO_FRAMES)} (a paraphrase and the framings)")
        need(0 <= self.frame_harmful <= len(PSEUDO_FRAMES), "frame_harmful",
             f"must lie in 0..{len(PSEUDO_FRAMES)} (the benign framings)")
        need(len(self.resp_offsets) > 0 and min(self.resp_offsets) >= 0
             and len(set(self.resp_offsets)) == len(self.resp_offsets), "resp_offsets",
             "must be distinct token offsets >= 0, e.g. [0, 16, 48]")
        need(all(k > 0 for k in self.recovery_tokens), "recovery_tokens",
             "must be positive token counts, e.g. [8, 24]")
        need(self.margin_final is None or 0 < self.margin_final <= 1, "margin_final",
             "must be null or satisfy 0 < margin_final <= 1")
        need(self.margin_ramp >= 0, "margin_ramp", "must be >= 0")
        need(self.margin_final is None or self.margin_ramp > 0, "margin_ramp",
             "must be positive when margin_final is set")
        need(0 < self.hard_frac <= 1, "hard_frac", "must satisfy 0 < hard_frac <= 1")
        need(self.control in CONTROLS, "control", f"must be one of {CONTROLS}")
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
