import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harc.errors import HarcError
from harc.eval.results import cell_rate, load_results, mean_asr
from harc.report import write_report
from harc.stats import wilson

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "results_example.json"
# any attribute that would make the browser fetch something from the network
REMOTE = re.compile(r"""\b(?:src|href|srcset|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//""",
                    re.I)


@pytest.fixture(scope="module")
def results():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(FIXTURE, out)  # from a path, as the CLI does
    return out, paths, paths["html"].read_text(), paths["md"].read_text()


# ---------------------------------------------------------------- statistics


def test_wilson_hand_computed():
    # z = 2, k = 2, n = 4: p = .5, z2/n = 1, centre = (.5 + .5) / 2 = .5,
    # half = 2 * sqrt(.25/4 + 4/64) / 2 = sqrt(.125) -> .5 -+ .353553
    assert wilson(2, 4, z=2) == pytest.approx([0.5 - 0.125 ** 0.5, 0.5 + 0.125 ** 0.5])
    # z = 2, k = 0, n = 4: centre = .5 / 2 = .25, half = 2 * sqrt(4/64) / 2 = .25
    assert wilson(0, 4, z=2) == pytest.approx([0.0, 0.5])
    # published z = 1.96 values: 5/10 -> [.2366, .7634], 0/10 -> [0, .2775], 10/10 -> [.7225, 1]
    assert wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == [0.0, 1.0]
    lo, hi = wilson(23, 250)
    lo2, hi2 = wilson(227, 250)
    assert (lo, hi) == pytest.approx((1 - hi2, 1 - lo2))  # symmetric in k <-> n-k


def test_cell_rate_derives_missing_pieces():
    assert cell_rate({"n": 10, "success": 5}) == pytest.approx((0.5, 0.2366, 0.7634), abs=1e-4)
    assert cell_rate({"asr": 0.3, "ci": [0.1, 0.5]}) == (0.3, 0.1, 0.5)
    assert cell_rate(None) == (None, None, None)
    assert cell_rate({"n": 4, "refused": 1}, "rate", "refused")[0] == 0.25
    assert mean_asr({"attacks": {"a": {"asr": 0.2}, "b": {"asr": 0.4}, "c": {"asr": 1.0}},
                     "mean_asr_attacks": ["a", "b"]}) == pytest.approx(0.3)


def test_fixture_is_internally_consistent(results):
    for run in results["runs"]:
        for name, c in run["attacks"].items():
            assert c["asr"] == pytest.approx(c["success"] / c["n"], abs=1e-4), name
            assert c["ci"] == pytest.approx(wilson(c["success"], c["n"]), abs=1e-4)
        assert mean_asr({**run, "mean_asr": None}) == pytest.approx(run["mean_asr"])


# ---------------------------------------------------------------- report


def test_writes_html_md_and_pngs(report):
    out, paths, html, md = report
    assert paths["html"] == out / "report.html" and paths["md"] == out / "report.md"
    pngs = {k: p for k, p in paths.items() if k not in ("html", "md")}
    assert {"asr_bars", "tradeoff", "geometry", "layer_scores", "cross_cos_before",
            "cross_cos_after", "plane_base", "plane_harc", "training"} <= set(pngs)
    for name, p in pngs.items():
        assert p.read_bytes().startswith(b"\x89PNG"), name
        assert f"]({name}.png)" in md  # Markdown references each PNG beside it
    # every figure is embedded once in the HTML, and nothing else is an image source
    assert html.count('src="data:image/png;base64,') == len(pngs)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_html_is_self_contained(report):
    _, _, html, _ = report
    assert not REMOTE.search(html)
    assert "<link" not in html and "<script" not in html and "@import" not in html
    assert "url(" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_html_and_md_hold_the_fixture_numbers(report, results):
    _, _, html, md = report
    base, harc = results["runs"]
    for text in (html, md):
        for run in (base, harc):
            for name, c in run["attacks"].items():
                lo, hi = c["ci"]
                assert f"{100 * c['asr']:.1f}%" in text, name
                assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in text
                assert f"{c['success']}/{c['n']}" in text
            for s, c in run["over_refusal"].items():
                assert f"{100 * c['rate']:.1f}%" in text and s in text
        assert "63.0%" in text and "16.0%" in text and "−47.0 pp" in text  # mean ASR, delta
        assert "0.0213" in text  # KL vs base
        assert "0.859" in text  # rubric judge kappa
        assert results["data"]["xstest_safe"]["sha256"] in text
        assert "4.56.1" in text  # transformers version
        assert "hard-1k sample" in text  # data source
        assert "code_attack" in text and "cybercrime" in text  # per-category breakdown
    # judge named per attack row
    assert re.search(r"<td>pair</td><td>rubric</td>", html)
    assert re.search(r"<td>direct</td><td>refusal_string</td>", html)
    # the delta that got worse is marked so, the improvement too
    assert 'class="worse num">+0.5 pp' in html and 'class="better num">−56.0 pp' in html
    assert "&#34;ramp_step&#34;: 1000" in html  # exact config at the end, escaped
    assert html.index('id="provenance"') > html.index('id="training"')


def test_generations_are_escaped(results, tmp_path):
    res = copy.deepcopy(results)
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    res["runs"][0]["examples"][0]["response"] = evil
    res["runs"][0]["examples"][0]["prompt"] = "```\n" + evil
    res["runs"][1]["name"] = "harc<b>"
    res["data"]["xstest_safe"]["source"] = "https://example.com/x?a=1&b=2"
    res["config"]["note"] = "</pre><script>bad()</script>"
    paths = write_report(res, tmp_path)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    assert "<script" not in html and "<b>" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "&lt;/pre&gt;&lt;script&gt;bad()" in html
    assert "harc&lt;b&gt;" in html
    assert "https://example.com/x?a=1&amp;b=2" in html  # shown as text, never as a link
    assert not REMOTE.search(html)
    # Markdown: generations sit in fences longer than any backtick run inside them
    assert "````text\n```\n<script>" in md
    assert "harc&lt;b&gt;" in md


@pytest.mark.parametrize("drop", [
    "all", "runs", "geometry", "training", "judges", "one_run", "no_examples", "only_after",
    "bare_run",
])
def test_missing_sections_are_left_out(results, tmp_path, drop):
    res = copy.deepcopy(results)
    absent = []
    if drop == "all":
        res = {}
        absent = ["summary", "attacks", "geometry", "training", "judges", "examples"]
    elif drop == "runs":
        del res["runs"]
        absent = ["summary", "attacks", "categories", "refusal", "plane", "examples"]
    elif drop in ("geometry", "training", "judges"):
        del res[drop]
        absent = [drop]
    elif drop == "one_run":
        res["runs"] = res["runs"][:1]
    elif drop == "no_examples":
        for r in res["runs"]:
            del r["examples"], r["plane"], r["over_refusal"], r["benign_refusal"]
        absent = ["examples", "plane", "refusal"]
    elif drop == "only_after":
        del res["geometry"]["before"]
        del res["geometry"]["after"]["cross_cos"]
    elif drop == "bare_run":
        res["runs"] = [{"name": "x", "attacks": {"a": {"n": 3, "success": 1}}}]
        absent = ["refusal", "capability", "categories"]
    paths = write_report(res, tmp_path)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    assert html.startswith("<!DOCTYPE html>") and md.startswith("# ")
    assert "could not be rendered" not in html
    for sec in absent:
        assert f'id="{sec}"' not in html, sec
    if drop == "one_run":
        assert "vs base</th>" not in html and "63.0%" in html  # no delta columns
    if drop == "bare_run":
        assert "33.3%" in html and "[6.1, 79.2] 1/3" in html  # derived from counts
    if drop == "only_after":
        assert 'id="geometry"' in html and "layer_scores" in paths


def test_malformed_part_costs_only_its_section(results, tmp_path):
    res = copy.deepcopy(results)
    res["training"]["log"] = [{"step": 1, "loss": "nan?"}, 7]
    res["runs"][0]["plane"]["points"]["pair"] = [[0.1, 0.2], "oops"]
    res["geometry"]["before"]["cross_cos"] = {"21": [[1, 2], [3]]}
    paths = write_report(res, tmp_path)
    html = paths["html"].read_text()
    assert 'id="attacks"' in html and "63.0%" in html
    sections = dict(re.findall(r'<section id="([a-z_]+)">(.*?)</section>', html, re.S))
    broken = {k for k, v in sections.items() if "could not be rendered" in v}
    assert broken == {"geometry", "plane"}  # the failure is shown where it happened
    assert {"summary", "attacks", "refusal", "judges", "training", "examples",
            "provenance"} <= set(sections)


def test_report_writes_are_atomic(results, tmp_path, monkeypatch):
    (tmp_path / "report.html").write_text("previous report")
    real = Path.write_text

    def crash_mid_write(self, text, *a, **k):
        if self.name.startswith(".report.html."):
            real(self, text[:100], *a, **k)  # half written, then the disk "fails"
            raise OSError("disk full")
        return real(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", crash_mid_write)
    with pytest.raises(OSError):
        write_report(results, tmp_path)
    assert (tmp_path / "report.html").read_text() == "previous report"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_bad_results_input_is_a_harc_error(tmp_path):
    with pytest.raises(HarcError, match="not found"):
        load_results(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(HarcError, match="JSON"):
        write_report(tmp_path / "bad.json", tmp_path / "out")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(HarcError, match="list"):
        load_results(tmp_path / "list.json")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, paths, _, _ = report
    shot = tmp_path / "report.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", "--window-size=1280,2000",
           paths["html"].resolve().as_uri()]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 50_000
    from PIL import Image

    im = Image.open(shot).convert("RGB")
    assert im.size == (1280, 2000)
    # a blank or error page has a handful of colours; tables, text and plots have many
    colours = im.resize((320, 500)).getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 500
