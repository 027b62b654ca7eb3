"""garak's report JSONL -> the redteam block -> the report section and results.json."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from harc.errors import HarcError

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).parents[2] / "fixtures" / "garak" / "report-0.17.1.jsonl"


def test_parse_report_counts_hits_per_detector_and_per_output():
    from harc.report import wilson_interval
    from harc.serve.redteam import parse_report

    rep = parse_report(FIXTURE, examples=2)
    assert rep["garak_version"] == "0.17.1"
    assert set(rep["probes"]) == {"dan.Dan_11_0", "encoding.InjectBase64"}
    dan = rep["probes"]["dan.Dan_11_0"]
    assert dan["detectors"]["mitigation.MitigationBypass"] == {
        "n": 1, "hits": 1, "nones": 0, "rate": 1.0, "ci": list(wilson_interval(1, 1))}
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


def _block():
    from harc.serve.redteam import parse_report

    rep = parse_report(FIXTURE)
    blocked = json.loads(json.dumps(rep["probes"]))
    blocked["dan.Dan_11_0"]["detectors"]["mitigation.MitigationBypass"].update(hits=0, rate=0.0)
    return {"tool": "garak", "garak_version": "0.17.1", "model": "m",
            "probes": ["dan.Dan_11_0", "encoding.InjectBase64"],
            "settings": {"generations": 1, "prompt_cap": 6, "max_tokens": 48},
            "targets": [{"name": "m", "adapter": None, "layers": [], "wall_s": 3.0,
                         "probes": rep["probes"], "examples": rep["examples"]},
                        {"name": "m+keyword", "adapter": None, "layers": ["keyword"],
                         "wall_s": 2.0, "probes": blocked, "examples": []}]}


def test_section_shows_rates_per_served_model_and_deltas():
    from harc.report import Table
    from harc.serve.report_section import redteam_section

    assert redteam_section({}) is None and redteam_section({"redteam": {"targets": []}}) is None
    sec = redteam_section({"redteam": _block()})
    table = next(b for b in sec.blocks if isinstance(b, Table))
    assert table.headers == ["Probe", "Detector", "m", "m+keyword", "Δ m+keyword vs m"]
    rows = {(r[0], r[1]): r for r in table.rows}
    bypass = rows[("dan.Dan_11_0", "mitigation.MitigationBypass")]
    assert [c.text for c in bypass[2:]] == ["100.0%", "0.0%", "−100.0 pp"]
    assert bypass[2].sub.endswith("1/1") and bypass[4].cls == "better"
    assert rows[("encoding.InjectBase64", "any detector")][2].text == "16.7%"


def test_merge_and_report_render_the_block(tmp_path, monkeypatch):
    import harc.report
    from harc.report import SECTIONS, write_report
    from harc.serve.report_section import merge_redteam, mount_section, redteam_section

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"title": "eval", "runs": [{"name": "base", "mean_asr": 0.5}]}))
    merge_redteam(results, _block())
    res = json.loads(results.read_text())
    assert res["runs"][0]["name"] == "base" and res["redteam"]["model"] == "m"  # kept, added
    fresh = merge_redteam(tmp_path / "new" / "results.json", _block())
    assert json.loads(fresh.read_text())["title"] == "red-team of m"
    monkeypatch.setattr(harc.report, "SECTIONS", SECTIONS)  # restored after the test
    mount_section()
    mount_section()
    assert harc.report.SECTIONS.count(redteam_section) == 1
    assert harc.report.SECTIONS[-1] is SECTIONS[-1]  # provenance stays last
    html = write_report(results, tmp_path / "report")["html"].read_text()
    assert 'id="redteam"' in html
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
    pytest.importorskip("pydantic")
    from harc.serve.config import ServeConfig
    from harc.serve.redteam import run_redteam

    with pytest.raises(HarcError, match="unknown target"):
        run_redteam(ServeConfig(), None, None, probes=["dan.Dan_11_0"], targets=["nobody"],
                    out_dir=Path("unused"), garak_python=sys.executable, max_tokens=8,
                    prompt_cap=1)
