"""Section builders for the evaluation results: headline cards, summary, attacks, categories,
refusal, capability, judges and sample generations.

Each builder takes (results, runs) and returns a `Section`, or None when its data is absent.
Results are read through `harc.eval.results`, so the report, the plots, the model card and the
terminal agree.
"""

from __future__ import annotations

from collections.abc import Mapping

from harc.eval.results import (
    _num,
    capability_caveat,
    cell_rate,
    mean_asr,
    perplexity,
    run_label,
)
from harc.report.tree import (
    Cards,
    Cell,
    Code,
    Details,
    Section,
    Table,
    Text,
    delta_cell,
    delta_headers,
    dur,
    figure,
    fnum,
    pct,
    rate_cell,
)


def _cap(r: Mapping) -> Mapping:
    return r.get("capability") or {}


def header_cards(res: Mapping, runs: list[dict]) -> Cards | None:
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
    cap1 = cell_rate(_cap(last).get("items"), "acc", "correct")[0]
    cap0 = cell_rate(_cap(first).get("items"), "acc", "correct")[0]
    if cap1 is not None:
        val = f"{pct(cap0)} → {pct(cap1)}" if len(runs) > 1 and cap0 is not None else pct(cap1)
        note = "not informative at this size" if capability_caveat(runs) else "accuracy"
        items.append(("Capability items", val, note))
    kl = _num(_cap(last).get("kl_vs_base"))
    if kl is not None:
        items.append(("KL vs base", fnum(kl, 4), run_label(last)))
    return Cards(items) if items else None


def summary(res: Mapping, runs: list[dict]) -> Section | None:
    if not runs:
        return None
    rows: list[list] = []

    def add(label, cells_fn, value_fn, lower_better, unit="pp", scale=100.0, d=1):
        cells = [cells_fn(r) for r in runs]
        if all(c.text == "—" for c in cells):
            return
        vals = [value_fn(r) for r in runs]
        deltas = [delta_cell(vals[0], v, lower_better, unit, scale, d) for v in vals[1:]]
        rows.append([label, *cells, *deltas])

    attacks = runs[0].get("mean_asr_attacks") or []
    add("Mean ASR" + (f" ({', '.join(attacks)})" if attacks else ""),
        lambda r: Cell(pct(mean_asr(r)), cls="strong", num=True), mean_asr, True)
    for s in _over_refusal_sets(runs):
        def get(r, s=s):
            return (r.get("over_refusal") or {}).get(s)
        add(f"Over-refusal: {s}", lambda r, g=get: rate_cell(g(r), "rate", "refused"),
            lambda r, g=get: cell_rate(g(r), "rate", "refused")[0], True)
    add("Benign refusal", lambda r: rate_cell(r.get("benign_refusal"), "rate", "refused"),
        lambda r: cell_rate(r.get("benign_refusal"), "rate", "refused")[0], True)
    add("Capability items accuracy", lambda r: rate_cell(_cap(r).get("items"), "acc", "correct"),
        lambda r: cell_rate(_cap(r).get("items"), "acc", "correct")[0], False)
    add("KL vs base (nats/token)", lambda r: Cell(fnum(_cap(r).get("kl_vs_base"), 4), num=True),
        lambda r: _num(_cap(r).get("kl_vs_base")), True, unit="", scale=1.0, d=4)
    add("Perplexity (benign prompts)", lambda r: Cell(fnum(perplexity(r, runs), 2), num=True),
        lambda r: perplexity(r, runs), True, unit="", scale=1.0, d=2)
    add("Evaluation wall time", lambda r: Cell(dur(r.get("wall_s")), num=True),
        lambda r: None, True)
    if not rows:
        return None
    headers = ["Metric", *[run_label(r) for r in runs], *delta_headers(runs)]
    sec = Section("summary", "Summary", [Table(headers, rows)])
    delta = "; Δ in percentage points (pp)" if len(runs) > 1 else ""
    sec.blocks.append(Text(f"Rates with 95% Wilson intervals in brackets and counts{delta}. "
                           "Lower is better for attack success and refusal rates.", muted=True))
    caveat = capability_caveat(runs)
    if caveat:
        sec.blocks.append(Text(f"Capability: {caveat}."))
    return sec


def _over_refusal_sets(runs: list[dict]) -> list[str]:
    sets: list[str] = []
    for r in runs:
        sets += [s for s in (r.get("over_refusal") or {}) if s not in sets]
    return sets


def attacks(res: Mapping, runs: list[dict]) -> Section | None:
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
                     *[rate_cell(c) for c in cells],
                     *[delta_cell(vals[0], v, True) for v in vals[1:]]])
    means = [mean_asr(r) for r in runs_a]
    rows.append([Cell("Mean ASR", cls="strong"),
                 ", ".join(runs_a[0].get("mean_asr_attacks") or names),
                 *[Cell(pct(m), cls="strong", num=True) for m in means],
                 *[delta_cell(means[0], m, True) for m in means[1:]]])
    headers = ["Attack", "Judge", *[run_label(r) for r in runs_a], *delta_headers(runs_a)]
    sec = Section("attacks", "Attack success per attack", [Table(headers, rows)])
    fig = figure("asr_bars", lambda: plots.plot_asr_bars(runs_a),
                 "Grouped bars of attack success rate per attack and run with error bars")
    if fig:
        sec.blocks.append(fig)
    return sec


def per_category(res: Mapping, runs: list[dict]) -> Section | None:
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
            rows.append([cat, *[rate_cell(c) for c in cells],
                         *[delta_cell(vals[0], v, True) for v in vals[1:]]])
        headers = ["Category", *[run_label(r) for r in runs_a], *delta_headers(runs_a)]
        sec.blocks.append(Details(f"{a}: attack success by category ({len(cats)} categories)",
                                  [Table(headers, rows)]))
    return sec


def refusal(res: Mapping, runs: list[dict]) -> Section | None:
    from harc.report import plots

    sets = _over_refusal_sets(runs)
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
                     *[rate_cell(c, "rate", "refused") for c in cells],
                     *[delta_cell(vals[0], v, True) for v in vals[1:]]])
    headers = ["Prompt set", *(["Judge"] if show_judge else []),
               *[run_label(r) for r in runs], *delta_headers(runs)]
    sec = Section("refusal", "Over-refusal and benign refusal", [Table(headers, rows)])
    if not show_judge:
        primary = (res.get("judges") or {}).get("primary")
        sec.blocks.append(Text("The results do not record which judge scored refusals here"
                               + (f"; the primary judge is {primary}." if primary else "."),
                               muted=True))
    fig = figure("tradeoff", lambda: plots.plot_tradeoff(runs),
                 "Scatter of mean attack success against over-refusal rate, one point per run",
                 "Each point is one run (model + adapter + filter). x: mean refusal rate over "
                 "the over-refusal sets; y: mean attack success. Lower-left is better.")
    if fig:
        sec.blocks.append(fig)
    return sec


def capability(res: Mapping, runs: list[dict]) -> Section | None:
    caps = [_cap(r) for r in runs]
    if not any(caps):
        return None
    rows = []
    acc = [cell_rate(c.get("items"), "acc", "correct")[0] for c in caps]
    if any(a is not None for a in acc):
        rows.append(["Capability items accuracy",
                     *[rate_cell(c.get("items"), "acc", "correct") for c in caps],
                     *[delta_cell(acc[0], a, False) for a in acc[1:]]])
    measures = (("KL vs base (nats/token)", 4, lambda r: _num(_cap(r).get("kl_vs_base"))),
                ("Perplexity (benign prompts)", 2, lambda r: perplexity(r, runs)))
    for label, d, value in measures:
        vals = [value(r) for r in runs]
        if any(v is not None for v in vals):
            rows.append([label, *[Cell(fnum(v, d), num=True) for v in vals],
                         *[delta_cell(vals[0], v, True, "", 1.0, d) for v in vals[1:]]])
    if not rows:
        return None
    headers = ["Measure", *[run_label(r) for r in runs], *delta_headers(runs)]
    sec = Section("capability", "Capability and drift", [Table(headers, rows)])
    caveat = capability_caveat(runs)
    if caveat:
        sec.blocks.append(Text(f"Not informative: {caveat}. Raise eval.n_capability (and "
                               "eval.max_new_tokens) to measure capability."))
    return sec


def judges(res: Mapping, runs: list[dict]) -> Section | None:
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


def _verdict(e: Mapping) -> str:
    """The judge's verdict on one sample, as recorded with it."""
    flags = [f"{key}: {'yes' if e[key] else 'no'}" for key in ("refused", "harmful")
             if isinstance(e.get(key), bool)]
    if not flags:
        return "no verdict recorded"
    return ", ".join(flags) + (f" ({e['judge']})" if e.get("judge") else "")


def examples(res: Mapping, runs: list[dict]) -> Section | None:
    blocks = []
    for r in runs:
        ex = [e for e in (r.get("examples") or []) if isinstance(e, Mapping)]
        if not ex:
            continue
        inner = []
        for e in ex:
            prompt = str(e.get("prompt", ""))
            head = " ".join(prompt.split())  # one line: a summary, also in Markdown
            head = head if len(head) <= 90 else head[:87] + "…"
            body = [Text("Prompt", muted=True), Code(prompt), Text("Response", muted=True),
                    Code(str(e.get("response", "")))]
            if e.get("rationale"):
                body += [Text("Judge's rationale", muted=True), Code(str(e["rationale"]))]
            inner.append(Details(f"{e.get('attack', '?')} — {_verdict(e)} — {head}", body))
        blocks.append(Details(f"{run_label(r)}: {len(ex)} sample generations", inner,
                              open=True))
    if not blocks:
        return None
    return Section("examples", "Sample generations", blocks)
