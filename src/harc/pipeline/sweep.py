"""Choices made on validation only (issue #14, item 5): a small grid of method keys expanded into
named `harc compare` entries, a validation split of attacks and pseudo-harmful prompts that is
disjoint from every evaluation set, and the selection rule, recorded.

How a compare run uses these pieces (a `sweep:` section beside `compare.methods`):
1. `expand_grid(settings)`: the grid's entries join `compare.methods` (validated like any entry);
2. `validation_split(...)`, before synthesis: every entry (grid or not) trains on
   `split.pseudo_train`, so the held-out pseudo-harmful prompts never reach training;
3. each grid entry and the base model are evaluated on `validation_data(split)` under the
   evaluation's attack families; `select(...)` over their `validation_scores` picks the entry,
   and its record goes into results.json. The evaluation sets are evaluated once, for the final
   table, and play no part in the choice.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field

from harc.config import Config
from harc.data import dedupe_against, overlap_counts, split
from harc.errors import HarcError
from harc.eval.results import mean_asr, over_refusal_rate

RULE = ("lowest validation attack success (mean over the validation attack families) among the "
        "entries whose validation false-refusal rate is not above the base model's; ties: lower "
        "false refusals, then the earlier entry of the grid. No entry qualifying: the lowest "
        "false-refusal rate, recorded as constraint_met = false")
PSEUDO_VALIDATION = "pseudo-harmful (validation)"


class SweepSettings(Config):
    """The `sweep:` section of a compare config.

    name: prefix of the grid entries' names.
    method: the method whose keys the grid varies.
    base: keys every grid entry shares (e.g. the changes kept fixed); the entries start, like any
        compare entry, from the shared top-level config.
    grid: key -> list of values; the grid is their product; dotted keys reach into sections
        (`weights.pseudo_ref`).
    harmful: harmful requests of validation (a registry name or file): HarmBench's validation
        behaviours, never its test behaviours.
    n_harmful: validation requests used (null: all).
    pseudo_fraction: share of the pseudo-harmful training prompts held out for validation.
    max_entries: the largest grid accepted (device time is scarce).
    seed: seed of the pseudo-harmful hold-out.
    """

    prefix: ClassVar[str] = "sweep."

    name: str = "sweep"
    method: str = "harc"
    base: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    harmful: str = "harmbench-val"
    n_harmful: int | None = None
    pseudo_fraction: float = 1 / 3
    max_entries: int = 8
    seed: int = 0

    def check(self) -> None:
        self.need(len(self.grid) > 0 and all(len(v) > 0 for v in self.grid.values()), "grid",
                  "must map each key to a non-empty list of values")
        size = 1
        for values in self.grid.values():
            size *= len(values)
        self.need(size <= self.max_entries, "grid",
                  f"has {size} entries, more than max_entries={self.max_entries}")
        self.need(0 < self.pseudo_fraction < 1, "pseudo_fraction", "must lie in (0, 1)")
        self.need(self.n_harmful is None or self.n_harmful > 0, "n_harmful",
                  "must be positive or null")


def _nest(flat: Mapping[str, Any]) -> dict:
    """{"weights.pseudo_ref": 1} -> {"weights": {"pseudo_ref": 1}}."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise HarcError(f"config key 'sweep.grid': {key!r} reaches into a value")
        node[leaf] = value
    return out


def _merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k),
                                                                             Mapping) else v
    return out


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_show(v) for v in value)
    return "none" if value is None else str(value)


def expand_grid(s: SweepSettings) -> list[dict]:
    """The grid as compare entries {name, method, **keys}, in product order (the first key varies
    slowest). The name lists the entry's grid values with characters that are safe in folder
    names, shells and comma-separated `--only` lists: `sweep--harm_read=boundaries--hard_frac=0.5`.
    """
    keys = list(s.grid)
    entries = []
    for values in itertools.product(*(s.grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        label = "".join(f"--{k}={_show(v)}" for k, v in point.items())
        entries.append({"name": f"{s.name}{label}", "method": s.method,
                        **_merge(_nest(s.base), _nest(point))})
    return entries


@dataclass(frozen=True)
class ValidationSplit:
    harmful: list[dict]  # validation requests {"prompt", "category"?}
    pseudo: list[str]  # held-out pseudo-harmful prompts
    pseudo_train: list[dict]  # what every entry trains on instead of the whole training half
    removed: dict[str, int]  # validation requests dropped as near-duplicates, by reason
    overlaps: dict[str, int]  # near-duplicates left between validation and evaluation (all 0)


def _prompts(records: Sequence) -> list[dict]:
    return [{"prompt": r if isinstance(r, str) else r["prompt"]} for r in records]


def validation_split(s: SweepSettings, harmful: Sequence[dict], pseudo_train: Sequence[dict], *,
                     evaluation: Mapping[str, Sequence], training: Sequence,
                     pool: Sequence | None = None) -> ValidationSplit:
    """Validation requests (`harmful`, e.g. `load("harmbench-val")`) without near-duplicates of any
    evaluation set or training / extraction prompt, and a seeded pseudo-harmful hold-out.

    evaluation: every evaluation set by name (records or prompts); training: every harmful prompt
    that training or extraction sees; pool: every pseudo-harmful training prompt, answered by the
    base model or not. The hold-out is drawn from `pool` (default: the prompts of `pseudo_train`)
    and removed from `pseudo_train`. Drawn from the answered pairs alone, it would hold no prompt
    the base model refuses, so "not above the base model's false refusals" would mean zero.
    Raises when the split leaves nothing to validate on.
    """
    removed = {}
    kept, removed["vs_evaluation"] = dedupe_against(list(harmful),
                                                    *[_prompts(v) for v in evaluation.values()])
    kept, removed["vs_training"] = dedupe_against(kept, _prompts(training))
    kept = kept[: s.n_harmful] if s.n_harmful else kept
    parts = split(_prompts(pseudo_train if pool is None else pool),
                  (1 - s.pseudo_fraction, s.pseudo_fraction), seed=s.seed,
                  names=("train", "validate"))
    held = {r["prompt"] for r in parts["validate"]}
    train = [r for r in pseudo_train if r["prompt"] not in held]
    val_pseudo, removed["pseudo_vs_evaluation"] = dedupe_against(
        parts["validate"], *[_prompts(v) for v in evaluation.values()])
    if not kept or not val_pseudo or not train:
        raise HarcError("the validation split is empty (no HarmBench validation request or "
                        "held-out pseudo-harmful prompt left); check sweep.harmful and "
                        "sweep.pseudo_fraction")
    overlaps = {}
    for name, recs in evaluation.items():
        both = overlap_counts({"validation": _prompts(kept + val_pseudo), name: _prompts(recs)})
        overlaps[name] = next(iter(both.values()))
    return ValidationSplit(kept, [r["prompt"] for r in val_pseudo], train, removed, overlaps)


def validation_data(v: ValidationSplit) -> dict:
    """The split in the evaluator's data shape: attacks on the validation requests, false
    refusals on the held-out pseudo-harmful prompts (no benign or capability items)."""
    return {"harmful": [{"prompt": r["prompt"], "category": r.get("category")} for r in v.harmful],
            "over_refusal": {PSEUDO_VALIDATION: list(v.pseudo)}, "benign": [], "capability": []}


def validation_scores(run: Mapping) -> dict:
    """{"asr", "false_refusal"} of one validation run record (`Evaluator.run` on
    `validation_data`)."""
    asr, fr = mean_asr(run), over_refusal_rate(run, [PSEUDO_VALIDATION])
    if asr is None or fr is None:
        raise HarcError(f"run {run.get('name')!r} has no validation attack success or false "
                        "refusals; evaluate it on validation_data()")
    return {"asr": asr, "false_refusal": fr}


def select(scores: Mapping[str, Mapping[str, float]], base: Mapping[str, float]) -> dict:
    """The entry `RULE` picks from {entry: validation_scores}, in grid order, against the base
    model's validation scores; the record of the choice (rule, table, chosen, constraint_met)."""
    if not scores:
        raise HarcError("no grid entry was evaluated on the validation split")
    order = list(scores)
    ok = [n for n in order if scores[n]["false_refusal"] <= base["false_refusal"]]
    if ok:
        chosen = min(ok, key=lambda n: (scores[n]["asr"], scores[n]["false_refusal"],
                                        order.index(n)))
    else:
        chosen = min(order, key=lambda n: (scores[n]["false_refusal"], scores[n]["asr"],
                                           order.index(n)))
    return {"rule": RULE, "base": dict(base), "chosen": chosen, "constraint_met": bool(ok),
            "table": [{"entry": n, **scores[n], "eligible": n in ok} for n in order]}
