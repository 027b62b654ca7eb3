"""The report says what its numbers show: geometry, planes, verdicts, data sets, perplexity,
training speed, capability caveats and run names (issue #16, item 5)."""

import copy
import html as htmllib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from harc.eval.results import capability_caveat, perplexity, run_label, training_speed
from harc.report import build_document, plots, run_sections, sections, write_report

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "results_example.json"


@pytest.fixture
def results():
    return json.loads(FIXTURE.read_text())


def _text(html: str) -> str:
    """The visible text of the page, entities decoded, whitespace collapsed."""
    return " ".join(htmllib.unescape(re.sub(r"<[^>]+>", " ", html)).split())


def _table(section, caption_or_index=0):
    tables = [b for b in section.blocks if type(b).__name__ == "Table"]
    if isinstance(caption_or_index, str):
        return next(t for t in tables if t.caption.startswith(caption_or_index))
    return tables[caption_or_index]


def _row(table, label):
    row = next(r for r in table.rows if r[0].text.startswith(label))
    return {h: c.text for h, c in zip(table.headers, row, strict=True)}


# ---------------------------------------------------------------- geometry


def test_falling_geometry_is_reported_as_falling(results, tmp_path):
    g = results["geometry"]
    sel = g["before"]["selected_layers"]  # 21..24
    for s in sel:  # after training the two directions drift apart at every selected layer
        g["after"]["cos_ref_harm"][s] = round(g["before"]["cos_ref_harm"][s] - 0.09, 4)
        g["after"]["ci_lo"][s] = g["after"]["cos_ref_harm"][s] - 0.005
        g["after"]["ci_hi"][s] = g["after"]["cos_ref_harm"][s] + 0.005
    before = [g["before"]["cos_ref_harm"][s] for s in sel]
    after = [g["after"]["cos_ref_harm"][s] for s in sel]
    mb, ma = sum(before) / 4, sum(after) / 4
    paths = write_report(results, tmp_path)
    html = paths["html"].read_text()
    geo = html[html.index('<section id="geometry"'):html.index('<section id="plane"')]
    assert "−0.090" in geo and "better" not in geo and "worse" not in geo  # Δ shown neutrally
    for text in (_text(html), paths["md"].read_text()):
        assert (f"cos(v_ref, v_harm) fell at the layers 21, 22, 23, 24 selected on the base "
                f"model: from a mean of {mb:.3f} before training to {ma:.3f} after") in text
        assert "it fell at all 4 layers" in text
        assert "should rise" not in text and "rose" not in text
    assert mb == pytest.approx(0.100875) and ma == pytest.approx(0.010875)


def test_rising_geometry_is_reported_as_rising_with_its_intervals(results):
    g = results["geometry"]
    text = run_sections.geometry_statement(g["before"], g["after"])
    assert text.startswith("cos(v_ref, v_harm) rose at the layers 21, 22, 23, 24")
    assert "from a mean of 0.101 before training to 0.330 after" in text
    assert "it rose at all 4 layers" in text
    assert "At 4 of the 4 layers the 95% bootstrap intervals do not overlap" in text
    # mixed directions are counted, one layer at a time
    after = copy.deepcopy(g["after"])
    after["cos_ref_harm"][21] = 0.0
    after["ci_lo"][21], after["ci_hi"][21] = -0.01, 0.01
    text = run_sections.geometry_statement(g["before"], after)
    assert "it rose at 3 and fell at 1 of the 4 layers" in text


# ---------------------------------------------------------------- plane


def test_plane_caption_matches_what_is_drawn(results):
    sec = run_sections.plane(results, results["runs"])
    caption = sec.blocks[0].text
    has_ref = any(n in ("direct", "harmful (direct)") for r in results["runs"]
                  for n in r["plane"]["points"])
    assert ("Arrows run from the centroid" in caption) == has_ref
    no_ref = copy.deepcopy(results)
    for r in no_ref["runs"]:
        r["plane"]["points"] = {k: v for k, v in r["plane"]["points"].items()
                                if k not in ("direct", "harmful (direct)")}
    caption = run_sections.plane(no_ref, no_ref["runs"]).blocks[0].text
    assert "Arrow" not in caption and "arrow" not in caption


def test_plane_draws_arrows_from_the_direct_attack_and_hollow_centroids_on_top():
    rng = np.random.default_rng(0)
    # a tight cloud: every point would sit under a filled centroid marker
    pts = {"direct": rng.normal(size=(8, 2)), "code_attack": 0.001 * rng.normal(size=(99, 2)),
           "pap": rng.normal(size=(8, 2)), "xstest": rng.normal(size=(8, 2))}
    ax = plots.plot_plane(pts, 3, reference="direct").axes[0]
    assert len(ax.patches) == 2  # direct -> code_attack, direct -> pap
    clouds, (cents,) = ax.collections[:-1], ax.collections[-1:]
    assert cents.get_label() == "centroids"
    assert np.all(cents.get_facecolors()[:, 3] == 0)  # hollow: the cloud shows through
    assert cents.get_zorder() > max(c.get_zorder() for c in clouds)
    assert len(plots.plot_plane(pts, 3, reference=None).axes[0].patches) == 0


# ---------------------------------------------------------------- samples


def test_samples_show_the_judges_verdict(results):
    ex = results["runs"][1]["examples"]
    ex[0].update(refused=True, harmful=False, judge="rubric", rationale="declines <politely>")
    ex[1].pop("refused"), ex[1].pop("harmful")
    sec = sections.examples(results, results["runs"])
    summaries = [d.summary for run in sec.blocks for d in run.blocks]
    assert not any("unjudged" in s for s in summaries)
    harc = sec.blocks[1].blocks
    assert "refused: yes, harmful: no (rubric)" in harc[0].summary
    assert "no verdict recorded" in harc[1].summary
    assert [b.text for b in harc[0].blocks][-1] == "declines <politely>"  # the rationale
    base = sec.blocks[0].blocks
    assert base[0].summary.startswith("pap — refused: no, harmful: yes — As a security")


# ---------------------------------------------------------------- data sets


def test_data_table_rows_are_the_data_sets_of_a_run(results):
    results["data"] = {  # as `harc run` writes it
        "sizes": {"harmful_extract": 298, "harmful_validate": 99, "harmful_train": 99,
                  "harmless_extract": 180, "harmless_validate": 60, "harmless_train": 60,
                  "harmful_eval": 240, "pseudo": 150},
        "pseudo_train": 75, "pseudo_eval": 75,
        "removed_near_duplicates": {"harmful:internal": 24, "harmful:vs_eval": 0},
        "overlaps": {"harmful:extract~validate": 0, "harmless:extract~train": 2},
        "sets": {"harmful": "advbench", "harmful_eval": "harmbench", "harmless": "harc-benign",
                 "pseudo": "harc-pseudo-harmful"},
    }
    sec = run_sections.provenance(results, results["runs"])
    table = _table(sec, "Data sets")
    assert [r[0].text for r in table.rows] == ["advbench", "harmbench", "harc-benign",
                                               "harc-pseudo-harmful"]
    assert _row(table, "advbench") == {
        "Data set": "advbench", "Role": "harmful", "n": "496",
        "Splits": "extract 298 · validate 99 · train 99", "Near-duplicates removed": "internal 24"}
    assert _row(table, "harmbench")["n"] == "240"
    assert _row(table, "harc-pseudo-harmful")["Splits"] == "train 75 · eval 75"
    assert "harmless:extract~train 2" in sec.blocks[sec.blocks.index(table) + 1].text


def test_directions_files_are_explained(results):
    sec = run_sections.provenance(results, results["runs"])
    table = _table(sec, "The directions files")
    assert [r[0].text for r in table.rows] == [
        "extract/directions.safetensors", "train/directions.safetensors",
        "train/adapter/directions.safetensors", "geometry_after/directions.safetensors"]
    assert "re-extracted with the adapter on" in table.rows[3][1].text


# ---------------------------------------------------------------- run names


def test_filtered_run_names_are_not_doubled(results, tmp_path):
    base = results["runs"][0]
    filtered = {**copy.deepcopy(base), "name": "base+keyword", "filter": "keyword"}
    results["runs"] = [base, filtered]
    assert run_label(filtered) == "base+keyword"
    assert run_label({"name": "base", "filter": "keyword"}) == "base + keyword"
    paths = write_report(results, tmp_path)
    html, md = paths["html"].read_text(), paths["md"].read_text()
    for text in (html, md):
        assert "keyword + keyword" not in text and "base+keyword + keyword" not in text
        assert "Δ base+keyword vs base" in text
    assert "plane_base_keyword" in paths and (tmp_path / "plane_base_keyword.png").is_file()
    assert not list(tmp_path.glob("*keyword_keyword*"))


# ---------------------------------------------------------------- capability and perplexity


def _real_capability(results):
    base, harc = results["runs"]
    base["capability"] = {"items": {"n": 60, "correct": 37, "acc": 37 / 60}}
    harc["capability"] = {"items": {"n": 60, "correct": 37, "acc": 37 / 60},
                          "kl_vs_base": 0.0034, "ppl": 1.7864, "ppl_base": 1.7924}
    return results


def test_perplexity_of_base_and_adapter_sit_in_their_columns(results):
    res = _real_capability(results)
    base, harc = res["runs"]
    assert perplexity(base, res["runs"]) == 1.7924 and perplexity(harc, res["runs"]) == 1.7864
    for sec in (sections.summary(res, res["runs"]), sections.capability(res, res["runs"])):
        row = _row(_table(sec), "Perplexity")
        assert row["base"] == "1.79" and row["harc"] == "1.79"
        assert row["Δ harc vs base"] == "−0.01"
    # an adapter run without its own perplexity never borrows the base's
    del harc["capability"]["ppl"]
    assert perplexity(harc, res["runs"]) is None
    res["runs"][1]["capability"]["ppl"] = 9.5
    row = _row(_table(sections.capability(res, res["runs"])), "Perplexity")
    assert (row["base"], row["harc"]) == ("1.79", "9.50")


def test_uninformative_capability_is_said_plainly(results):
    assert capability_caveat(results["runs"]) is None  # 300 items, ~70% right
    for r in results["runs"]:
        r["capability"]["items"] = {"n": 20, "correct": 0, "acc": 0.0}
    caveat = capability_caveat(results["runs"])
    assert "all 20 capability items wrong" in caveat and "not informative" in caveat
    cards, secs = build_document(results)
    cap = next(s for s in secs if s.id == "capability")
    assert any("Not informative" in b.text for b in cap.blocks if hasattr(b, "text")
               and isinstance(b.text, str))
    assert ("Capability items", "0.0% → 0.0%", "not informative at this size") in cards.items
    for r in results["runs"]:
        r["capability"]["items"] = {"n": 20, "correct": 9, "acc": 0.45}
    assert "only 20 capability items" in capability_caveat(results["runs"])


# ---------------------------------------------------------------- training speed


def test_training_speed_is_the_median_of_typical_steps(results):
    log = [{"step": s, "loss": 1.0, "layers": [3, 4] if s <= 12 else [2, 3],
            "tokens_per_s": 190.0 + s % 3} for s in range(1, 25)]
    log[0]["tokens_per_s"] = 4.0  # warm-up
    log[12]["tokens_per_s"] = 6.0  # step 13: after the refresh at 12, new layers
    log[-1]["tokens_per_s"] = 6.6  # a slow last step
    median, n = training_speed(log, refresh_every=12)
    assert n == 22  # steps 1 (warm-up) and 13 (after the refresh) are left out
    assert median == 191.0  # 6.6, 7 x 190, 6 x 191, 8 x 192: the 11th and 12th are 191
    results["training"]["log"] = log
    results["config"]["train"]["refresh_every"] = 12
    text = run_sections.training(results, []).blocks[0].text
    assert "191 tokens/s (median of 22 steps" in text
    assert "tokens_per_s" not in text and "6.6" not in text
