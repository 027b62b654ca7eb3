"""results.json -> one self-contained `report.html` and a `report.md` with PNG plots beside it.

The report is built once as a small document tree (sections of tables, figures, text, collapsed
details) and rendered twice, so the HTML and the Markdown always hold the same numbers. Every
accessor tolerates absent keys: a section whose data is missing is left out, never an error.
All text coming from results.json (prompts, generations, names, configs) is HTML-escaped at
render time; the only markup in the output is written here.

Results are read through `harc.eval.results`; `harc.report.plots` is imported only when figures
are drawn (matplotlib is slow to load).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harc.errors import HarcError
from harc.eval.results import _num, cell_rate, load_results, mean_asr, run_label
from harc.io import atomic_write, atomic_write_text, sha256_json

# ---------------------------------------------------------------------------------------------
# Document tree


@dataclass
class Cell:
    text: str
    sub: str = ""  # secondary detail (interval, counts): small grey text
    cls: str = ""  # "better" / "worse" / "strong": styling only, the text carries the meaning
    num: bool = False  # right-aligned with tabular digits


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell | str]]
    caption: str = ""


@dataclass
class Text:
    text: str
    muted: bool = False


@dataclass
class Code:
    text: str


@dataclass
class Figure:
    name: str  # PNG file stem beside report.md
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Grid:  # figures side by side in the HTML, one after another in Markdown
    items: list[Figure]


@dataclass
class Cards:  # headline numbers
    items: list[tuple[str, str, str]]  # (label, value, note)


@dataclass
class Details:
    summary: str
    blocks: list
    open: bool = False


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Formatting


def pct(v: float | None, d: int = 1) -> str:
    return "—" if v is None else f"{100 * v:.{d}f}%"


def fnum(v, d: int = 3) -> str:
    v = _num(v)
    return "—" if v is None else f"{v:.{d}f}"


def _rate_cell(cell: Mapping | None, rate_key="asr", count_key="success") -> Cell:
    rate, lo, hi = cell_rate(cell, rate_key, count_key)
    if rate is None:
        return Cell("—", num=True)
    sub = f"[{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else ""
    k, n = (cell or {}).get(count_key), (cell or {}).get("n")
    if k is not None and n is not None:
        sub += f" {k}/{n}"
    return Cell(pct(rate), sub.strip(), num=True)


def _delta_cell(a: float | None, b: float | None, lower_better: bool, unit: str = "pp",
                scale: float = 100.0, d: int = 1) -> Cell:
    """b - a; class marks the direction that is an improvement for this metric."""
    if a is None or b is None:
        return Cell("—", num=True)
    diff = (b - a) * scale
    if abs(diff) < 0.5 * 10 ** (-d):  # rounds to zero: neither better nor worse
        return Cell(f"{0:.{d}f} {unit}".strip(), num=True)
    better = (diff < 0) == lower_better
    text = f"{diff:+.{d}f} {unit}".strip().replace("-", "−")  # typographic minus
    return Cell(text, cls="better" if better else "worse", num=True)


def _runs(res: Mapping) -> list[dict]:
    runs = res.get("runs")
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _delta_headers(runs: list[dict]) -> list[str]:
    return [f"Δ {run_label(r)} vs {run_label(runs[0])}" for r in runs[1:]]


# ---------------------------------------------------------------------------------------------
# Sections


def _figure(name: str, build: Callable[[], Any], alt: str, caption: str = "") -> Figure | None:
    """Draw one plot; None when its data is absent (HarcError from the plot: nothing to draw)."""
    from harc.report import plots  # matplotlib loads only when a report is drawn

    try:
        fig = build()
    except HarcError:
        return None
    return Figure(name, plots.fig_to_png_bytes(fig), alt, caption)


def _header_cards(res: Mapping, runs: list[dict]) -> Cards | None:
    if not runs:
        return None
    first, last = runs[0], runs[-1]
    items = []
    m0, m1 = mean_asr(first), mean_asr(last)
    if m1 is not None:
        if len(runs) > 1 and m0 is not None:
            ratio = f", {m0 / m1:.1f}× lower" if m1 > 0 and m0 > m1 else ""
            items.append(("Mean attack success", f"{pct(m0)} → {pct(m1)}",
                          f"{run_label(first)} → {run_label(last)}{ratio}"))
        else:
            items.append(("Mean attack success", pct(m1), run_label(last)))
    for s in (last.get("over_refusal") or {}):
        r1 = cell_rate(last["over_refusal"][s], "rate", "refused")[0]
        r0 = cell_rate((first.get("over_refusal") or {}).get(s), "rate", "refused")[0]
        if r1 is None:
            continue
        val = f"{pct(r0)} → {pct(r1)}" if len(runs) > 1 and r0 is not None else pct(r1)
        items.append((f"Over-refusal: {s}", val, "refusal rate on safe prompts"))
    cap1 = cell_rate((last.get("capability") or {}).get("items"), "acc", "correct")[0]
    cap0 = cell_rate((first.get("capability") or {}).get("items"), "acc", "correct")[0]
    if cap1 is not None:
        val = f"{pct(cap0)} → {pct(cap1)}" if len(runs) > 1 and cap0 is not None else pct(cap1)
        items.append(("Capability items", val, "accuracy"))
    kl = _num((last.get("capability") or {}).get("kl_vs_base"))
    if kl is not None:
        items.append(("KL vs base", fnum(kl, 4), run_label(last)))
    return Cards(items) if items else None


def _summary(res: Mapping, runs: list[dict]) -> Section | None:
    if not runs:
        return None
    rows: list[list] = []

    def add(label, cells_fn, value_fn, lower_better, unit="pp", scale=100.0, d=1):
        cells = [cells_fn(r) for r in runs]
        if all(c.text == "—" for c in cells):
            return
        vals = [value_fn(r) for r in runs]
        deltas = [_delta_cell(vals[0], v, lower_better, unit, scale, d) for v in vals[1:]]
        rows.append([label, *cells, *deltas])

    attacks = runs[0].get("mean_asr_attacks") or []
    add("Mean ASR" + (f" ({', '.join(attacks)})" if attacks else ""),
        lambda r: Cell(pct(mean_asr(r)), cls="strong", num=True), mean_asr, True)
    sets: list[str] = []
    for r in runs:
        sets += [s for s in (r.get("over_refusal") or {}) if s not in sets]
    for s in sets:
        def get(r, s=s):
            return (r.get("over_refusal") or {}).get(s)
        add(f"Over-refusal: {s}", lambda r, g=get: _rate_cell(g(r), "rate", "refused"),
            lambda r, g=get: cell_rate(g(r), "rate", "refused")[0], True)
    add("Benign refusal", lambda r: _rate_cell(r.get("benign_refusal"), "rate", "refused"),
        lambda r: cell_rate(r.get("benign_refusal"), "rate", "refused")[0], True)

    def cap(r):
        return r.get("capability") or {}
    add("Capability items accuracy", lambda r: _rate_cell(cap(r).get("items"), "acc", "correct"),
        lambda r: cell_rate(cap(r).get("items"), "acc", "correct")[0], False)
    add("KL vs base (nats/token)", lambda r: Cell(fnum(cap(r).get("kl_vs_base"), 4), num=True),
        lambda r: _num(cap(r).get("kl_vs_base")), True, unit="", scale=1.0, d=4)
    add("Perplexity", lambda r: Cell(fnum(cap(r).get("ppl"), 2),
                                     f"base {fnum(cap(r).get('ppl_base'), 2)}"
                                     if _num(cap(r).get("ppl_base")) is not None else "",
                                     num=True),
        lambda r: _num(cap(r).get("ppl")), True, unit="", scale=1.0, d=2)
    add("Evaluation wall time", lambda r: Cell(_dur(r.get("wall_s")), num=True),
        lambda r: None, True)
    if not rows:
        return None
    headers = ["Metric", *[run_label(r) for r in runs], *_delta_headers(runs)]
    sec = Section("summary", "Summary", [Table(headers, rows)])
    delta = "; Δ in percentage points (pp)" if len(runs) > 1 else ""
    sec.blocks.append(Text(f"Rates with 95% Wilson intervals in brackets and counts{delta}. "
                           "Lower is better for attack success and refusal rates.", muted=True))
    return sec


def _dur(s) -> str:
    s = _num(s)
    if s is None:
        return "—"
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _attacks(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    runs_a = [r for r in runs if r.get("attacks")]
    if not runs_a:
        return None
    names: list[str] = []
    for r in runs_a:
        names += [a for a in r["attacks"] if a not in names]
    rows = []
    for a in names:
        cells = [r["attacks"].get(a) for r in runs_a]
        judges = []
        for c in cells:
            j = (c or {}).get("judge")
            if j and j not in judges:
                judges.append(str(j))
        vals = [cell_rate(c)[0] for c in cells]
        rows.append([a, " / ".join(judges) or "—",
                     *[_rate_cell(c) for c in cells],
                     *[_delta_cell(vals[0], v, True) for v in vals[1:]]])
    means = [mean_asr(r) for r in runs_a]
    rows.append([Cell("Mean ASR", cls="strong"),
                 ", ".join(runs_a[0].get("mean_asr_attacks") or names),
                 *[Cell(pct(m), cls="strong", num=True) for m in means],
                 *[_delta_cell(means[0], m, True) for m in means[1:]]])
    headers = ["Attack", "Judge", *[run_label(r) for r in runs_a], *_delta_headers(runs_a)]
    sec = Section("attacks", "Attack success per attack", [Table(headers, rows)])
    fig = _figure("asr_bars", lambda: plots.plot_asr_bars(runs_a),
                  "Grouped bars of attack success rate per attack and run with error bars")
    if fig:
        sec.blocks.append(fig)
    return sec


def _per_category(res: Mapping, runs: list[dict]) -> Section | None:
    runs_a = [r for r in runs if r.get("attacks")]
    names: list[str] = []
    for r in runs_a:
        names += [a for a, c in r["attacks"].items()
                  if isinstance(c, Mapping) and c.get("per_category") and a not in names]
    if not names:
        return None
    sec = Section("categories", "Per-category breakdown")
    for a in names:
        cats: list[str] = []
        for r in runs_a:
            cats += [c for c in ((r["attacks"].get(a) or {}).get("per_category") or {})
                     if c not in cats]
        rows = []
        for cat in cats:
            cells = [((r["attacks"].get(a) or {}).get("per_category") or {}).get(cat)
                     for r in runs_a]
            vals = [cell_rate(c)[0] for c in cells]
            rows.append([cat, *[_rate_cell(c) for c in cells],
                         *[_delta_cell(vals[0], v, True) for v in vals[1:]]])
        headers = ["Category", *[run_label(r) for r in runs_a], *_delta_headers(runs_a)]
        sec.blocks.append(Details(f"{a}: attack success by category ({len(cats)} categories)",
                                  [Table(headers, rows)]))
    return sec


def _refusal(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    sets: list[str] = []
    for r in runs:
        sets += [s for s in (r.get("over_refusal") or {}) if s not in sets]
    has_benign = any(r.get("benign_refusal") for r in runs)
    if not sets and not has_benign:
        return None
    rows = []
    cells_by_row = [(s, [(r.get("over_refusal") or {}).get(s) for r in runs]) for s in sets]
    if has_benign:
        cells_by_row.append(("benign (should be answered)", [r.get("benign_refusal")
                                                               for r in runs]))
    show_judge = any(isinstance(c, Mapping) and c.get("judge") for _, cs in cells_by_row
                     for c in cs)
    for name, cells in cells_by_row:
        vals = [cell_rate(c, "rate", "refused")[0] for c in cells]
        judge = sorted({str(c["judge"]) for c in cells if isinstance(c, Mapping)
                        and c.get("judge")})
        rows.append([name, *([" / ".join(judge) or "—"] if show_judge else []),
                     *[_rate_cell(c, "rate", "refused") for c in cells],
                     *[_delta_cell(vals[0], v, True) for v in vals[1:]]])
    headers = ["Prompt set", *(["Judge"] if show_judge else []),
               *[run_label(r) for r in runs], *_delta_headers(runs)]
    sec = Section("refusal", "Over-refusal and benign refusal", [Table(headers, rows)])
    if not show_judge:
        primary = (res.get("judges") or {}).get("primary")
        sec.blocks.append(Text("The results do not record which judge scored refusals here"
                               + (f"; the primary judge is {primary}." if primary else "."),
                               muted=True))
    fig = _figure("tradeoff", lambda: plots.plot_tradeoff(runs),
                  "Scatter of mean attack success against over-refusal rate, one point per run",
                  "Each point is one run (model + adapter + filter). x: mean refusal rate over "
                  "the over-refusal sets; y: mean ASR.")
    if fig:
        sec.blocks.append(fig)
    return sec


def _capability(res: Mapping, runs: list[dict]) -> Section | None:
    caps = [r.get("capability") or {} for r in runs]
    if not any(caps):
        return None
    rows = []
    acc = [cell_rate(c.get("items"), "acc", "correct")[0] for c in caps]
    if any(a is not None for a in acc):
        rows.append(["Capability items accuracy",
                     *[_rate_cell(c.get("items"), "acc", "correct") for c in caps],
                     *[_delta_cell(acc[0], a, False) for a in acc[1:]]])
    for key, label, d in (("kl_vs_base", "KL vs base (nats/token)", 4),
                          ("ppl", "Perplexity", 2), ("ppl_base", "Perplexity of the base", 2)):
        vals = [_num(c.get(key)) for c in caps]
        if any(v is not None for v in vals):
            rows.append([label, *[Cell(fnum(v, d), num=True) for v in vals],
                         *[_delta_cell(vals[0], v, True, "", 1.0, d) for v in vals[1:]]])
    if not rows:
        return None
    headers = ["Measure", *[run_label(r) for r in runs], *_delta_headers(runs)]
    return Section("capability", "Capability and drift", [Table(headers, rows)])


def _judges(res: Mapping, runs: list[dict]) -> Section | None:
    j = res.get("judges") or {}
    acc = j.get("accuracy") or {}
    agree = j.get("agreement") or {}
    primary = j.get("primary")
    if not (acc or agree or primary):
        return None
    sec = Section("judges", "Judges")
    if primary:
        sec.blocks.append(Text(f"Primary judge: {primary}. The Judge column of each table "
                               "names the judge that produced its numbers."))
    if acc:
        rows = []
        for name, m in acc.items():
            m = m if isinstance(m, Mapping) else {}
            rows.append([Cell(f"{name} (primary)" if name == primary else str(name),
                              cls="strong" if name == primary else ""),
                         *[Cell(fnum(m.get(k), 3), num=True)
                           for k in ("accuracy", "precision", "recall", "kappa")],
                         Cell(str(m.get("n", "—")), num=True), str(m.get("data", "—"))])
        sec.blocks.append(Table(["Judge", "Accuracy", "Precision", "Recall", "Cohen's κ", "n",
                                 "Gold data"], rows, "Judge accuracy against labelled data"))
    if agree:
        rows = [[pair.replace("|", " vs "), Cell(fnum(k, 3), num=True)]
                for pair, k in agree.items()]
        sec.blocks.append(Table(["Judges", "Cohen's κ"], rows, "Agreement between judges"))
    return sec


def _geometry(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    g = res.get("geometry") or {}
    before, after = g.get("before") or {}, g.get("after") or {}
    if not (before or after):
        return None
    sec = Section("geometry", "Geometry before and after")
    both = before.get("cos_ref_harm") and after.get("cos_ref_harm")
    if both:
        fig = _figure("geometry", lambda: plots.plot_geometry_before_after(before, after),
                      "Line plot of cos(v_ref, v_harm) per layer before and after training")
    else:
        one = before if before.get("cos_ref_harm") else after
        fig = _figure("geometry", lambda: plots.plot_cos_layers(
            one["cos_ref_harm"], one.get("ci_lo") or one["cos_ref_harm"],
            one.get("ci_hi") or one["cos_ref_harm"], one.get("selected_layers")),
            "Line plot of cos(v_ref, v_harm) per layer with bootstrap interval")
    if fig:
        sec.blocks.append(fig)

    # Table at the selected layers: the numbers the training actually acts on.
    sel = sorted({int(s) for d in (before, after) for s in (d.get("selected_layers") or [])})
    if sel and both:
        rows = []
        for s in sel:
            def at(d, key, s=s):
                v = d.get(key) or []
                return _num(v[s]) if s < len(v) else None
            cb, ca = at(before, "cos_ref_harm"), at(after, "cos_ref_harm")
            ci = [(at(d, "ci_lo"), at(d, "ci_hi")) for d in (before, after)]
            sub = [f"[{fnum(lo, 3)}, {fnum(hi, 3)}]" if lo is not None else "" for lo, hi in ci]
            mark = [("✓" if s in (d.get("selected_layers") or []) else "") for d in
                    (before, after)]
            rows.append([Cell(str(s), num=True), Cell(fnum(cb, 3), sub[0], num=True),
                         Cell(fnum(ca, 3), sub[1], num=True),
                         _delta_cell(cb, ca, False, "", 1.0, 3),
                         " ".join(f"{w} {m}" for w, m in zip(("before", "after"), mark,
                                                             strict=True) if m) or "—"])
        sec.blocks.append(Table(["Layer", "cos before [95% CI]", "cos after [95% CI]", "Δ",
                                 "Selected"], rows,
                                "cos(v_ref, v_harm) at the selected layers (HARC couples the "
                                "two directions, so it should rise here)"))

    # Layer scores drive the selection, which is made on the base model's directions: show the
    # scores of "before" (or of "after" when that is all there is).
    src, which = (before, "before") if before.get("score_variant_d") or before.get(
        "score_legacy") else (after, "after")
    scores = {k.removeprefix("score_"): src[k] for k in ("score_variant_d", "score_legacy")
              if src.get(k)}
    band = src.get("band") if isinstance(src.get("band"), list) and len(src["band"]) == 2 \
        else None
    f = _figure("layer_scores", lambda: plots.plot_layer_scores(
        scores, src.get("selected_layers"), tuple(band) if band else None,
        title=f"Layer-selection scores ({which}), each divided by its maximum"),
        f"Layer-selection scores per layer ({which})")
    if f:
        sec.blocks.append(f)
    for label, d in (("before", before), ("after", after)):
        mats = d.get("cross_cos")
        if isinstance(mats, Mapping) and mats:
            f = _figure(f"cross_cos_{label}", lambda m=mats, lab=label: plots.plot_cross_cos(
                {int(k): v for k, v in m.items()},
                title=f"Cosine between the four directions at the selected layers ({lab})"),
                f"Heat maps of cosines between the four directions ({label})")
            if f:
                sec.blocks.append(f)
    return sec if sec.blocks else None


def _plane_limits(runs: list[dict]):
    """Common axes for every run's plane (5% margin), so their clouds compare by eye."""
    xs, ys = [], []
    for r in runs:
        for pts in ((r.get("plane") or {}).get("points") or {}).values():
            for q in pts:
                if isinstance(q, Sequence) and len(q) == 2:
                    xs.append(float(q[0]))
                    ys.append(float(q[1]))
    if not xs:
        return None

    def pad(v):
        lo, hi = min(v), max(v)
        m = 0.05 * (hi - lo or 1.0)
        return lo - m, hi + m

    return pad(xs), pad(ys)


def _plane(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    grid = []
    rows = []
    limits = _plane_limits(runs)
    for r in runs:
        p = r.get("plane") or {}
        pts = p.get("points") or {}
        if not pts:
            continue
        layer = p.get("layer", "?")
        f = _figure(f"plane_{_slug(run_label(r))}", lambda pts=pts, layer=layer, r=r:
                    plots.plot_plane(pts, layer, limits=limits,
                                     title=f"{run_label(r)}: harmfulness-refusal plane, "
                                           f"layer {layer}"),
                    f"Scatter of prompts in the harmfulness-refusal plane for {run_label(r)}")
        if f:
            grid.append(f)
        for name, xy in pts.items():
            xy = [q for q in xy if isinstance(q, Sequence) and len(q) == 2]
            if xy:
                cx = sum(q[0] for q in xy) / len(xy)
                cy = sum(q[1] for q in xy) / len(xy)
                rows.append((run_label(r), name, len(xy), cx, cy))
    if not grid and not rows:
        return None
    sec = Section("plane", "Harmfulness-refusal plane per attack family")
    sec.blocks.append(Text("x: projection of the residual at the last instruction token on "
                           "v_harm; y: projection at the last prompt token on v_ref. Arrows run "
                           "from the directly asked harmful prompts to each jailbreak family: a "
                           "jailbreak that lowers y without lowering x suppresses refusal while "
                           "the model still registers harm.", muted=True))
    if grid:
        sec.blocks.append(Grid(grid))
    if rows:
        sec.blocks.append(Details("Centroids per prompt set", [Table(
            ["Run", "Prompt set", "n", "harmfulness (x)", "refusal (y)"],
            [[a, b, Cell(str(n), num=True), Cell(fnum(x, 3), num=True),
              Cell(fnum(y, 3), num=True)] for a, b, n, x, y in rows])]))
    return sec


def _training(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    t = res.get("training") or {}
    log = t.get("log") if isinstance(t.get("log"), list) else []
    if not (t and (log or t.get("steps"))):
        return None
    sec = Section("training", "Training")
    facts = []
    if t.get("steps") is not None:
        facts.append(f"{t['steps']} steps")
    if _num(t.get("wall_s")) is not None:
        facts.append(f"wall time {_dur(t['wall_s'])}")
    if log and isinstance(log[-1], Mapping):
        last = ", ".join(f"{k} {v:.4g}" for k, v in log[-1].items()
                         if k != "step" and _num(v) is not None)
        facts.append(f"last logged step {log[-1].get('step', '?')}: {last}")
    if facts:
        sec.blocks.append(Text("; ".join(facts) + "."))
    if log:
        f = _figure("training", lambda: plots.plot_training(log),
                    "Small multiples of each training term against step")
        if f:
            sec.blocks.append(f)
    return sec


def _examples(res: Mapping, runs: list[dict]) -> Section | None:
    blocks = []
    for r in runs:
        ex = [e for e in (r.get("examples") or []) if isinstance(e, Mapping)]
        if not ex:
            continue
        inner = []
        for e in ex:
            flags = []
            for key in ("refused", "harmful"):
                if isinstance(e.get(key), bool):
                    flags.append(f"{key}: {'yes' if e[key] else 'no'}")
            prompt = str(e.get("prompt", ""))
            head = prompt if len(prompt) <= 90 else prompt[:87] + "…"
            inner.append(Details(f"{e.get('attack', '?')} — {', '.join(flags) or 'unjudged'} — "
                                 f"{head}", [Text("Prompt", muted=True), Code(prompt),
                                             Text("Response", muted=True),
                                             Code(str(e.get("response", "")))]))
        blocks.append(Details(f"{run_label(r)}: {len(ex)} sample generations", inner,
                              open=True))
    if not blocks:
        return None
    return Section("examples", "Sample generations", blocks)


def _provenance(res: Mapping, runs: list[dict]) -> Section | None:
    sec = Section("provenance", "Configuration, versions and data")
    facts = [("harc version", res.get("harc_version")), ("created", res.get("created")),
             ("results sha256", sha256_json(res))]
    env = res.get("environment") or {}
    rows = [[k, str(v)] for k, v in facts if v] + [[str(k), str(v)] for k, v in env.items()]
    sec.blocks.append(Table(["Item", "Value"], rows, "Versions and environment"))
    model_rows = [[run_label(r), str(r.get("model") or "—"), str(r.get("adapter") or "—"),
                   str(r.get("filter") or "—"), Cell(_dur(r.get("wall_s")), num=True)]
                  for r in runs]
    if model_rows:
        sec.blocks.append(Table(["Run", "Model", "Adapter", "Filter", "Wall time"], model_rows,
                                "Runs"))
    data = res.get("data") or {}
    if data:
        rows = []
        for name, d in data.items():
            d = d if isinstance(d, Mapping) else {}
            rows.append([name, Cell(str(d.get("n", "—")), num=True),
                         Cell(str(d.get("sha256", "—")), cls="mono"),
                         str(d.get("source", "—"))])
        sec.blocks.append(Table(["Data set", "n", "sha256", "Source"], rows, "Data"))
    if res.get("config"):
        sec.blocks.append(Details("Configuration (exact)", [Code(json.dumps(
            res["config"], indent=2, ensure_ascii=False, default=str))]))
    return sec


SECTIONS = (_summary, _attacks, _per_category, _refusal, _capability, _judges, _geometry,
            _plane, _training, _examples, _provenance)


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_") or "x"


def build_document(res: Mapping) -> tuple[Cards | None, list[Section]]:
    runs = _runs(res)
    sections = []
    for build in SECTIONS:
        # One malformed part of results.json costs its own section, not the whole report; the
        # failure is shown in the report so it is not silently lost.
        try:
            sec = build(res, runs)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            name = build.__name__.strip("_")
            sec = Section(name, name.replace("_", " ").capitalize(),
                          [Text(f"This section could not be rendered: {type(e).__name__}: {e}")])
        if sec is not None:
            sections.append(sec)
    try:
        cards = _header_cards(res, runs)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        cards = None
    return cards, sections


# ---------------------------------------------------------------------------------------------
# HTML rendering

CSS = """
:root{--fg:#1f2328;--muted:#5f6b76;--line:#d8dee4;--bg:#fff;--soft:#f5f7f9;--accent:#0072B2;
--better:#0a5c91;--worse:#b34700}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,
"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 32px 64px}
h1{font-size:26px;margin:0 0 4px;line-height:1.25}
h2{font-size:20px;margin:40px 0 12px;padding-bottom:6px;border-bottom:2px solid var(--line)}
.meta{color:var(--muted);font-size:13.5px;margin:0 0 14px}
nav{font-size:13.5px;margin:10px 0 4px;display:flex;flex-wrap:wrap;gap:4px 14px}
nav a{color:var(--accent);text-decoration:none}nav a:hover{text-decoration:underline}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(180px,1fr));gap:12px;
margin:18px 0 8px}
.card{border:1px solid var(--line);border-radius:8px;padding:12px 14px;background:var(--soft)}
.card .label{font-size:12.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.03em}
.card .value{font-size:19px;font-weight:650;margin:2px 0;font-variant-numeric:tabular-nums;
white-space:nowrap}
.card .note{font-size:12.5px;color:var(--muted)}
.tw{overflow-x:auto;margin:10px 0 14px}
table{border-collapse:collapse;font-size:14px;min-width:50%}
caption{text-align:left;font-weight:600;padding:0 0 6px;font-size:14px}
th,td{padding:6px 12px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600;font-size:13px;white-space:nowrap}
td{font-variant-numeric:tabular-nums}
td.num,th.num{text-align:right}
tbody tr:hover{background:#fafbfc}
.sub{display:block;font-size:12px;color:var(--muted);white-space:nowrap}
.better{color:var(--better);font-weight:600}.worse{color:var(--worse);font-weight:600}
.strong{font-weight:650}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;
word-break:break-all}
p.muted{color:var(--muted);font-size:13.5px}
figure{margin:14px 0 18px}
figure img{max-width:100%;height:auto;display:block;border:1px solid var(--line);
border-radius:6px;background:#fff}
figcaption{font-size:13px;color:var(--muted);margin-top:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px}
details{border:1px solid var(--line);border-radius:6px;margin:8px 0;padding:0 12px;
background:#fff}
details[open]{padding-bottom:10px}
summary{cursor:pointer;padding:8px 0;font-size:14px;font-weight:550}
details details summary{font-weight:450}
pre{background:var(--soft);border:1px solid var(--line);border-radius:6px;padding:10px 12px;
font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;
overflow-wrap:anywhere;margin:4px 0 10px;max-height:480px;overflow:auto}
footer{margin-top:48px;color:var(--muted);font-size:12.5px}
@media print{nav{display:none}details{border:none}}
"""

# The page may load nothing from anywhere: images are data: URIs and the CSS is inline. The CSP
# makes that a guarantee, even if a results field someday ends up in a URL-bearing attribute.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"



def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _html_cell(c: Cell | str, tag: str = "td") -> str:
    c = c if isinstance(c, Cell) else Cell(str(c))
    cls = [c.cls] if c.cls else []
    if c.num:
        cls.append("num")
    attr = f' class="{" ".join(cls)}"' if cls else ""
    sub = f'<span class="sub">{_e(c.sub)}</span>' if c.sub else ""
    return f"<{tag}{attr}>{_e(c.text)}{sub}</{tag}>"


def _numeric_columns(t: Table) -> list[bool]:
    """A column whose body cells are all numeric is right-aligned, header included."""
    return [bool(t.rows) and all(isinstance(r[i], Cell) and r[i].num for r in t.rows
                                 if i < len(r)) for i in range(len(t.headers))]


def _png_size(png: bytes) -> tuple[int, int]:
    """Width and height from the PNG IHDR chunk (bytes 16-24)."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _html_block(b) -> str:
    if isinstance(b, Table):
        cap = f"<caption>{_e(b.caption)}</caption>" if b.caption else ""
        numeric = _numeric_columns(b)
        head = "".join(f'<th class="num">{_e(h)}</th>' if n else f"<th>{_e(h)}</th>"
                       for h, n in zip(b.headers, numeric, strict=True))
        body = "".join("<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in b.rows)
        return (f'<div class="tw"><table>{cap}<thead><tr>{head}</tr></thead>'
                f"<tbody>{body}</tbody></table></div>")
    if isinstance(b, Text):
        return f'<p class="muted">{_e(b.text)}</p>' if b.muted else f"<p>{_e(b.text)}</p>"
    if isinstance(b, Code):
        return f"<pre>{_e(b.text)}</pre>"
    if isinstance(b, Figure):
        from harc.report.plots import DPI, png_data_uri

        cap = f"<figcaption>{_e(b.caption)}</figcaption>" if b.caption else ""
        # Shown at 100 CSS px per figure inch (PNGs are 150 dpi, sharp on HiDPI screens), so
        # every plot's text appears at the same size whatever the figure's width.
        w, h = (round(v * 100 / DPI) for v in _png_size(b.png))
        return (f'<figure><img src="{png_data_uri(b.png)}" width="{w}" height="{h}" '
                f'alt="{_e(b.alt)}">{cap}</figure>')
    if isinstance(b, Grid):
        return '<div class="grid">' + "".join(_html_block(f) for f in b.items) + "</div>"
    if isinstance(b, Details):
        inner = "".join(_html_block(x) for x in b.blocks)
        return (f"<details{' open' if b.open else ''}><summary>{_e(b.summary)}</summary>"
                f"{inner}</details>")
    if isinstance(b, Cards):
        return '<div class="cards">' + "".join(
            f'<div class="card"><div class="label">{_e(lab)}</div>'
            f'<div class="value">{_e(val)}</div><div class="note">{_e(note)}</div></div>'
            for lab, val, note in b.items) + "</div>"
    raise TypeError(f"unknown block {type(b).__name__}")


def _title(res: Mapping) -> str:
    return str(res.get("title") or "HARC evaluation report")


def _meta_line(res: Mapping) -> str:
    runs = _runs(res)
    models = sorted({str(r["model"]) for r in runs if r.get("model")})
    env = res.get("environment") or {}
    bits = [f"created {res['created']}" if res.get("created") else "",
            f"harc {res['harc_version']}" if res.get("harc_version") else "",
            ", ".join(models),
            f"primary judge {(res.get('judges') or {}).get('primary')}"
            if (res.get("judges") or {}).get("primary") else "",
            str(env.get("card") or env.get("device") or "")]
    return " · ".join(b for b in bits if b)


def render_html(res: Mapping, cards: Cards | None, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{_e(s.id)}">{_e(s.title)}</a>' for s in sections)
    body = "".join(f'<section id="{_e(s.id)}"><h2>{_e(s.title)}</h2>'
                   + "".join(_html_block(b) for b in s.blocks) + "</section>"
                   for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(_title(res))}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{_e(_title(res))}</h1><p class=\"meta\">{_e(_meta_line(res))}</p>"
        f"<nav>{nav}</nav>{_html_block(cards) if cards else ''}{body}"
        f"<footer>Generated by harc {_e(res.get('harc_version') or '')} from results.json. "
        "Self-contained: this file loads nothing from the network.</footer>"
        "</main></body></html>\n"
    )


# ---------------------------------------------------------------------------------------------
# Markdown rendering


def _md(s: Any) -> str:
    """Escape for a Markdown table cell: HTML entities, pipes, no line breaks."""
    return html.escape(str(s), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_cell(c: Cell | str) -> str:
    c = c if isinstance(c, Cell) else Cell(str(c))
    text = f"**{_md(c.text)}**" if c.cls == "strong" else _md(c.text)
    return f"{text} {_md(c.sub)}" if c.sub else text


def _md_block(b, out: list[str]) -> None:
    if isinstance(b, Table):
        if b.caption:
            out.append(f"*{_md(b.caption)}*\n")
        out.append("| " + " | ".join(_md(h) for h in b.headers) + " |")
        out.append("|" + "|".join("---:" if n else "---" for n in _numeric_columns(b)) + "|")
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        out.append("")
    elif isinstance(b, Text):
        out.append((f"*{_md(b.text)}*" if b.muted else _md(b.text)) + "\n")
    elif isinstance(b, Code):
        # A fence longer than any backtick run inside, so generated code cannot close it.
        runs = [len(m) for m in re.findall(r"`+", b.text)]
        fence = "`" * max(3, max(runs, default=0) + 1)
        out += [fence + "text", b.text, fence, ""]
    elif isinstance(b, Figure):
        out.append(f"![{_md(b.alt)}]({b.name}.png)\n")
        if b.caption:
            out.append(f"*{_md(b.caption)}*\n")
    elif isinstance(b, Grid):
        for f in b.items:
            _md_block(f, out)
    elif isinstance(b, Details):
        out += [f"<details><summary>{html.escape(b.summary)}</summary>", ""]
        for x in b.blocks:
            _md_block(x, out)
        out += ["</details>", ""]
    elif isinstance(b, Cards):
        out += [f"- **{_md(lab)}**: {_md(val)}" + (f" ({_md(note)})" if note else "")
                for lab, val, note in b.items]
        out.append("")


def render_markdown(res: Mapping, cards: Cards | None, sections: list[Section]) -> str:
    out = [f"# {_md(_title(res))}", "", f"*{_md(_meta_line(res))}*", ""]
    if cards:
        _md_block(cards, out)
    for s in sections:
        out += [f"## {_md(s.title)}", ""]
        for b in s.blocks:
            _md_block(b, out)
    return "\n".join(out).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------


def _figures(sections: list[Section]) -> list[Figure]:
    found: list[Figure] = []

    def walk(blocks):
        for b in blocks:
            if isinstance(b, Figure):
                found.append(b)
            elif isinstance(b, Grid):
                walk(b.items)
            elif isinstance(b, Details):
                walk(b.blocks)

    for s in sections:
        walk(s.blocks)
    return found


def write_report(results: Mapping | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write report.html (self-contained), report.md and its PNG plots into `out_dir`.

    Returns {"html": path, "md": path, <plot name>: png path, ...}. PNGs are written first so
    report.md never points at a file that is not there; every write is atomic.
    """
    res = load_results(results)
    out = Path(out_dir)
    cards, sections = build_document(res)
    paths: dict[str, Path] = {}
    for f in _figures(sections):
        paths[f.name] = atomic_write(out / f"{f.name}.png", lambda p, b=f.png: p.write_bytes(b))
    paths["md"] = atomic_write_text(out / "report.md", render_markdown(res, cards, sections))
    paths["html"] = atomic_write_text(out / "report.html", render_html(res, cards, sections))
    return paths
