"""Reading results records (`results.json` and its `runs`): one accessor per figure, shared by
the report, the plots, the model card and the terminal summary, so that they agree."""

from __future__ import annotations

import json
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
    """Run name, with its input/output filter (the policy) when one was used."""
    name = str(run.get("name") or "run")
    return f"{name} + {run['filter']}" if run.get("filter") else name


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


def load_results(results: Mapping | str | Path) -> dict:
    if isinstance(results, Mapping):
        return dict(results)
    path = Path(results)
    if not path.is_file():
        raise HarcError(f"results file not found: {path}; run `harc evaluate` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HarcError(f"{path} is not readable JSON ({e}); re-run `harc evaluate`") from e
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
