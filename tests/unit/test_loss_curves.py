"""docs/results/loss_curves.py: window means and the saturation step of each hinge term."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "results" / "loss_curves.py"


def test_windows_saturation_and_outputs(tmp_path):
    spec = importlib.util.spec_from_file_location("loss_curves", SCRIPT)
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    run = tmp_path / "harc" / "train"
    run.mkdir(parents=True)
    rows = [{"event": "start", "step": 0}]
    for s in range(1, 301):  # couple is 0 from step 101 on; couple_resp never reaches the floor
        rows.append({"step": s, "lr": 1e-4, "loss": 1.0, "couple": 0.5 if s <= 100 else 0.0,
                     "couple_resp": 0.01, "kl": 0.002, "ce": 0.1, "grad_norm": 1.0,
                     "layers": [1, 2], "proj": {}})
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = lc.main([str(run), "--out", str(tmp_path / "curves"), "--window", "100"])
    rec = out["harc"]
    assert [w["steps"] for w in rec["windows"]] == ["1-100", "101-200", "201-300"]
    assert rec["windows"][0]["couple"] == pytest.approx(0.5) and rec["windows"][1]["couple"] == 0
    # the 50-step running mean of couple falls below 1e-3 once step 100 leaves it: step 150
    assert rec["saturation_step"] == {"couple": 150, "couple_resp": None}
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "curves.json").read_text()) == out
