"""The evaluation sets an `EvalConfig` names, loaded and trimmed to its sizes."""

from __future__ import annotations

from harc.data import load, sample_across
from harc.errors import HarcError
from harc.eval.config import EvalConfig


def load_eval_data(cfg: EvalConfig) -> dict:
    """{"harmful": [records], "over_refusal": {name: [prompts]}, "benign": [prompts],
    "capability": [items]}."""
    harmful = load(cfg.harmful, limit=cfg.n_harmful)
    harmful = [{"prompt": r["prompt"], "category": r.get("category")} for r in harmful]
    data = {
        "harmful": harmful,
        "over_refusal": {n: [r["prompt"] for r in load(n, limit=cfg.n_over_refusal)]
                         for n in cfg.over_refusal},
        "benign": [r["prompt"] for r in load(cfg.benign, limit=cfg.n_benign)],
        # spread over the item kinds: the file's first items are all arithmetic
        "capability": (sample_across(load(cfg.capability), cfg.n_capability)
                       if cfg.capability else []),
    }
    for name, items in [("harmful", data["harmful"]), ("benign", data["benign"])]:
        if not items:
            raise HarcError(f"the {name} evaluation set is empty")
    return data
