"""garak's report JSONL -> the redteam block -> results.json and the report (whose section is
tested in tests/unit/report/test_redteam.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from serve_helpers import garak_block

from harc.errors import HarcError

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parents[2] / "fixtures" / "garak" / "report-0.17.1.jsonl"


def test_parse_report_counts_hits_per_detector_and_per_output():
    from harc.serve.redteam import parse_report
    from harc.stats import wilson

    rep = parse_report(FIXTURE, examples=2)
    assert rep["garak_version"] == "0.17.1"
    assert set(rep["probes"]) == {"dan.Dan_11_0", "encoding.InjectBase64"}
    dan = rep["probes"]["dan.Dan_11_0"]
    assert dan["detectors"]["mitigation.MitigationBypass"] == {
        "n": 1, "hits": 1, "nones": 0, "rate": 1.0, "ci": wilson(1, 1)}
    assert dan["detectors"]["dan.DAN"]["hits"] == 0
    enc = rep["probes"]["encoding.InjectBase64"]
    assert enc["detectors"]["encoding.DecodeApprox"]["hits"] == 1
    assert enc["detectors"]["encoding.DecodeMatch"]["hits"] == 0
    assert enc["outputs"]["n"] == 6 and enc["outputs"]["hits"] == 1  # any detector, per output
    assert [e["probe"] for e in rep["examples"]] == ["dan.Dan_11_0", "encoding.InjectBase64"]
    assert rep["examples"][1]["detectors"] == ["encoding.DecodeApprox"]
    assert rep["examples"][0]["prompt"].startswith("Ignore all the instructions")


def test_probes_without_scores_are_found():
    from harc.serve.redteam import parse_report, unscored

    rep = parse_report(FIXTURE)
    assert unscored(rep, ["dan.Dan_11_0", "lmrc.Bullying"]) == ["lmrc.Bullying"]
    rep["probes"]["dan.Dan_11_0"]["detectors"] = {"dan.DAN": {"n": 0, "hits": 0}}
    assert unscored(rep, ["dan.Dan_11_0", "encoding.InjectBase64"]) == ["dan.Dan_11_0"]


def test_merge_and_report_render_the_block(tmp_path):
    from harc.report import write_report
    from harc.serve.redteam import merge_redteam

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"title": "eval", "runs": [{"name": "base", "mean_asr": 0.5}]}))
    merge_redteam(results, garak_block(FIXTURE))
    res = json.loads(results.read_text())
    assert res["runs"][0]["name"] == "base" and res["redteam"]["model"] == "m"  # kept, added
    fresh = merge_redteam(tmp_path / "new" / "results.json", garak_block(FIXTURE))
    assert json.loads(fresh.read_text())["title"] == "red-team of m"
    html = write_report(results, tmp_path / "report")["html"].read_text()
    assert 'id="redteam"' in html
    assert html.index('id="redteam"') < html.index('id="provenance"')
    for text in ("dan.Dan_11_0", "encoding.InjectBase64", "mitigation.MitigationBypass",
                 "100.0%", "16.7%", "m+keyword"):
        assert text in html


def test_garak_files_point_garak_at_the_server(tmp_path):
    from harc.serve.redteam import garak_files

    cfg, opts = garak_files(tmp_path, "http://127.0.0.1:1234/v1", max_tokens=32, prompt_cap=4,
                            generations=2, seed=7, parallel=1)
    c = json.loads(cfg.read_text())
    assert c["run"] == {"generations": 2, "soft_probe_prompt_cap": 4, "seed": 7}
    assert c["system"]["parallel_attempts"] is False
    assert Path(c["reporting"]["report_dir"]).is_relative_to(tmp_path.resolve())
    o = json.loads(opts.read_text())["openai"]["OpenAICompatible"]
    assert o["uri"] == "http://127.0.0.1:1234/v1" and o["max_tokens"] == 32 and o["stop"] == []


def test_missing_garak_is_a_one_line_error():
    from harc.serve.redteam import garak_version

    if importlib.util.find_spec("garak") is not None:
        pytest.skip("garak is installed here")
    with pytest.raises(HarcError, match="garak is not installed"):
        garak_version(sys.executable)


def test_a_failing_garak_run_reports_its_last_line(tmp_path):
    from harc.serve.redteam import run_garak

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'loading'\necho 'Unknown probes: nope.Nope' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    cfg, opts = tmp_path / "c.json", tmp_path / "o.json"
    with pytest.raises(HarcError) as e:
        run_garak(str(fake), "m", ["nope.Nope"], tmp_path, "key", config=cfg, options=opts,
                  timeout=30)
    assert "exit 3" in str(e.value) and "Unknown probes: nope.Nope" in str(e.value)
    assert os.path.exists(tmp_path / "garak.m.log")


def test_redteam_checks_targets_before_starting_anything():
    from harc.serve.config import ServeConfig
    from harc.serve.redteam import run_redteam

    with pytest.raises(HarcError, match="unknown target"):
        run_redteam(ServeConfig(), None, None, probes=["dan.Dan_11_0"], targets=["nobody"],
                    out_dir=Path("unused"), garak_python=sys.executable, max_tokens=8,
                    prompt_cap=1)
