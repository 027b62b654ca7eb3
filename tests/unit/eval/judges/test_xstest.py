"""The refusal-string judge against XSTest's human labels, where the public data is present.

XSTest's completions are not shipped with harc: point HARC_XSTEST_DIR at a folder holding
`xstest_v2_completions_*_gpteval.csv`, or keep the workplace copy at ../shared/data/xstest.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harc.eval.judges import get_judge
from harc.eval.judges.check import judge_check, load_xstest_completions

pytestmark = pytest.mark.unit

_DIR = Path(os.environ.get("HARC_XSTEST_DIR")
            or Path(__file__).resolve().parents[4].parent / "shared" / "data" / "xstest")


def test_refusal_string_agrees_with_xstest_humans():
    files = sorted(_DIR.glob("xstest_v2_completions_*.csv")) if _DIR.is_dir() else []
    if not files:
        pytest.skip(f"no XSTest completions under {_DIR} (set HARC_XSTEST_DIR)")
    records = load_xstest_completions(files)  # full compliance vs full refusal only
    out = judge_check(get_judge("refusal_string"), records)
    assert out["n"] > 1500
    assert out["accuracy"] >= 0.90, f"agreement {out['accuracy']:.3f} < 0.90"
    assert out["kappa"] >= 0.80
