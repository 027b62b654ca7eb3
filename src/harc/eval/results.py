"""Reading results records (`results.json` and its `runs`): one accessor per figure, shared by
the report, the plots, the model card and the terminal summary, so that they agree."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from harc.errors import HarcError
from harc.stats import kappa, wilson


def _num(x) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def cell_rate(cell: Mapping | None, rate_key: str = "asr", count_key: str = "success"):
    """(rate, lo, hi) of a results cell such as {"n", "success", "asr", "ci"}.

    Missing pieces are derived from the counts (rate = k/n, Wilson interval); (None, None, None)
    when the cell holds neither a rate nor counts.
    """
    if not isinstance(cell, Mapping):
        return None, None, None
    n, k, rate = _num(cell.get("n")), _num(cell.get(count_key)), _num(cell.get(rate_key))
    if rate is None and n and k is not None:
        rate = k / n
    ci = cell.get("ci")
    if isinstance(ci, Sequence) and len(ci) == 2 and all(_num(c) is not None for c in ci):
        lo, hi = float(ci[0]), float(ci[1])
    elif n and rate is not None:
        lo, hi = wilson(k if k is not None else rate * n, n)
    else:
        lo = hi = rate
    return rate, lo, hi


def run_label(run: Mapping) -> str:
    """Run name, with its input/output filter (the policy) when one was used and the name does
    not already end with it (`harc eval` and `harc run` name filtered runs "base+keyword")."""
    name = str(run.get("name") or "run")
    filt = str(run.get("filter") or "")
    if not filt or name.replace(" ", "").endswith(f"+{filt}"):
        return name
    return f"{name} + {filt}"


def mean_asr(run: Mapping) -> float | None:
    """The run's recorded mean ASR, else the mean over `mean_asr_attacks` (default: all)."""
    if _num(run.get("mean_asr")) is not None:
        return float(run["mean_asr"])
    att = run.get("attacks") or {}
    names = run.get("mean_asr_attacks") or list(att)
    rates = [cell_rate(att.get(a))[0] for a in names]
    rates = [r for r in rates if r is not None]
    return sum(rates) / len(rates) if rates else None


def over_refusal_rate(run: Mapping, sets: Sequence[str] | None = None) -> float | None:
    """Mean refusal rate over the run's over-refusal sets (or only the named ones)."""
    orr = run.get("over_refusal") or {}
    rates = [cell_rate(c, "rate", "refused")[0] for s, c in orr.items()
             if sets is None or s in sets]
    rates = [r for r in rates if r is not None]
    return sum(rates) / len(rates) if rates else None


def perplexity(run: Mapping, runs: Sequence[Mapping]) -> float | None:
    """The run's perplexity on the benign prompts.

    The evaluation of an adapter records the base model's perplexity on the same prompts as
    `ppl_base`; a run of that base model (no adapter) without a `ppl` of its own shows it.
    """
    cap = run.get("capability") or {}
    if _num(cap.get("ppl")) is not None or run.get("adapter"):
        return _num(cap.get("ppl"))
    for other in runs:
        ocap = other.get("capability") or {}
        if other.get("model") == run.get("model") and _num(ocap.get("ppl_base")) is not None:
            return float(ocap["ppl_base"])
    return None


MIN_CAPABILITY_ITEMS = 30


def capability_caveat(runs: Sequence[Mapping]) -> str | None:
    """Why the capability items say nothing at this size, or None when they are informative."""
    cells = [(r.get("capability") or {}).get("items") for r in runs]
    cells = [c for c in cells if isinstance(c, Mapping) and _num(c.get("n"))]
    if not cells:
        return None
    n = min(int(c["n"]) for c in cells)
    if all(cell_rate(c, "acc", "correct")[0] == 0 for c in cells):
        return (f"every run answered all {n} capability items wrong, so the capability measure is "
                "not informative at this size")
    if n < MIN_CAPABILITY_ITEMS:
        return (f"only {n} capability items (fewer than {MIN_CAPABILITY_ITEMS}): the capability "
                "measure is not informative at this size")
    return None


def training_speed(log: Sequence, refresh_every: int | None = None) -> tuple[float, int] | None:
    """(median tokens/s, number of steps) over the typical training steps.

    Left out: the first step (warm-up, compilation) and any step that follows a direction refresh
    (every `refresh_every` steps) or a change of layers (recompilation): they are several times
    slower and would misstate the speed of the run.
    """
    speeds, prev_layers = [], None
    for i, r in enumerate(x for x in log if isinstance(x, Mapping)):
        step, tps, layers = _num(r.get("step")), _num(r.get("tokens_per_s")), r.get("layers")
        after_refresh = bool(refresh_every) and step is not None and step > 1 \
            and (step - 1) % refresh_every == 0
        changed = i > 0 and layers != prev_layers
        prev_layers = layers
        if tps is not None and i > 0 and not after_refresh and not changed:
            speeds.append(tps)
    return (statistics.median(speeds), len(speeds)) if speeds else None


# What each directions file of a `harc run` folder holds (the report and the model card say it).
DIRECTIONS_FILES = (
    ("extract/directions.safetensors", "base directions, extracted from the base model before "
     "training: the coupling targets; geometry \"before\""),
    ("train/directions.safetensors", "the trainer's final directions: the base directions "
     "blended with re-extractions at each refresh"),
    ("train/adapter/directions.safetensors", "the copy shipped with the adapter: the base "
     "directions of extract/"),
    ("geometry_after/directions.safetensors", "re-extracted with the adapter on; geometry "
     "\"after\""),
)


def load_results(results: Mapping | str | Path) -> dict:
    if isinstance(results, Mapping):
        return dict(results)
    path = Path(results)
    if not path.is_file():
        raise HarcError(f"results file not found: {path}; run `harc eval` or `harc run` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HarcError(f"{path} is not readable JSON ({e}); re-run `harc eval` or `harc run`") from e
    if not isinstance(data, dict):
        raise HarcError(f"{path} holds a {type(data).__name__}, not a results object")
    return data


def judge_agreement(runs: list[dict]) -> dict:
    """Cohen's kappa between the primary judge's "attack succeeded" and the latent judge's
    "harmful", pooled over every attack of each run."""
    out = {}
    for run in runs:
        table: dict[str, int] = defaultdict(int)
        for rec in run["attacks"].values():
            for key, n in rec.get("latent", {}).get("table", {}).items():
                table[key] += n
        if table:
            xs = [k[0] == "1" for k, n in table.items() for _ in range(n)]
            ys = [k[1] == "1" for k, n in table.items() for _ in range(n)]
            primary = next(iter(run["attacks"].values()))["judge"]
            out[f"{primary}|latent ({run['name']})"] = kappa(xs, ys)
    return out
