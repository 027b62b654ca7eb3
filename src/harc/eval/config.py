"""What an evaluation runs: the `eval:` section of a run config (or `harc eval --config`)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from harc.config import Config
from harc.eval.capability import require_lm_eval

DEFAULT_ATTACKS = ("direct", "dan", "aim", "refusal_suppression", "prefix_injection",
                   "style_injection", "evil_confidant", "deep_inception", "code_attack", "pap",
                   "prefill", "ablation")


class EvalConfig(Config):
    """What an evaluation runs.

    attacks: attack names, or {"name": ..., **params} records; PAIR and PAP take an attacker as
    `attacker: self` (the evaluated model without its adapter), `attacker: MODEL_SPEC` (a local
    model) or `endpoint` + `model` (an OpenAI-compatible server).
    harmful / n_harmful: harmful requests (registry name or file) and how many.
    over_refusal / n_over_refusal: pseudo-harmful benign sets; a refusal there is a false refusal.
    benign / n_benign: plain benign instructions (should stay answered).
    capability / n_capability: verifiable items {"prompt", "answer", "check"}; None to skip.
    max_new_tokens, batch_size: generation settings (greedy decoding).
    max_prompt_tokens: longer prompts are cut from the left inside the user turn; jailbreak
    templates are long, so this is far above the training limit.
    judge: primary judge; attack success = its verdict says not refused (or harmful, if it grades).
    mean_attacks: attacks averaged into mean ASR (default: every attack except "direct").
    plane: place each attack family on the harmfulness-refusal plane (needs directions).
    latent_judge: also judge every response by the model's own response-side harmfulness
    projection and report its agreement with the primary judge (one more forward per response).
    lm_eval_tasks: lm-evaluation-harness task names (e.g. ["mmlu", "gsm8k", "ifeval"]) scored on
    the model as loaded (adapter active, no input filter), under capability.lm_eval; needs
    `pip install 'harc[lm-eval]'` and the hub datasets; empty (default) to skip.
    lm_eval_limit: documents per lm-eval task (None: all); for quick checks, not for reporting.
    """

    prefix: ClassVar[str] = "eval."

    attacks: list = Field(default_factory=lambda: list(DEFAULT_ATTACKS))
    harmful: str = "harmbench"
    n_harmful: int = 100
    over_refusal: list[str] = Field(default_factory=lambda: ["harc-pseudo-harmful"])
    n_over_refusal: int = 250
    benign: str = "harc-benign"
    n_benign: int = 50
    capability: str | None = "harc-capability"
    n_capability: int = 60
    max_new_tokens: int = 128
    max_prompt_tokens: int = 2048
    batch_size: int = 16
    judge: str = "refusal_string"
    mean_attacks: list[str] | None = None
    plane: bool = True
    latent_judge: bool = True
    lm_eval_tasks: list[str] = Field(default_factory=list)
    lm_eval_limit: int | None = None

    def check(self) -> None:
        for key in ("n_harmful", "n_over_refusal", "n_benign", "n_capability", "max_new_tokens",
                    "max_prompt_tokens", "batch_size"):
            self.need(getattr(self, key) > 0, key, "must be positive")
        self.need(self.lm_eval_limit is None or self.lm_eval_limit > 0, "lm_eval_limit",
                  "must be positive or null")
        if self.lm_eval_tasks:  # fail at configuration time, not after hours of generation
            require_lm_eval()
