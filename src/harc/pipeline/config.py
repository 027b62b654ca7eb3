"""The run config: a training config plus the `eval:` and `run:` sections, validated whole (names
of attacks, judges and filters included) before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from harc.config import Config, apply_overrides, build, read_yaml
from harc.errors import HarcError
from harc.eval.attacks import ATTACKS
from harc.eval.config import EvalConfig
from harc.eval.filters import FILTERS
from harc.eval.judges import JUDGES
from harc.eval.judges.check import load_labelled
from harc.methods import TrainConfig, config_from_raw


class RunSettings(Config):
    """Pipeline options (the `run:` section).

    harmful / harmful_eval / harmless / pseudo: registry names or files of the data profile;
    the evaluation harmful set is held out and everything else is de-duplicated against it.
    harmful / harmless (the extraction prompts, also the source of synthesised triples) default
    to the training config's `data.extract_harmful` / `data.extract_harmless`, else advbench /
    harc-benign; n_extract defaults to `data.extract_n`.
    over_refusal_eval: extra over-refusal sets for evaluation (e.g. an XSTest path); the held-out
    half of `pseudo` is always evaluated.
    n_extract: prompts per side for the prompt directions (null: `data.extract_n`).
    n_synth: harmful prompts given on-policy triples (extraction + training); synth_tokens: tokens
    generated per synthetic text.
    batch_size: batch size of synthesis, extraction and diagnosis.
    filters: policy layers evaluated as extra policies (names, or {"name": ..., **options}),
        alone and with HARC.
    plane_attacks: attack families placed on the harmfulness-refusal plane in diagnose.
    plane_n: held-out prompts per family on that plane (null: all `data.val_n`); the held-out
    check always uses all of them. Jailbreak templates are long: this bounds diagnose's cost.
    judge_data: human-labelled refusal sets (`harc judge-check --data` specs, e.g. an XSTest
    completions folder or "pyrit") on which the primary judge's accuracy is measured and reported.
    seed: seed of the de-duplicated, disjoint data splits.
    """

    prefix: ClassVar[str] = "run."

    harmful: str | None = None
    harmful_eval: str = "harmbench"
    harmless: str | None = None
    pseudo: str = "harc-pseudo-harmful"
    over_refusal_eval: list[str] = Field(default_factory=list)
    n_extract: int | None = None
    n_synth: int = 200
    synth_tokens: int = 48
    batch_size: int = 16
    filters: list[str | dict] = Field(default_factory=list)
    plane_attacks: list[str] = Field(default_factory=lambda: ["dan", "code_attack", "deep_inception"])
    plane_n: int | None = None
    judge_data: list[str] = Field(default_factory=list)
    seed: int = 0

    def check(self) -> None:
        for key in ("n_extract", "n_synth", "synth_tokens", "batch_size", "plane_n"):
            value = getattr(self, key)
            self.need(value is None or value > 0, key, "must be positive")


def plugin_spec(spec: str | dict, key: str) -> tuple[str, dict]:
    """(name, options) of a plugin given as a name or a {"name": ..., **options} record."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise HarcError(f"config key {key!r}: each entry is a name or a mapping with 'name'")
    return spec["name"], {k: v for k, v in spec.items() if k != "name"}


def check_plugins(ev: EvalConfig, run: RunSettings | None = None) -> None:
    """Build every named attack, judge and filter once, so a typo or a bad option fails now."""
    for spec in ev.attacks:
        name, params = plugin_spec(spec, "eval.attacks")
        if isinstance(params.get("attacker"), str):  # "self" or a model spec: made at run time
            params["attacker"] = len
        ATTACKS.create(name, **params)
    missing = [a for a in ev.mean_attacks or []
               if a not in [plugin_spec(s, "eval.attacks")[0] for s in ev.attacks]]
    if missing:
        raise HarcError(f"config key 'eval.mean_attacks' names attacks that are not run: {missing}")
    JUDGES.get(ev.judge)
    if run is not None:
        for spec in run.filters:
            name, params = plugin_spec(spec, "run.filters")
            FILTERS.create(name, **params)
        for name in run.plane_attacks:
            ATTACKS.get(name)
        for spec in run.judge_data:  # read now: a bad path must not wait for the report
            load_labelled(spec, "skip")


@dataclass
class RunConfig:
    train: TrainConfig
    eval: EvalConfig
    run: RunSettings
    out: Path
    trust_remote_code: bool = False  # `--trust-remote-code`: run the model repository's code


def load_run_config(path: str | Path | None, overrides: list[str]) -> RunConfig:
    """Read and validate the whole run config before any model is loaded."""
    raw, base = read_yaml(path) if path is not None else ({}, None)
    raw = apply_overrides(raw, overrides)
    sections: dict[str, Any] = {k: raw.pop(k, None) or {} for k in ("eval", "run")}
    train = config_from_raw(raw, base, require_data=False)
    ev = build(EvalConfig, sections["eval"])
    run = build(RunSettings, sections["run"])
    check_plugins(ev, run)
    # A paper config names its extraction sets and size in `data:`; `run:` may override them.
    run.harmful = run.harmful or train.data.extract_harmful or "advbench"
    run.harmless = run.harmless or train.data.extract_harmless or "harc-benign"
    run.n_extract = run.n_extract or train.data.extract_n
    if not train.data.val_n:
        raise HarcError("config key 'data.val_n': harc run needs held-out prompts (got 0)")
    return RunConfig(train, ev, run, Path(train.output_dir))
