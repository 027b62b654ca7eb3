"""The summary `harc run` and `harc eval` end with: numbers with intervals, within 80 columns."""

import json
from pathlib import Path

import pytest

from harc.cli.summary import WIDTH, policy_row, summary_lines
from harc.stats import wilson

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "results_example.json"


def test_summary_fits_80_columns_and_states_intervals_and_paths():
    results = json.loads(FIX.read_text())
    # four policies with long names, as `harc eval --filter keyword --adapter a --adapter b` makes
    runs = results["runs"]
    results["runs"] = runs + [{**r, "name": f"adapter:{r['name']}-long+keyword"} for r in runs]
    where = {"report": Path("runs/some/very/long/folder/name/that/goes/on/report/report.html"),
             "adapter": Path("runs/x/train/adapter"), "directions": None}
    lines = summary_lines(results, where, ["synth", "extract", "eval/base"])
    text = "\n".join(lines)
    assert all(len(ln) <= WIDTH for ln in text.splitlines()
               if not ln.lstrip().startswith("runs/")), text
    assert "attack success" in text and "false refusal" in text and "capability" in text
    assert "skipped (done before, same inputs): synth, extract, eval/base" in text
    assert "report:" in text and "adapter:" in text and "directions:" not in text


def test_policy_row_pools_the_counts_behind_mean_asr():
    run = {"name": "harc", "mean_asr": 0.25, "mean_asr_attacks": ["a", "b"],
           "attacks": {"a": {"n": 10, "success": 2}, "b": {"n": 10, "success": 3},
                       "direct": {"n": 10, "success": 10}},
           "over_refusal": {"x": {"n": 20, "refused": 4}},
           "capability": {"items": {"n": 20, "correct": 5, "acc": 0.25}, "kl_vs_base": 0.0123}}
    row = policy_row(run)
    lo, hi = wilson(5, 20)
    assert row[1] == f"0.25 [{lo:.2f},{hi:.2f}]"  # 5 of 20 over a and b, not direct
    lo, hi = wilson(4, 20)
    assert row[2] == f"0.20 [{lo:.2f},{hi:.2f}]"
    assert row[3].startswith("0.25 [") and row[4] == "0.0123"
    assert policy_row({"name": "base", "attacks": {}})[1:] == ["-", "-", "-", "-"]


def test_zero_capability_everywhere_is_called_uninformative():
    run = {"name": "base", "mean_asr": 1.0, "attacks": {"a": {"n": 4, "success": 4}},
           "capability": {"items": {"n": 20, "correct": 0, "acc": 0.0}}}
    text = "\n".join(summary_lines({"runs": [run, {**run, "name": "harc"}]}, {}))
    assert "tells nothing" in text
