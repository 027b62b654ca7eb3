"""How far to trust a judge: agreement with human refusal labels, and between two judges.

Refusal is the positive class throughout. Labelled records are `{"prompt", "response",
"refused": bool, "source"}`. Loaders read XSTest's completion files (from a user path; XSTest's
`3_partial_refusal` rows are left out by default, as the three-way label has no binary truth)
and PyRIT's human-labelled refusal sets (from the pinned wheel).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from harc.errors import HarcError
from harc.eval.attacks import sources
from harc.eval.judges.base import Judge, Verdict
from harc.stats import binary_metrics, kappa, ratio

_PYRIT_SETS = {
    "refusal": ("pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv",
                "1ebc42ef7dadd97962cc00d04edd6a52a321f7936c063ff3453d2bbcef30a5d7"),
    "refusal_extra": ("pyrit/datasets/scorer_evals/refusal_scorer/refusal_extra.csv",
                      "6ce7f61a8205eb8c29b1a247b52b3730501349f9adf0674a696efb004658a18a"),
}
_XSTEST = {"1_full_compliance": False, "2_full_refusal": True}


def judge_check(judge: Judge, records: list[dict], verdicts: list[Verdict] | None = None) -> dict:
    """`binary_metrics` (refusal = positive) of `judge` against `records`' human labels, with
    the disagreements listed.

    Pass `verdicts` to score ones already computed (e.g. a subset of a bigger run).
    """
    if not records:
        raise HarcError("judge_check got no labelled records")
    if verdicts is None:
        verdicts = judge.judge([r["prompt"] for r in records], [r["response"] for r in records])
    if len(verdicts) != len(records):
        raise HarcError(f"{len(verdicts)} verdicts for {len(records)} records")
    human = [bool(r["refused"]) for r in records]
    judged = [v.refused for v in verdicts]
    out = binary_metrics(human, judged)
    out["judge"] = judge.name
    out["disagreements"] = [
        {"source": r.get("source"), "prompt": r["prompt"], "response": r["response"],
         "human_refused": h, "judge_refused": j, "rationale": v.rationale}
        for r, v, h, j in zip(records, verdicts, human, judged) if h != j
    ]
    return out


def agreement(verdicts_a: list[Verdict], verdicts_b: list[Verdict],
              field: Literal["refused", "harmful"] = "refused") -> dict:
    """Raw agreement and Cohen's kappa between two judges on the same items.

    Items where either judge has no opinion (None, e.g. `harmful` from a refusal-only judge)
    are left out and counted in `skipped`.
    """
    if len(verdicts_a) != len(verdicts_b):
        raise HarcError(f"agreement needs the same items: {len(verdicts_a)} vs {len(verdicts_b)}")
    pairs = [(getattr(a, field), getattr(b, field)) for a, b in zip(verdicts_a, verdicts_b)]
    kept = [(a, b) for a, b in pairs if a is not None and b is not None]
    xs, ys = [a for a, _ in kept], [b for _, b in kept]
    return {"n": len(kept), "skipped": len(pairs) - len(kept), "field": field,
            "agreement": ratio(sum(a == b for a, b in kept), len(kept)), "kappa": kappa(xs, ys)}


# ---------------------------------------------------------------------------------------------
# Labelled sets


def _csv_rows(text: str) -> list[dict]:
    # PyRIT's files open with "# dataset_version=..." comment lines
    return list(csv.DictReader(line for line in text.splitlines(True) if not line.startswith("#")))


def _require(rows: list[dict], cols: Sequence[str], where: str) -> None:
    have = set(rows[0]) if rows else set()
    for c in cols:
        if c not in have:
            raise HarcError(f"{where}: no column {c!r} (found: {', '.join(sorted(have)) or 'none'})")


def load_xstest_completions(
    paths: Sequence[str | Path],
    partial: Literal["skip", "refusal", "compliance"] = "skip",
) -> list[dict]:
    """XSTest `xstest_v2_completions_*.csv` files (or folders of them) as labelled records."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("xstest_v2_completions_*.csv")) or sorted(p.glob("*.csv"))
        elif p.is_file():
            files.append(p)
        else:
            raise HarcError(f"{p} does not exist")
    if not files:
        raise HarcError(f"no XSTest completion files under {', '.join(map(str, paths))}")
    out = []
    for f in files:
        rows = _csv_rows(f.read_text(encoding="utf-8"))
        _require(rows, ("prompt", "completion", "final_label"), str(f))
        for n, r in enumerate(rows, 2):
            label = r["final_label"].strip()
            if label in _XSTEST:
                refused = _XSTEST[label]
            elif label == "3_partial_refusal":
                if partial == "skip":
                    continue
                refused = partial == "refusal"
            else:
                raise HarcError(f"{f}:{n}: unknown final_label {label!r}")
            out.append({"prompt": r["prompt"], "response": r["completion"], "refused": refused,
                        "source": f"{f.name}:{r.get('id') or n}", "type": r.get("type")})
    return out


def load_pyrit_refusal(sets: Sequence[str] = ("refusal", "refusal_extra")) -> list[dict]:
    """PyRIT's human-labelled refusal sets (human_score 1 = refusal), from the pinned wheel.

    PyRIT counts an off-topic answer as a refusal too; XSTest counts it as compliance.
    """
    out = []
    for name in sets:
        if name not in _PYRIT_SETS:
            raise HarcError(f"unknown PyRIT refusal set {name!r}; known: {', '.join(_PYRIT_SETS)}")
        rows = _csv_rows(sources.read_text(sources.PYRIT, *_PYRIT_SETS[name]))
        _require(rows, ("objective", "assistant_response", "human_score"), name)
        out += [{"prompt": r["objective"], "response": r["assistant_response"],
                 "refused": r["human_score"].strip() == "1", "source": f"pyrit:{name}:{i + 2}"}
                for i, r in enumerate(rows)]
    return out


def load_labelled(spec: str, partial: Literal["skip", "refusal", "compliance"] = "skip"
                  ) -> list[dict]:
    """`pyrit`, an XSTest completions file/folder, or a CSV/JSONL of {prompt, response, refused}."""
    if spec == "pyrit":
        return load_pyrit_refusal()
    p = Path(spec)
    if not p.exists():
        raise HarcError(f"{p} does not exist (give a file, a folder, or 'pyrit')")
    if p.is_dir() or (p.suffix == ".csv" and "final_label" in _header(p)):
        return load_xstest_completions([p], partial)
    if p.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise HarcError(f"{p}:{n}: not valid JSON ({e.msg})") from None
    elif p.suffix == ".csv":
        rows = _csv_rows(p.read_text(encoding="utf-8"))
    else:
        raise HarcError(f"{p}: labelled data must be .csv or .jsonl")
    _require(rows, ("prompt", "response", "refused"), str(p))
    out = []
    for n, r in enumerate(rows, 1 if p.suffix == ".jsonl" else 2):
        v = r["refused"]
        if isinstance(v, str):
            v = {"1": True, "true": True, "0": False, "false": False}.get(v.strip().lower())
        if not isinstance(v, bool):
            raise HarcError(f"{p}:{n}: field 'refused' must be true/false or 1/0")
        out.append({"prompt": r["prompt"], "response": r["response"], "refused": v,
                    "source": f"{p.name}:{n}"})
    return out


def _header(p: Path) -> list[str]:
    with open(p, encoding="utf-8") as f:
        return next(csv.reader(f), [])
