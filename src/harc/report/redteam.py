"""The `redteam` block of results.json (written by `harc redteam`) as a report section: garak's hit
rates per probe and detector, one column per served model, with changes against the first."""

from __future__ import annotations

from collections.abc import Mapping

from harc.eval.results import cell_rate
from harc.report.tree import Cell, Code, Details, Section, Table, Text, delta_cell, dur, rate_cell


def _label(t: Mapping) -> str:
    return str(t.get("name") or "?")


def _rate(cell: Mapping | None) -> Cell:
    return rate_cell(cell, "rate", "hits")


def _delta(a: Mapping | None, b: Mapping | None) -> Cell:
    return delta_cell(cell_rate(a, "rate", "hits")[0], cell_rate(b, "rate", "hits")[0],
                      lower_better=True)


def redteam(res: Mapping, runs: list[dict]) -> Section | None:
    rt = res.get("redteam")
    if not isinstance(rt, Mapping):
        return None
    targets = [t for t in rt.get("targets") or [] if isinstance(t, Mapping)]
    if not targets:
        return None
    probes: list[str] = []
    for t in targets:
        probes += [p for p in (t.get("probes") or {}) if p not in probes]
    rows = []
    for probe in probes:
        cells = [(t.get("probes") or {}).get(probe) or {} for t in targets]
        dets: list[str] = []
        for c in cells:
            dets += [d for d in (c.get("detectors") or {}) if d not in dets]
        lines = [("any detector", [c.get("outputs") for c in cells])] if len(dets) > 1 else []
        lines += [(d, [(c.get("detectors") or {}).get(d) for c in cells]) for d in dets]
        for det, per_target in lines:
            rows.append([probe, det, *[_rate(c) for c in per_target],
                         *[_delta(per_target[0], c) for c in per_target[1:]]])
    first = _label(targets[0])
    headers = ["Probe", "Detector", *[_label(t) for t in targets],
               *[f"Δ {_label(t)} vs {first}" for t in targets[1:]]]
    s = rt.get("settings") or {}
    sec = Section("redteam", "Red-teaming with garak (served models)")
    names = ", ".join(map(str, rt.get("probes") or probes))
    sec.blocks.append(Text(
        f"garak {rt.get('garak_version') or '?'} ran the probes {names} "
        f"against each served model through its OpenAI-compatible API ({s.get('generations', '?')} "
        f"generation(s) per prompt, at most {s.get('prompt_cap', '?')} prompts per probe, "
        f"max_tokens {s.get('max_tokens', '?')}, {s.get('decoding', 'greedy')} decoding). A hit "
        f"is an output that a detector scores at least {s.get('hit_threshold', 0.5)}; rates are "
        "hits / outputs with Wilson 95% intervals, lower is better. garak's detectors match "
        "strings: a hit is a signal to read, not a judged harm."))
    sec.blocks.append(Table(headers, rows, "garak hit rate by probe and detector"))
    sec.blocks.append(Table(
        ["Served model", "Adapter", "Policy layers", "garak wall time"],
        [[_label(t), str(t.get("adapter") or "— (base)"), " + ".join(t.get("layers") or []) or "—",
          Cell(dur(t.get("wall_s")), num=True)] for t in targets], "Served models"))
    for t in targets:
        ex = [e for e in t.get("examples") or [] if isinstance(e, Mapping)]
        if ex:
            sec.blocks.append(Details(f"{_label(t)}: {len(ex)} example hits", [
                b for e in ex for b in (
                    Text(f"{e.get('probe')} — flagged by {', '.join(e.get('detectors') or [])}",
                         muted=True),
                    Code(f"PROMPT\n{e.get('prompt', '')}\n\nOUTPUT\n{e.get('output', '')}"))]))
    return sec
